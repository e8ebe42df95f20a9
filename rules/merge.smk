# Merge: each adapter folded into the 16-bit base, verified against base+adapter.


rule merge:
    input:
        model_dir=f"{RESULTS}/model/base",
        adapter_dir=f"{RESULTS}/train/{{cell}}/adapter",
        eval_chat=f"{RESULTS}/data/eval_chat.jsonl",
    output:
        merged_dir=directory(f"{RESULTS}/merged/{{cell}}/model"),
        check=f"{RESULTS}/merged/{{cell}}/merge_check.json",
        provenance=f"{RESULTS}/merged/{{cell}}/merge.provenance.json",
    log:
        f"{RESULTS}/logs/merge/{{cell}}.log",
    conda:
        ENV
    threads: RES["threads"]
    resources:
        mem_mb=per_attempt(RES["mem_mb"]),
        runtime=per_attempt(RES["runtime_min"]),
        gpu=MODEL_GPUS,
    params:
        cell=cell_params,
        merge=config["merge"],
        max_length=config["evaluate"]["max_length"],
    script:
        "../scripts/merge.py"
