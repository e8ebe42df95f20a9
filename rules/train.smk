# Training: one job per grid cell. Both arms of a seed start from one initial adapter.


rule init_adapter:
    input:
        model_dir=f"{RESULTS}/model/base",
    output:
        adapter_dir=directory(f"{RESULTS}/{INIT_ADAPTER}"),
        provenance=f"{RESULTS}/{INIT_ADAPTER}.provenance.json",
    log:
        f"{RESULTS}/logs/{INIT_ADAPTER}.log",
    conda:
        ENV
    threads: RES["threads"]
    resources:
        mem_mb=per_attempt(RES["mem_mb"]),
        runtime=per_attempt(RES["runtime_min"]),
    script:
        "../scripts/init_adapter.py"


rule train:
    input:
        model_dir=f"{RESULTS}/model/base",
        train=f"{RESULTS}/data/train.jsonl",
        init_adapter=init_adapter_dir,
        # No training starts on a tokenizer that would mask EOS (rules/model.smk).
        tokenizer_audit=f"{RESULTS}/model/tokenizer_audit.json",
        stats=f"{RESULTS}/data/stats.json",  # the cell's tokens size its time limit
    output:
        adapter_dir=directory(f"{RESULTS}/train/{{cell}}/adapter"),
        metrics=f"{RESULTS}/train/{{cell}}/metrics.json",
        loss_curve=f"{RESULTS}/train/{{cell}}/loss_curve.csv",
        tensorboard=directory(f"{RESULTS}/train/{{cell}}/tensorboard"),
        provenance=f"{RESULTS}/train/{{cell}}/train.provenance.json",
    log:
        f"{RESULTS}/logs/train/{{cell}}.log",
    conda:
        ENV
    threads: TRAIN_THREADS
    resources:
        mem_mb=per_attempt(RES["train_mem_mb"]),
        runtime=train_runtime,
        slurm_extra=train_sbatch_options,
        gpu=TRAIN_GPUS,
        gpu_mem_mb=train_gpu_mem_mb,
        nodes=1,  # data-parallel processes share one node
    params:
        cell=cell_params,
        train=config["train"],
        max_length=config["data"]["max_length"],
        processes=RES["gpus_per_job"],
        # Outside the outputs, so Snakemake keeps them when a killed job is rerun.
        checkpoint_dir=f"{RESULTS}/checkpoints/{{cell}}",
    script:
        "../scripts/train.py"
