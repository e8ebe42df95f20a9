# Experiment trackers (train.report_to: mlflow, wandb): the training job logs each cell's
# run; this rule adds the cell's perplexities and downstream scores to it once they exist.


rule track_evaluation:
    input:
        metrics=f"{RESULTS}/train/{{cell}}/metrics.json",
        perplexity=[f"{RESULTS}/eval/adapter/{{cell}}.csv", f"{RESULTS}/eval/merged/{{cell}}.csv"],
        downstream=cell_downstream_tables,
    output:
        record=f"{RESULTS}/trackers/{{cell}}.json",
        provenance=f"{RESULTS}/trackers/{{cell}}.provenance.json",
    log:
        f"{RESULTS}/logs/trackers/{{cell}}.log",
    conda:
        ENV
    resources:
        mem_mb=RES["mem_mb"],
        runtime=RES["runtime_min"],
    params:
        report_to=config["train"].get("report_to", ["tensorboard"]),
    script:
        "../scripts/trackers.py"
