# Base model: a plain Hugging Face folder (Hub download, local copy, or the bundled
# offline SmolLM2 converted from GGUF), with a pad token distinct from EOS.


rule fetch_model:
    output:
        model_dir=directory(f"{RESULTS}/model/base"),
        provenance=f"{RESULTS}/model/base.provenance.json",
    log:
        f"{RESULTS}/logs/fetch_model.log",
    conda:
        ENV
    threads: RES["threads"]
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
    params:
        model=config["model"],
    script:
        "../scripts/fetch_model.py"
