# Downstream tasks (evaluate.lm_eval): lm-evaluation-harness on the models the perplexity
# stage scores, one job per model and task set; then the tidy table and its figure.


rule downstream_base:
    input:
        unpack(lambda wildcards: {f"data_{name}": path for name, path in LM_EVAL_DATA.items()}),
        model_dir=f"{RESULTS}/model/base",
        tasks=LM_EVAL_TASK_FILES,
    output:
        table=f"{RESULTS}/downstream/base/{{base}}.csv",
        results=f"{RESULTS}/downstream/base/{{base}}.json",
        provenance=f"{RESULTS}/downstream/base/{{base}}.provenance.json",
    log:
        f"{RESULTS}/logs/downstream/base/{{base}}.log",
    conda:
        ENV
    threads: max(1, RES["threads"] // 2)  # lm-eval is light on the CPU: two jobs share what one evaluation gets
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
        gpu=MODEL_GPUS,
    params:
        description=base_description,
        lm_eval=LM_EVAL,
        data=config["data"],
        pipeline_data=list(LM_EVAL_DATA),
        compute_dtype=config["train"]["compute_dtype"],
    script:
        "../scripts/downstream.py"


rule downstream_adapter:
    input:
        unpack(lambda wildcards: {f"data_{name}": path for name, path in LM_EVAL_DATA.items()}),
        model_dir=f"{RESULTS}/model/base",
        adapter_dir=f"{RESULTS}/train/{{cell}}/adapter",
        tasks=LM_EVAL_TASK_FILES,
    output:
        table=f"{RESULTS}/downstream/adapter/{{cell}}.csv",
        results=f"{RESULTS}/downstream/adapter/{{cell}}.json",
        provenance=f"{RESULTS}/downstream/adapter/{{cell}}.provenance.json",
    log:
        f"{RESULTS}/logs/downstream/adapter/{{cell}}.log",
    conda:
        ENV
    threads: max(1, RES["threads"] // 2)  # lm-eval is light on the CPU: two jobs share what one evaluation gets
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
        gpu=MODEL_GPUS,
    params:
        description=adapter_description,
        lm_eval=LM_EVAL,
        data=config["data"],
        pipeline_data=list(LM_EVAL_DATA),
        compute_dtype=config["train"]["compute_dtype"],
    script:
        "../scripts/downstream.py"


rule downstream_merged:
    input:
        unpack(lambda wildcards: {f"data_{name}": path for name, path in LM_EVAL_DATA.items()}),
        model_dir=f"{RESULTS}/merged/{{cell}}/model",
        tasks=LM_EVAL_TASK_FILES,
    output:
        table=f"{RESULTS}/downstream/merged/{{cell}}.csv",
        results=f"{RESULTS}/downstream/merged/{{cell}}.json",
        provenance=f"{RESULTS}/downstream/merged/{{cell}}.provenance.json",
    log:
        f"{RESULTS}/logs/downstream/merged/{{cell}}.log",
    conda:
        ENV
    threads: max(1, RES["threads"] // 2)  # lm-eval is light on the CPU: two jobs share what one evaluation gets
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
        gpu=MODEL_GPUS,
    params:
        description=merged_description,
        lm_eval=LM_EVAL,
        data=config["data"],
        pipeline_data=list(LM_EVAL_DATA),
        compute_dtype=config["merge"]["dtype"],
    script:
        "../scripts/downstream.py"


rule downstream_table:
    input:
        tables=downstream_tables(),
    output:
        table=report(f"{RESULTS}/tables/downstream.csv", category="Tables", caption="../report/downstream.rst"),
        diff=f"{RESULTS}/tables/downstream_diff.csv",
        provenance=f"{RESULTS}/tables/downstream.provenance.json",
    log:
        f"{RESULTS}/logs/downstream_table.log",
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
    script:
        "../scripts/downstream_report.py"


rule downstream_figure:
    input:
        table=f"{RESULTS}/tables/downstream.csv",
        diff=f"{RESULTS}/tables/downstream_diff.csv",
    output:
        png=report(f"{RESULTS}/figures/downstream.png", category="Figures", caption="../report/downstream.rst"),
        svg=f"{RESULTS}/figures/downstream.svg",
        provenance=f"{RESULTS}/figures/downstream.provenance.json",
    log:
        f"{RESULTS}/logs/figures/downstream.log",
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
    script:
        "../scripts/downstream_report.py"
