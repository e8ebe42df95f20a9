# qlora-snakemake: fine-tune a Llama-family chat model with LoRA and QLoRA and measure
# what 4-bit quantisation costs. This file is the table of contents; the stages live in
# rules/, their code in scripts/, the study design in config/.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


# Validates the config (schema + cross-key rules) before anything is scheduled.
include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/evaluate.smk"
include: "rules/downstream.smk"
include: "rules/track.smk"
include: "rules/report.smk"
include: "rules/push.smk"


# Run by the Snakemake process itself, never queued on a cluster: the downloads need the
# internet that compute nodes may lack, the rest takes seconds.
localrules:
    fetch_model,
    fetch_data,
    push_to_hub,
    tokenizer_audit,
    perplexity_table,
    tables,
    figure,
    report,
    downstream_table,
    downstream_figure,
    track_evaluation,


rule all:
    default_target: True
    input:
        final_targets(),
        tracker_records(),
