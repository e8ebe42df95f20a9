"""Experiment trackers (``train.report_to``): one MLflow / Weights & Biases run per grid cell.

The training job hands the chosen trackers to the Trainer (transformers' own MLflowCallback
and WandbCallback log the losses, learning rate and TrainingArguments), names the run after
the cell and tags it with the config fingerprint and the code version; when training ends it
adds the final training metrics. Rule ``track_evaluation`` (rules/downstream.smk) adds the
cell's perplexities and downstream scores to the same run once they exist: the MLflow run is
found by its cell and config-fingerprint tags, the wandb run by the id derived from them.

TensorBoard is always written by the project's own writer (results/train/<cell>/tensorboard,
a rule output), so ``tensorboard`` in the list is never handed to the Trainer twice.

Where runs go is the trackers' usual environment: MLFLOW_TRACKING_URI (``file:./mlruns``
for a local store), MLFLOW_EXPERIMENT_NAME (default ``qlora-snakemake``); WANDB_PROJECT
(default ``qlora-snakemake``), WANDB_MODE=offline for no network.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path

from runtime import code_version, config_sha256, log_arguments, setup_logging, write_manifest, write_provenance

DEFAULT_TRACKERS = ["tensorboard"]
PROJECT_NAME = "qlora-snakemake"


def chosen(train: dict) -> list[str]:
    return list(train.get("report_to") or DEFAULT_TRACKERS)


def trainer_report_to(train: dict) -> list[str] | str:
    """The Trainer's report_to: the external trackers; TensorBoard is the project's own writer."""
    external = [name for name in chosen(train) if name != "tensorboard"]
    return external or "none"


def identity(cell_name: str, config: dict) -> dict:
    """Run name and tags of one cell's run: the cell, the config fingerprint, the code version."""
    fingerprint = config_sha256(config)
    code = code_version()
    return {
        "run_name": cell_name,
        "run_id": hashlib.sha256(f"{cell_name}:{fingerprint}".encode()).hexdigest()[:24],  # wandb's id
        "wandb_dir": str(Path(config["results_dir"]) / "trackers"),  # offline runs: not the project folder
        "tags": {
            "cell": cell_name,
            "config_sha256": fingerprint,
            "git_commit": str(code["git_commit"]),
            "git_dirty": str(code["git_dirty"]),
        },
    }


def prepare(tracking: dict | None, train: dict, cell: dict) -> None:
    """Environment for transformers' tracker callbacks (read when the Trainer starts)."""
    if not tracking:
        return
    trackers = chosen(train)
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", PROJECT_NAME)
        os.environ["MLFLOW_TAGS"] = json.dumps({**tracking["tags"], **{f"grid.{k}": str(v) for k, v in cell.items()}})
        os.environ.setdefault("MLFLOW_FLATTEN_PARAMS", "TRUE")
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_DIR", tracking["wandb_dir"])
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_PROJECT", PROJECT_NAME)
        os.environ["WANDB_RUN_ID"] = tracking["run_id"]
        os.environ["WANDB_RESUME"] = "allow"
        # wandb tags hold 64 characters: short forms here, full values in the run's config at the end
        os.environ["WANDB_TAGS"] = ",".join(f"{k}={v[:16]}" for k, v in tracking["tags"].items() if k != "cell")


def check_config(config: dict) -> None:
    """Raise ConfigError when a chosen tracker's package is not installed (before any job)."""
    import importlib.util

    from config_check import ConfigError

    for name in chosen(config["train"]):
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'train.report_to': {name} is chosen but its package is not installed")


