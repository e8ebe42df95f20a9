# Data: fetch each data set (Hub, sha256-checked mirror, or local file), then validate,
# parse into turns, format with the base tokenizer, subset and measure token lengths.


rule fetch_data:
    output:
        rows=f"{RESULTS}/data/raw/{{dataset}}.jsonl",
        provenance=f"{RESULTS}/data/raw/{{dataset}}.provenance.json",
    log:
        f"{RESULTS}/logs/fetch_data/{{dataset}}.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    params:
        data=config["data"],
    script:
        "../scripts/fetch_data.py"


rule prepare_data:
    input:
        train=f"{RESULTS}/data/raw/train.jsonl",
        eval_chat=f"{RESULTS}/data/raw/eval_chat.jsonl",
        wikitext=f"{RESULTS}/data/raw/wikitext.jsonl",
        model_dir=f"{RESULTS}/model/base",
    output:
        train=f"{RESULTS}/data/train.jsonl",
        eval_chat=f"{RESULTS}/data/eval_chat.jsonl",
        wikitext=f"{RESULTS}/data/wikitext.txt",
        stats=f"{RESULTS}/data/stats.json",
        provenance=f"{RESULTS}/data/prepare_data.provenance.json",
    log:
        f"{RESULTS}/logs/prepare_data.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    params:
        data=config["data"],
    script:
        "../scripts/prepare_data.py"
