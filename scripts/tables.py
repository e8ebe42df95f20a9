"""Tidy tables of the whole study, the only inputs of the figures and the report.

- ``runs.csv``: one row per grid cell: its hyperparameters, memory, speed, losses, every
  perplexity of its adapter and merged model, and the merge check. Columns are documented
  in ``report/columns.md``.
- ``loss_curves.csv``: every cell's loss curve, long format (cell columns + step, loss).
- ``pairs.csv``: LoRA vs QLoRA paired by everything but the base precision (same seed,
  rank, ..., learning rate): the differences the report's headline numbers come from.
- ``gaps.csv``: the QLoRA − LoRA perplexity gap per pair setting with its seed interval and
  its eval-set (bootstrap over examples) interval, beside each arm's training base.
- ``quantisation.csv``: NF4 − FP4 and double quantisation − none, on the 4-bit bases and
  after fine-tuning (``scripts/statistics_tables.py`` says how the intervals are made).
- ``samples.csv``: the greedy generations of every evaluated model.
- ``environment.json``: devices, package versions and hardware of the training runs.
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from grid import GRID_COLUMNS
from runtime import log_arguments, setup_logging, write_manifest
from statistics_tables import PAIR_KEYS, gaps_table, quantisation_table

GIB = 1024**3
METRIC_COLUMNS = {
    "model_footprint_bytes": "footprint_bytes",
    "load_peak_allocated_bytes": "gpu_weights_peak_bytes",
    "train_peak_allocated_bytes": "gpu_train_peak_bytes",
    "train_peak_reserved_bytes": "gpu_train_reserved_bytes",
    "train_peak_rss_bytes": "train_peak_rss_bytes",
    "rss_at_train_start_bytes": "rss_at_train_start_bytes",
    "process_peak_rss_bytes": "process_peak_rss_bytes",
    "optimizer_state_bytes": "optimizer_state_bytes",
    "optimizer_paged": "optimizer_paged",
    "tokens_per_second": "tokens_per_second",
    "steady_tokens_per_second": "steady_tokens_per_second",
    "steady_from_step": "steady_from_step",
    "samples_per_second": "samples_per_second",
    "wall_seconds": "train_wall_seconds",
    "global_steps": "steps",
    "final_train_loss": "final_train_loss",
    "final_loss_steps": "final_loss_steps",
    "mean_train_loss": "mean_train_loss",
    "device": "device",
    "compute_dtype": "compute_dtype",
    "optimizer": "optimizer",
    "world_size": "world_size",
}
# Keys the tables cannot do without (``last_batch_loss`` stays out of the tables on purpose).
REQUIRED_METRICS = [
    "train_peak_rss_bytes",
    "optimizer_state_bytes",
    "optimizer_paged",
    "steady_from_step",
    "final_loss_steps",
    "world_size",
]
MERGE_COLUMNS = {
    "max_abs_logit_diff": "merge_max_abs_logit_diff",
    "mean_abs_logit_diff": "merge_mean_abs_logit_diff",
    "rel_ppl_diff": "merge_rel_ppl_diff",
    "adapter_on_4bit_ppl": "merge_check_adapter_on_4bit_ppl",
    "merged_ppl": "merge_check_merged_ppl",
    "merge_gap_rel_ppl": "merge_gap_rel_ppl",
    "dtype": "merge_dtype",
    "adapter_effect_mean_abs_logit_diff": "merge_adapter_effect_mean_abs_logit_diff",
    "fold_error_share": "merge_fold_error_share",
    "precision_floor_max_abs_logit_diff": "merge_precision_floor_max_abs_logit_diff",
    "precision_floor_mean_abs_logit_diff": "merge_precision_floor_mean_abs_logit_diff",
}


def runs_table(metrics_paths: list[Path], check_paths: list[Path], perplexity: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for metrics_path, check_path in zip(metrics_paths, check_paths, strict=True):
        cell = Path(metrics_path).parent.name
        assert Path(check_path).parent.name == cell, (metrics_path, check_path)
        metrics = json.loads(Path(metrics_path).read_text())
        missing = [key for key in REQUIRED_METRICS if key not in metrics]
        if missing:
            raise ValueError(f"{metrics_path} lacks {', '.join(missing)}: it was written by an older train.py; retrain")
        check = json.loads(Path(check_path).read_text())
        row = {"cell": cell, **{c: metrics[c] for c in GRID_COLUMNS}}
        row.update({new: metrics.get(old) for old, new in METRIC_COLUMNS.items()})
        row.update({new: check.get(old) for old, new in MERGE_COLUMNS.items()})
        for record in perplexity[perplexity.model == cell].itertuples():
            row[f"ppl_{record.model_kind}_{record.dataset}"] = record.perplexity
        rows.append(row)
    runs = pd.DataFrame(rows)
    # One memory measure per run for comparisons: the GPU training peak where there is a
    # GPU, else the peak RSS of the training phase (high-water mark reset at training start;
    # a process-level measure that includes the allocator's behaviour).
    gpu = runs["gpu_train_peak_bytes"].notna()
    runs["memory_measure"] = gpu.map({True: "gpu_train_peak", False: "cpu_train_phase_peak_rss"})
    runs["train_peak_gib"] = runs["gpu_train_peak_bytes"].where(gpu, runs["train_peak_rss_bytes"]) / GIB
    runs["weights_gib"] = runs["gpu_weights_peak_bytes"].where(gpu, runs["footprint_bytes"]) / GIB
    runs["optimizer_state_gib"] = runs["optimizer_state_bytes"] / GIB
    # GPU-hours of training: wall time (loading included) times the GPUs the job held.
    runs["gpu_hours"] = (runs["train_wall_seconds"] * runs["world_size"] / 3600).where(gpu)
    return runs


def pairs_table(runs: pd.DataFrame) -> pd.DataFrame:
    lora = runs[runs.method == "lora"].set_index(PAIR_KEYS)
    qlora = runs[runs.method == "qlora"]
    pairs = []
    for row in qlora.itertuples(index=False):
        key = tuple(getattr(row, k) for k in PAIR_KEYS)
        if key not in lora.index:
            continue
        base = lora.loc[[key]].iloc[0]
        pair = {
            **dict(zip(PAIR_KEYS, key, strict=True)),
            "quant_type": row.quant_type,
            "double_quant": row.double_quant,
        }
        for column in (
            "train_peak_gib",
            "weights_gib",
            "optimizer_state_gib",
            "footprint_bytes",
            "tokens_per_second",
            "steady_tokens_per_second",
        ):
            pair[f"lora_{column}"], pair[f"qlora_{column}"] = base[column], getattr(row, column)
        for column in [c for c in runs.columns if c.startswith("ppl_")]:
            pair[f"lora_{column}"], pair[f"qlora_{column}"] = base[column], getattr(row, column)
            pair[f"diff_{column}"] = getattr(row, column) - base[column]
        pairs.append(pair)
    return pd.DataFrame(pairs) if pairs else pd.DataFrame(columns=[*PAIR_KEYS, "quant_type", "double_quant"])


def loss_curves_table(metrics_paths: list[Path]) -> pd.DataFrame:
    curves = []
    for path in [Path(p).parent / "loss_curve.csv" for p in metrics_paths]:
        metrics = json.loads((path.parent / "metrics.json").read_text())
        curve = pd.read_csv(path)[["step", "loss", "learning_rate"]].rename(
            columns={"learning_rate": "step_learning_rate"}
        )
        for column in GRID_COLUMNS:
            curve[column] = metrics[column]
        curve["cell"] = path.parent.name
        curves.append(curve)
    return pd.concat(curves, ignore_index=True)


def samples_table(sample_paths: list[Path]) -> pd.DataFrame:
    records = [json.loads(line) for path in sample_paths for line in Path(path).read_text().splitlines()]
    columns = ["model_kind", "model", "precision", "method", "learning_rate", "seed", "prompt", "completion"]
    return pd.DataFrame(records).reindex(columns=columns)


def environment(metrics_paths: list[Path]) -> dict:
    """Devices and software of the training runs (for the report's provenance section)."""
    runs = [json.loads(Path(p).read_text()) for p in metrics_paths]
    return {
        "devices": sorted({r["device"] for r in runs}),
        "versions": sorted({json.dumps(r["versions"], sort_keys=True) for r in runs}),
        "hardware": sorted({json.dumps(r["hardware"], sort_keys=True) for r in runs}),
    }


def main(
    metrics_paths: list[Path],
    check_paths: list[Path],
    perplexity_csv: Path,
    examples_csv: Path,
    sample_paths: list[Path],
    out_dir: Path,
    log_path: Path | None = None,
) -> pd.DataFrame:
    logger = setup_logging(log_path, "tables")
    log_arguments(
        logger,
        metrics_paths=metrics_paths,
        check_paths=check_paths,
        perplexity_csv=perplexity_csv,
        examples_csv=examples_csv,
    )
    perplexity, examples = pd.read_csv(perplexity_csv), pd.read_csv(examples_csv)
    runs = runs_table(metrics_paths, check_paths, perplexity)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out_dir / "runs.csv", index=False)
    pairs_table(runs).to_csv(out_dir / "pairs.csv", index=False)
    gaps_table(runs, perplexity, examples).to_csv(out_dir / "gaps.csv", index=False)
    quantisation_table(runs, perplexity, examples).to_csv(out_dir / "quantisation.csv", index=False)
    loss_curves_table(metrics_paths).to_csv(out_dir / "loss_curves.csv", index=False)
    samples_table(sample_paths).to_csv(out_dir / "samples.csv", index=False)
    (out_dir / "environment.json").write_text(json.dumps(environment(metrics_paths), indent=2) + "\n")
    logger.info("%d runs -> %s", len(runs), out_dir / "runs.csv")
    return runs


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        [Path(p) for p in smk.input.metrics],
        [Path(p) for p in smk.input.checks],
        Path(smk.input.perplexity),
        Path(smk.input.perplexity_examples),
        [Path(p) for p in smk.input.samples],
        Path(smk.output.runs).parent,
        Path(smk.log[0]),
    )
    write_manifest(smk, "tables", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="a results_dir")
    a = parser.parse_args()
    tables = a.results / "tables"
    metrics = sorted((a.results / "train").glob("*/metrics.json"))
    checks = [a.results / "merged" / m.parent.name / "merge_check.json" for m in metrics]
    samples = sorted((a.results / "samples").glob("*/*.jsonl"))
    main(metrics, checks, tables / "perplexity.csv", tables / "perplexity_examples.csv.gz", samples, tables)
