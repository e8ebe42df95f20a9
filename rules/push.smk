# Opt-in upload of one trained model (merged or adapter) and its tokenizer to the Hugging
# Face Hub, with a generated model card. Built only when push.enabled is true; the token
# comes from HF_TOKEN or the Hub login, never from the config.


rule push_to_hub:
    input:
        models=push_models(),
        base_model=f"{RESULTS}/model/base",
        tokenizer_audit=f"{RESULTS}/model/tokenizer_audit.json",
        runs=f"{RESULTS}/tables/runs.csv",
        perplexity=f"{RESULTS}/tables/perplexity.csv",
        report=f"{RESULTS}/report/report.html",
    output:
        card=f"{RESULTS}/hub/README.md",
        plan=f"{RESULTS}/hub/upload.json",
        provenance=f"{RESULTS}/hub/push_to_hub.provenance.json",
    log:
        f"{RESULTS}/logs/push_to_hub.log",
    conda:
        ENV
    resources:
        mem_mb=per_attempt(LIGHT_MEM_MB),
        runtime=per_attempt(LIGHT_RUNTIME_MIN),
    params:
        push=PUSH,
        config=config,
    script:
        "../scripts/push_to_hub.py"
