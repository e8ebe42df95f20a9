"""Completes a measured bench/epochs.py results file on the CPU, and says what it changed.

- ``--replan``: every measured row's prediction recomputed where the code now predicts
  another (``--why`` says what changed; first: the every-layer prediction at the longest row,
  recorded before the run kept the plan's own): an epoch with the per-batch checkpointing
  plan replays the same CheckpointPlan on the same rows in the same order (a pure function of
  the shape, the config and the rows); other rows, the memory model at their longest batch.
- Block rows (2048 x 4) of unsloth recorded before its row measured them as every other block
  row does: tokens/s of the median step after warm-up (the recorded step times), no epoch time.
- ``--not-run RECIPE:JOB:REASON``: a row for a (recipe, job) the call could not measure, so
  the table keeps every goal's row with the reason.

    python bench/epoch_results.py bench/results/epochs_h200 --rows-dir .carry/epochs --replan \\
        --not-run "unsloth:epoch_b4:result lost to a bench bug, fixed since"
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "scripts")]
from epoch_recipes import CELL_KEYS, split_cell_keys  # noqa: E402
from epoch_rows import JOBS  # noqa: E402
from epoch_table import row_shape, write  # noqa: E402
from epochs import SHAPES, WARMUP  # noqa: E402
from gpu_recipes import bench_cell  # noqa: E402
from memory_model import REVISION  # noqa: E402
from train_metrics import median_step_tokens_per_second  # noqa: E402

GIB = 1024**3
REPLAN_WHY = "every layer at the longest row -> the per-batch plan's largest prediction, replanned on the CPU"


def planned_peak_gib(
    batches: list[tuple[int, int]],
    train: dict,
    model_config: Path,
    folded_dropouts: bool = False,
    graph_peak_factor: float | None = None,
    overrides: dict | None = None,
    revision: int = REVISION,
    planned_capture: str | None = None,
) -> tuple[float, dict[int, int]]:
    """The plan's largest prediction over ``batches`` ((rows, padded length) per step), with the
    row's own LoRA dropout layout, graph headroom and train ``overrides`` (a variant's budget,
    offloading): the config may have changed since; rows before the headroom existed had none.
    A row measured under an earlier ``revision`` of the memory model is planned by it (the layers
    it ran) and predicted by this one; so is a row whose plan counted the cuBLAS workspaces of
    another ``planned_capture`` (revision 4's first sitting counted 6 for any recorded run).
    Also returns the steps per number of checkpointed layers."""
    from checkpointing import CheckpointPlan
    from memory_model import predict_peak

    cell_keys, train_overrides = split_cell_keys(overrides or {})
    train = {**train, "recompute_lora_dropout": folded_dropouts, **train_overrides}
    plan = CheckpointPlan([], model_config, dict(bench_cell(), **cell_keys), train, "liger")
    plan.graph_peak_factor = graph_peak_factor or 1.0
    recipe = plan.recipe
    if revision < 2:  # revision 1 counted a recomputed layer beside every whole one
        plan.recipe = dict(plan.recipe, recompute_beside_whole=True)
    if revision < 3:  # revisions 1 and 2 counted a layer offloaded to the host as a recomputed one
        plan.recipe = dict(plan.recipe, offload_every=0)
    if revision < 4:  # revisions 1-3 counted neither the fused head's tile nor cuBLAS's workspaces
        plan.recipe = dict(plan.recipe, fixed_buffers=False)
    if revision < 5:  # revisions 3-4 counted the offloading forward's peak without its extras
        plan.recipe = dict(plan.recipe, forward_extras=False)
    if planned_capture:
        plan.recipe = dict(plan.recipe, graph_capture=planned_capture)
    for rows, seq in batches:
        plan.count(rows, seq)
    peak = plan.predicted_peak_bytes()
    if revision < REVISION or planned_capture:  # the layers the old plan chose, each predicted by this one
        # the graph headroom of revisions 1-3 held what revision 4 counts: their rows' predictions without it
        headroom = plan.graph_peak_factor if revision >= 4 else 1.0
        peak = 0
        for (rows, seq), layers in plan.chosen.items():
            recorded = plan.recorded(rows, seq)
            shape = dict(seq=seq, batch=rows, recorded=recorded, checkpoint_every=0, checkpointed_layers=layers)
            total = predict_peak(plan.shape, **shape, **recipe)["total"]
            peak = max(peak, int(total * (headroom if recorded else 1.0)))
    return round(peak / GIB, 3), dict(sorted(plan.steps_by_layers.items()))


def padded_batches(rows_file: Path, batch: int, multiple: int) -> list[tuple[int, int]]:
    """(rows, padded length) of every step over the rows file, padded as the trainer pads."""
    ids = json.loads(rows_file.read_text())["input_ids"]
    steps = (ids[start : start + batch] for start in range(0, len(ids), batch))
    return [(len(rows), math.ceil(max(map(len, rows)) / multiple) * multiple) for rows in steps]


def replayed_plan(row: dict, rows_dir: Path, config: Path, model_config: Path) -> tuple[float, dict[int, int]] | None:
    """A row trained with the per-batch plan, replayed over its batches (an epoch's rows, or its
    one block shape): its largest prediction and the steps per number of checkpointed layers
    (None for a row without the plan)."""
    if not (row.get("checkpoint_steps_by_every") or row.get("checkpoint_steps_by_layers")):
        return None
    train = yaml.safe_load(config.read_text())["train"]
    # rows before checkpoint_plan ran layers 0, k, 2k, ... (and recorded steps by k)
    train["checkpoint_plan"] = row.get("checkpoint_plan") or "every"
    # the layers it kept whole in host memory (rows before train.offload_layers kept none)
    train["offload_layers"] = (row.get("offload_layers") or {}).get("every", 0)
    if "rows" in JOBS[row["job"]]:
        multiple = {**train, **memory_overrides(row)}["pad_to_multiple_of"]
        batches = padded_batches(rows_dir / JOBS[row["job"]]["rows"], row["batch"], multiple or 1)
        batches = batches[: row.get("capped_at_step") or len(batches)]  # a --steps row: its first batches
    else:
        batches = [(row["predicted_for"]["batch"], row["predicted_for"]["seq"])]
    folded, revision = bool(row.get("folded_lora_dropouts")), row.get("memory_model_revision", 1)
    return planned_peak_gib(
        batches,
        train,
        model_config,
        folded,
        row.get("graph_peak_factor"),
        memory_overrides(row),
        revision,
        row.get("planned_graph_capture"),
    )


def row_prediction_gib(row: dict, rows_dir: Path, config: Path, model_config: Path) -> float:
    """A measured row's prediction, recomputed: a row trained with the per-batch plan replays
    the plan (replayed_plan); any other row, the memory model at its longest batch."""
    from gpu_recipes import prediction_recipe
    from memory_model import predict_peak
    from model_shape import ModelShape

    replayed = replayed_plan(row, rows_dir, config, model_config)
    if replayed:
        return replayed[0]
    # the row records what the prediction reads (folded dropouts, offloading, double quantisation)
    shape = dict(row, **row["predicted_for"], recipe="tutorial" if row["kind"] == "tutorial" else "pipeline")
    recipe = prediction_recipe(dict(shape, method="qlora", targets="qv"), row["kernels"])
    total = predict_peak(ModelShape.from_config(model_config), checkpoint_every=row["checkpoint_every"], **recipe)
    return round(total["total"] / GIB, 3)


def shape_configs(folder: Path) -> dict[str, Path]:
    """Each bench shape's config.json, written once into ``folder`` (a row's: ``[row_shape(row)]``)."""
    configs = {}
    for name, config in SHAPES.items():
        configs[name] = folder / f"{name}-shape.config.json"
        configs[name].write_text(json.dumps(config))
    return configs


def memory_overrides(row: dict) -> dict:
    """A variant row's settings the memory plan reads (its budget, offloading and how the inputs
    came back, which batches it records, how it pads them, quantisation, optimizer)."""
    keys = ("memory_budget_gib", "offload_checkpoints", "cuda_graphs", "cuda_graphs_max_tokens", "pad_to_multiple_of")
    keys += ("cuda_graphs_capture", "cublas_workspace_config") + CELL_KEYS  # the workspaces revision 4 counts
    overrides = {k: v for k, v in row.get("train", {}).items() if k in keys}
    if row.get("offload_checkpoints"):  # how its inputs came back (in line in the rows before prefetching)
        overrides["offload_prefetch"] = bool(row.get("offload_prefetch"))
    if row.get("optimizer"):  # the optimizer it ran (a paged one's state is outside the allocator's peak)
        overrides["optimizer"] = row["optimizer"]
    graphs = row.get("cuda_graphs") or {}
    if graphs.get("enabled") and "cuda_graphs_max_tokens" not in overrides:
        # The config's limit as the row ran with it, named by the batches it left eager; where it
        # left none, no batch reached it and no limit plans the same (the shipped value moves).
        limits = [re.search(r"cuda_graphs_max_tokens \((\d+)\)", reason) for reason in graphs.get("eager_reasons", {})]
        overrides["cuda_graphs_max_tokens"] = next((int(m.group(1)) for m in limits if m), None)
    return overrides


def main(results: Path, rows_dir: Path, replan: bool, not_run: list[str], config: Path, why: str = REPLAN_WHY) -> dict:
    report = json.loads(results.with_suffix(".json").read_text())
    notes = report.setdefault("completed_on_cpu", [])
    if replan:
        configs = shape_configs(results.parent)
        for row in report["rows"]:
            if row.get("status") == "ok" and row["kind"] != "unsloth":
                was = row["predicted_peak_gib"]
                row["predicted_peak_gib"] = row_prediction_gib(row, rows_dir, config, configs[row_shape(row)])
                note = f"{row['recipe']} {row['job']}: predicted_peak_gib {was} -> {row['predicted_peak_gib']} ({why})"
                if row["predicted_peak_gib"] != was and note not in notes:  # once for the runs of a row
                    notes.append(note)
        for path in configs.values():
            path.unlink()
    examples = report["rows_files"]["rows"]  # every job trains the same rows, in its own order
    for row in report["rows"]:  # runs before capped_at_step was recorded: a capped epoch row has no epoch time
        if "rows" in JOBS[row["job"]] and row.get("status") == "ok" and "capped_at_step" not in row:
            row["capped_at_step"] = row["steps"] if row["steps"] < math.ceil(examples / row["batch"]) else None
            if row["capped_at_step"]:
                notes.append(
                    f"{row['recipe']} {row['job']}: {row['steps']} steps of the epoch (its loss yardstick): no epoch time, no ratio"
                )
                row["epoch_seconds"] = None
    for row in report["rows"]:
        if "rows" not in JOBS[row["job"]] and row.get("epoch_seconds") is not None and row.get("step_seconds"):
            was, job = row["tokens_per_second"], JOBS[row["job"]]
            speed = median_step_tokens_per_second(row["step_seconds"], job["seq"] * job["batch"], WARMUP)
            row.update(epoch_seconds=None, tokens_per_second=round(speed, 1))
            notes.append(
                f"{row['recipe']} {row['job']}: tokens_per_second {was} (tokens over the whole run, first-step "
                f"compilation included) -> {row['tokens_per_second']} (the median step after {WARMUP}, as every "
                "block row); no epoch time"
            )
    for item in not_run:
        recipe, job, reason = item.split(":", 2)
        report["rows"].append(dict(recipe=recipe, job=job, batch=JOBS[job]["batch"], status=f"not run: {reason}"))
        notes.append(f"{recipe} {job}: not run: {reason}")
    write(report, results)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="OUT prefix of a bench/epochs.py run (OUT.json, OUT.md)")
    parser.add_argument("--rows-dir", type=Path, required=True)
    parser.add_argument("--replan", action="store_true")
    parser.add_argument("--not-run", action="append", default=[], metavar="RECIPE:JOB:REASON")
    parser.add_argument("--config", type=Path, default=BENCH.parent / "config" / "llama2-7b.yaml")
    parser.add_argument("--why", default=REPLAN_WHY, help="--replan: what changed, for the note")
    a = parser.parse_args()
    for note in main(a.results, a.rows_dir, a.replan, a.not_run, a.config, a.why)["completed_on_cpu"]:
        print(note)