def _numbers(values: dict, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}{k}": float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def mlflow_run_id(tracking: dict) -> str | None:
    """The newest MLflow run of this cell and config fingerprint, or None."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT_NAME))
    if experiment is None:
        return None
    tags = tracking["tags"]
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.cell = '{tags['cell']}' and tags.config_sha256 = '{tags['config_sha256']}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def log_metrics(tracking: dict | None, train: dict, metrics: dict[str, float]) -> dict[str, str | None]:
    """Add final numbers to the cell's runs; returns {tracker: run id}."""
    if not tracking:
        return {}
    logged = {}
    if "mlflow" in chosen(train):
        import mlflow

        run_id = mlflow_run_id(tracking)
        if run_id is None:
            raise RuntimeError(f"no MLflow run tagged cell={tracking['run_name']} with this config fingerprint")
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(metrics)
        logged["mlflow"] = run_id
    if "wandb" in chosen(train):
        import wandb

        run = wandb.run  # still open after the Trainer's callback, in the training job
        if run is None or run.id != tracking["run_id"]:
            os.environ.setdefault("WANDB_DIR", tracking["wandb_dir"])
            Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT_NAME),
                id=tracking["run_id"],
                resume="allow",
                name=tracking["run_name"],
            )
        run.config.update(tracking["tags"], allow_val_change=True)
        run.summary.update(metrics)
        run.finish()
        logged["wandb"] = tracking["run_id"]
    return logged


def final_train_metrics(metrics: dict) -> dict[str, float]:
    """The train job's final numbers worth a tracker: loss, speed, memory, steps."""
    keys = [k for k in metrics if k.endswith(("_loss", "_per_second", "_bytes", "_steps", "_seconds_this_run"))]
    return _numbers({k: metrics[k] for k in keys}, "final/")


def evaluation_metrics(perplexity_csvs: list[Path], downstream_csvs: list[Path]) -> dict[str, float]:
    """final/ppl_<kind>_<dataset> and downstream/<kind>/<task>/<metric> of one cell."""
    found = {}
    for path in perplexity_csvs:
        for row in csv.DictReader(Path(path).open()):
            found[f"final/ppl_{row['model_kind']}_{row['dataset']}"] = float(row["perplexity"])
    for path in downstream_csvs:
        for row in csv.DictReader(Path(path).open()):
            found[f"downstream/{row['model_kind']}/{row['task']}/{row['metric']}"] = float(row["value"])
    return _numbers(found)


def main(
    cell_name: str,
    config: dict,
    perplexity_csvs: list[Path],
    downstream_csvs: list[Path],
    out_json: Path,
    provenance_path: Path | None = None,
    log_path: Path | None = None,
) -> dict:
    """Log one cell's perplexities (and downstream scores) to its tracker runs."""
    started = time.time()
    logger = setup_logging(log_path, "track_evaluation")
    log_arguments(logger, cell_name=cell_name, perplexity_csvs=perplexity_csvs, downstream_csvs=downstream_csvs)
    tracking = identity(cell_name, config)
    metrics = evaluation_metrics(perplexity_csvs, downstream_csvs)
    runs = log_metrics(tracking, config["train"], metrics)
    record = {"cell": cell_name, "runs": runs, "metrics": metrics, "tags": tracking["tags"]}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("logged %d numbers to %s", len(metrics), runs)
    if provenance_path:
        write_provenance(provenance_path, "track_evaluation", started, cell=cell_name, runs=runs)
    return record


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        smk.wildcards.cell,
        smk.config,
        [Path(p) for p in smk.input.perplexity],
        [Path(p) for p in smk.input.downstream],
        Path(smk.output.record),
        Path(smk.output.provenance),
        Path(smk.log[0]),
    )
    write_manifest(smk, "track_evaluation", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cell", required=True, help="the cell's name (results/train/<cell>)")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    tables = [a.results / "eval" / kind / f"{a.cell}.csv" for kind in ("adapter", "merged")]
    downstream = [
        p for p in (a.results / "downstream" / k / f"{a.cell}.csv" for k in ("adapter", "merged")) if p.exists()
    ]
    main(a.cell, yaml.safe_load(a.config.read_text()), tables, downstream, a.out)
