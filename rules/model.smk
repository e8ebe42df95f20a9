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
        mem_mb=per_attempt(RES["mem_mb"]),
        runtime=per_attempt(RES["runtime_min"]),
    params:
        model=config["model"],
    script:
        "../scripts/fetch_model.py"


# The tokenizer and chat template the training runs use: template hash, special-token ids,
# and EOS kept in the labels of real formatted examples collated like SFTTrainer.
rule tokenizer_audit:
    input:
        model_dir=f"{RESULTS}/model/base",
        train=f"{RESULTS}/data/train.jsonl",
    output:
        audit=f"{RESULTS}/model/tokenizer_audit.json",
        provenance=f"{RESULTS}/model/tokenizer_audit.provenance.json",
    log:
        f"{RESULTS}/logs/tokenizer_audit.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    params:
        max_length=config["data"]["max_length"],
    script:
        "../scripts/tokenizer_audit.py"
