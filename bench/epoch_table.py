"""The epoch bench's results: one table row per (recipe, job) and its markdown (bench/epochs.py
writes them after every row; bench/epoch_results.py after completing a file on the CPU)."""

import json
import statistics
from pathlib import Path

from epoch_rows import JOBS

LOSS_STEPS = 50  # the first losses compared with the reference recipe's
# An epoch's start: its first recordings and one-time set-up (Triton's and CUDA's first loads) fall
# in the first steps; the ratio of the steps after them says what the recipe's steps gain alone.
START_STEPS = 50
TABLE_KEYS = ("recipe", "job", "batch", "epoch_seconds", "tokens_per_second", "vs_tutorial")
TABLE_KEYS += ("peak_allocated_gib", "peak_reserved_gib", "predicted_peak_gib", "status")
COLUMNS = {"recipe": "recipe", "job": "job", "batch": "batch", "epoch_seconds": "epoch s", "speed": "tok/s (runs)"}
COLUMNS.update(vs_tutorial="x tutorial", vs_tutorial_after_start=f"x tutorial, steps {START_STEPS}+")
COLUMNS.update(peak_allocated_gib="peak alloc GiB", peak_reserved_gib="peak reserved GiB")
COLUMNS.update(predicted_peak_gib="predicted GiB (alloc)")
COLUMNS.update(loss_max_abs_diff_vs_reference_50="loss gap vs reference (50 steps)", status="status")


def after_start_seconds(result: dict) -> float | None:
    """A whole epoch's seconds after its first START_STEPS steps (None: a block row or a capped run)."""
    steps = result.get("step_seconds") or []
    if result.get("epoch_seconds") is None or result.get("capped_at_step") or len(steps) <= START_STEPS:
        return None
    return sum(steps[START_STEPS:])


def summarise(results: list[dict]) -> list[dict]:
    """One row per (recipe, job): the median over repeats; ratios to the tutorial of the job (of
    the whole epoch, and of its steps after the first START_STEPS); the first losses' largest gap
    to the reference recipe of the job."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["recipe"], r["job"]), []).append(r)
    table = []
    for (recipe, job), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]

        def median(key, ok=ok):
            values = [r[key] for r in ok if r.get(key) is not None]
            return round(statistics.median(values), 2) if values else None

        first = ok[0] if ok else {}
        peaks = [r["peak_allocated_gib"] for r in ok if r.get("peak_allocated_gib") is not None]
        reserved = [r["peak_reserved_gib"] for r in ok if r.get("peak_reserved_gib") is not None]
        row = dict(recipe=recipe, job=job, batch=JOBS[job]["batch"], epoch_seconds=median("epoch_seconds"))
        row.update(tokens_per_second=median("tokens_per_second"), vs_tutorial=None)
        row.update(
            peak_allocated_gib=max(peaks) if peaks else None, peak_reserved_gib=max(reserved) if reserved else None
        )
        row["predicted_peak_gib"] = first.get("predicted_peak_gib")
        row.update(status="ok" if ok else runs[0]["status"], steps=first.get("steps"), tokens=first.get("tokens"))
        after_start = [t for t in map(after_start_seconds, ok) if t is not None]
        row.update(after_start_seconds=round(statistics.median(after_start), 2) if after_start else None)
        row.update(vs_tutorial_after_start=None)
        row.update(steady_tokens_per_second=median("steady_tokens_per_second"), loss_max_abs_diff_vs_reference_50=None)
        row.update(repeats=len(ok), runs_tokens_per_second=[r["tokens_per_second"] for r in ok])
        row["capped_at_step"] = first.get("capped_at_step")
        table.append(dict(row, losses=first.get("losses")))
    for row in table:
        same = {t["recipe"]: t for t in table if t["job"] == row["job"]}
        tutorial, reference = same.get("tutorial"), same.get("reference")
        comparable = not row.get("capped_at_step") and tutorial and not tutorial.get("capped_at_step")
        if comparable and tutorial["tokens_per_second"] and row["tokens_per_second"]:
            row["vs_tutorial"] = round(row["tokens_per_second"] / tutorial["tokens_per_second"], 2)
        if comparable and tutorial["after_start_seconds"] and row["after_start_seconds"]:
            row["vs_tutorial_after_start"] = round(tutorial["after_start_seconds"] / row["after_start_seconds"], 2)
        if reference and reference is not row and reference["losses"] and row["losses"]:
            pairs = zip(row["losses"][:LOSS_STEPS], reference["losses"][:LOSS_STEPS], strict=False)
            row["loss_max_abs_diff_vs_reference_50"] = round(max(abs(a - b) for a, b in pairs), 6)
    for row in table:
        del row["losses"]
    return table


def row_shape(row: dict) -> str:
    """The model shape a row trained (bench/epochs.py SHAPES; rows before it was recorded name it
    by their model folder, the 7B shape's by default)."""
    if "shape" in row:
        return row["shape"]
    return "smollm2" if "smollm2" in Path(row.get("model_dir", "")).name else "7b"


def markdown(report: dict) -> str:
    rows = report.get("rows_files", {})
    shapes = {row_shape(row) for row in report.get("rows", [])}
    shape = "SmolLM2-135M shape" if shapes == {"smollm2"} else "Llama-2-7B shape"
    lines = [f"Card: {report['device']}. {shape}, random weights, QLoRA q/v r64, lr 2e-4.", ""]
    lines += ["| " + " | ".join(COLUMNS.values()) + " |", "|---" * len(COLUMNS) + "|"]
    for r in report["table"]:
        runs = ", ".join(f"{t:,.0f}" for t in r["runs_tokens_per_second"])
        cells = dict(r, speed=f"{r['tokens_per_second']:,.0f} ({runs})" if r["tokens_per_second"] else None)
        lines.append("| " + " | ".join("-" if cells[k] is None else str(cells[k]) for k in COLUMNS) + " |")
    lines += ["", f"Command: `{report['command']}`", "", f"Versions: {json.dumps(report['versions'])}"]
    if rows:
        lines.append(
            f"Row lengths: {rows['rows']} rows, {rows['tokens']:,} tokens (median {rows['median_length']}), "
            f"tokenized with {rows['tokenizer']} (tokenizer.json sha256 {rows['tokenizer_json_sha256'][:12]}), "
            f"ids mapped by {rows['vocab_map']}, truncated at {rows['max_length']}."
        )
    lines += [f"Note: {note}" for note in report.get("notes", [])]
    lines += [
        f"Completed on the CPU afterwards (bench/epoch_results.py): {note}"
        for note in report.get("completed_on_cpu", [])
    ]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    report["table"] = summarise(report["rows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
