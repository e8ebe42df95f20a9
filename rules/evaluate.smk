# Evaluation: perplexity (held-out chat, assistant tokens, WikiText-2) and greedy samples
# of the 16-bit and 4-bit bases, every adapter on its training base, every merged model.


rule evaluate_base:
    input:
        model_dir=f"{RESULTS}/model/base",
        eval_chat=f"{RESULTS}/data/eval_chat.jsonl",
        wikitext=f"{RESULTS}/data/wikitext.txt",
    output:
        table=f"{RESULTS}/eval/base/{{base}}.csv",
        examples=f"{RESULTS}/eval/base/{{base}}.examples.csv",
        samples=f"{RESULTS}/samples/base/{{base}}.jsonl",
        provenance=f"{RESULTS}/eval/base/{{base}}.provenance.json",
    log:
        f"{RESULTS}/logs/evaluate/base/{{base}}.log",
    conda:
        ENV
    threads: RES["threads"]
    resources:
        mem_mb=per_attempt(RES["mem_mb"]),
        runtime=per_attempt(RES["runtime_min"]),
        gpu=MODEL_GPUS,
    params:
        description=base_description,
        evaluate=config["evaluate"],
        text_format=config["data"]["format"],
        compute_dtype=config["train"]["compute_dtype"],
    script:
        "../scripts/perplexity.py"


rule evaluate_adapter:
    input:
        model_dir=f"{RESULTS}/model/base",
        adapter_dir=f"{RESULTS}/train/{{cell}}/adapter",
        eval_chat=f"{RESULTS}/data/eval_chat.jsonl",
        wikitext=f"{RESULTS}/data/wikitext.txt",
    output:
        table=f"{RESULTS}/eval/adapter/{{cell}}.csv",
        examples=f"{RESULTS}/eval/adapter/{{cell}}.examples.csv",
        samples=f"{RESULTS}/samples/adapter/{{cell}}.jsonl",
        provenance=f"{RESULTS}/eval/adapter/{{cell}}.provenance.json",
    log:
        f"{RESULTS}/logs/evaluate/adapter/{{cell}}.log",
    conda:
        ENV
    threads: RES["threads"]
    resources:
        mem_mb=per_attempt(RES["mem_mb"]),
        runtime=per_attempt(RES["runtime_min"]),
        gpu=MODEL_GPUS,
    params:
        description=adapter_description,
        evaluate=config["evaluate"],
        text_format=config["data"]["format"],
        compute_dtype=config["train"]["compute_dtype"],
    script:
        "../scripts/perplexity.py"


rule evaluate_merged:
    input:
        model_dir=f"{RESULTS}/merged/{{cell}}/model",
        eval_chat=f"{RESULTS}/data/eval_chat.jsonl",
        wikitext=f"{RESULTS}/data/wikitext.txt",
    output:
        table=f"{RESULTS}/eval/merged/{{cell}}.csv",
        examples=f"{RESULTS}/eval/merged/{{cell}}.examples.csv",
        samples=f"{RESULTS}/samples/merged/{{cell}}.jsonl",
        provenance=f"{RESULTS}/eval/merged/{{cell}}.provenance.json",
    log:
        f"{RESULTS}/logs/evaluate/merged/{{cell}}.log",
    conda:
        ENV
    threads: RES["threads"]
    resources:
        mem_mb=per_attempt(RES["mem_mb"]),
        runtime=per_attempt(RES["runtime_min"]),
        gpu=MODEL_GPUS,
    params:
        description=merged_description,
        evaluate=config["evaluate"],
        text_format=config["data"]["format"],
        compute_dtype=config["merge"]["dtype"],
    script:
        "../scripts/perplexity.py"


rule perplexity_table:
    input:
        tables=evaluation_tables(),
        examples=[table.removesuffix(".csv") + ".examples.csv" for table in evaluation_tables()],
    output:
        table=f"{RESULTS}/tables/perplexity.csv",
        examples=f"{RESULTS}/tables/perplexity_examples.csv.gz",
        provenance=f"{RESULTS}/tables/perplexity.provenance.json",
    log:
        f"{RESULTS}/logs/perplexity_table.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    script:
        "../scripts/perplexity_table.py"
