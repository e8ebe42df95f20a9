"""bench/epochs.py on the CPU: the rows it prepares, its table, and one tiny run end to end."""

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def batch_spread(lengths: list[int], batch: int) -> float:
    return statistics.fmean(
        max(lengths[i : i + batch]) - min(lengths[i : i + batch]) for i in range(0, len(lengths), batch)
    )


def test_prepare_orders_the_real_rows(rows_dir):
    b1, b4 = (json.loads((rows_dir / f"rows_b{b}.json").read_text()) for b in (1, 4))
    for rows in (b1, b4):
        assert len(rows["input_ids"]) == len(rows["order"]) == 1000
        assert sorted(rows["order"]) == list(range(1000))  # every row once
        assert all(0 < len(ids) <= 1024 for ids in rows["input_ids"])
        assert all(3 <= i < 32000 for ids in rows["input_ids"] for i in ids)
        assert rows["tokenizer"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
        assert len(rows["tokenizer_json_sha256"]) == len(rows["source_sha256"]) == 64
    # The same rows, tokenized once: row i has the same ids in both files.
    by_row = dict(zip(b1["order"], b1["input_ids"], strict=True))
    assert all(by_row[i] == ids for i, ids in zip(b4["order"], b4["input_ids"], strict=True))
    assert sum(len(ids) >= 1024 for ids in b4["input_ids"]) > 0  # some rows were truncated
    lengths = [len(ids) for ids in b4["input_ids"]]
    shuffled = random.Random(0).sample(lengths, len(lengths))
    assert batch_spread(lengths, 4) < batch_spread(shuffled, 4) / 5  # grouped by length
    assert lengths[0] == max(lengths)  # transformers puts the longest batch first
    assert (rows_dir / "tokenizer" / "tokenizer.json").is_file()


def child(
    recipe: str, job: str, tokens_per_second: float | None, losses=None, status="ok", repeat=0, reserved=10.5
) -> dict:
    measured = status == "ok"
    return {
        "recipe": recipe,
        "job": job,
        "repeat": repeat,
        "status": status,
        "epoch_seconds": (1000 / tokens_per_second if measured and job != "block_2048x4" else None),
        "tokens_per_second": tokens_per_second,
        "steady_tokens_per_second": tokens_per_second,
        "peak_allocated_gib": 10.0 if measured else None,
        "peak_reserved_gib": reserved if measured else None,
        "predicted_peak_gib": 11.0 if measured else None,
        "steps": 250 if measured else None,
        "tokens": 1000 if measured else None,
        "losses": losses,
        # an epoch's steps: the first START_STEPS slower (set-up), the rest at its rate
        "step_seconds": [0.5] * 50 + [250 / tokens_per_second] * 200 if measured and job != "block_2048x4" else None,
    }


def test_summarise_ratios_loss_gap_and_not_run_rows():
    import epoch_table

    results = [
        child("tutorial", "epoch_b4", 1000.0, [10.0, 9.0]),
        child("pipeline", "epoch_b4", 2500.0, [10.0, 9.25]),
        child("reference", "epoch_b4", 2000.0, [10.0, 9.0, 8.0]),
        child("unsloth", "epoch_b4", None, status="not run: /tmp/unsloth-site is missing"),
        child("tutorial", "block_2048x4", 3000.0, repeat=0),
        child("pipeline", "block_2048x4", 6000.0, repeat=0),
        child("tutorial", "block_2048x4", 3200.0, repeat=1),
        child("pipeline", "block_2048x4", 6600.0, repeat=1, reserved=12.25),
    ]
    results[1]["step_seconds"] = [2.0] * 50 + [0.0625] * 200  # a slow start, then 4x the tutorial's steps
    table = {(r["recipe"], r["job"]): r for r in epoch_table.summarise(results)}
    assert list(table["pipeline", "epoch_b4"])[: len(epoch_table.TABLE_KEYS)] == list(epoch_table.TABLE_KEYS)
    assert table["pipeline", "block_2048x4"]["peak_reserved_gib"] == 12.25  # the larger of the repeats
    assert table["pipeline", "epoch_b4"]["vs_tutorial"] == 2.5
    assert table["tutorial", "epoch_b4"]["vs_tutorial"] == 1.0
    assert table["pipeline", "epoch_b4"]["loss_max_abs_diff_vs_reference_50"] == 0.25
    assert table["tutorial", "epoch_b4"]["loss_max_abs_diff_vs_reference_50"] == 0.0
    assert table["reference", "epoch_b4"]["loss_max_abs_diff_vs_reference_50"] is None
    assert table["pipeline", "epoch_b4"]["epoch_seconds"] == 0.4
    # steps 50+: 200 x 0.25 s against 200 x 0.0625 s; the first 50 left out
    assert table["tutorial", "epoch_b4"]["after_start_seconds"] == 50.0
    assert table["pipeline", "epoch_b4"]["after_start_seconds"] == 12.5
    assert table["pipeline", "epoch_b4"]["vs_tutorial_after_start"] == 4.0  # the whole epoch's: 2.5
    unsloth = table["unsloth", "epoch_b4"]
    assert unsloth["status"] == "not run: /tmp/unsloth-site is missing"
    assert unsloth["tokens_per_second"] is unsloth["epoch_seconds"] is unsloth["vs_tutorial"] is None
    block = table["pipeline", "block_2048x4"]
    assert block["tokens_per_second"] == 6300.0 and block["repeats"] == 2  # the median of two repeats
    assert block["vs_tutorial"] == round(6300 / 3100, 2) and block["epoch_seconds"] is None
    assert block["loss_max_abs_diff_vs_reference_50"] is None  # no reference row for blocks
    assert block["vs_tutorial_after_start"] is None and block["after_start_seconds"] is None
    report = {"device": "cpu", "command": "python bench/epochs.py run", "versions": {}, "table": list(table.values())}
    text = epoch_table.markdown(report)
    assert "| unsloth | epoch_b4 | 4 | - | - | - | - | - | - | - | - | not run: /tmp/unsloth-site is missing |" in text
    assert "| 2.03 | - | 10.0 | 12.25 | 11.0 |" in text  # blocks: no steps 50+; allocated, reserved, predicted
    assert "| pipeline | epoch_b4 | 4 | 0.4 | 2,500 (2,500) | 2.5 | 4.0 |" in text
    assert "| x tutorial | x tutorial, steps 50+ |" in text


def test_an_overlay_variant_is_its_train_settings_and_cell_keys(tmp_path):
    """--variant NAME:@OVERLAY.yaml: the overlay's train section but the batch size (the job's) and
    its grid's single-valued cell keys, KEY=VALUE after it over them; a missing file or a grid key
    of several values is refused."""
    import epoch_recipes

    config = PROJECT / "config"
    lean = f"lean:@{config / 'lean.yaml'},memory_budget_gib=5.75"
    specs = epoch_recipes.recipe_specs([], {"memory_budget_gib": 8}, [f"b4:@{config / 'batch4.yaml'}", lean])
    assert specs["b4"] == (
        "pipeline",
        dict(
            memory_budget_gib=8,  # --pipeline-train's, under the overlay
            pad_to_multiple_of=64,
            cuda_graphs_capture="ahead",
            cuda_graphs_loop_ahead=2,
            cuda_graphs_coarse_multiple=128,
            cuda_graphs_coarse_steps=100,
            cuda_graphs_headroom=1.02,
        ),
    )
    lean = specs["lean"][1]
    assert lean["double_quant"] is True and lean["offload_checkpoints"] is True and "batch_size" not in lean
    assert lean["memory_budget_gib"] == 5.75  # the variant's key over the overlay's 4.84
    with pytest.raises(SystemExit, match=r"--variant overlay missing\.yaml is not a file"):
        epoch_recipes.recipe_specs([], {}, ["x:@missing.yaml"])
    two = tmp_path / "two.yaml"
    two.write_text("grid:\n  double_quant: [true, false]\n")
    with pytest.raises(SystemExit, match=r"grid\.double_quant must be a list of one value"):
        epoch_recipes.recipe_specs([], {}, [f"x:@{two}"])
    two.write_text("grid:\n  double_quant: true\n")  # not a grid axis (a list)
    with pytest.raises(SystemExit, match=r"grid\.double_quant must be a list of one value"):
        epoch_recipes.recipe_specs([], {}, [f"x:@{two}"])


def test_tiny_run_trains_every_recipe_on_the_same_rows(rows_dir, tmp_path):
    """The run command end to end on a 2-layer Llama: the tutorial's and the pipeline's code
    paths, the file's order, the loss gap; rows cut to 64 tokens to keep it short."""
    short = tmp_path / "rows"
    short.mkdir()
    (short / "tokenizer").symlink_to(rows_dir / "tokenizer")
    rows = json.loads((rows_dir / "rows_b1.json").read_text())
    rows["input_ids"] = [ids[:64] for ids in rows["input_ids"]]
    (short / "rows_b1.json").write_text(json.dumps(rows))
    out = tmp_path / "result"
    command = [sys.executable, str(PROJECT / "bench" / "epochs.py"), "run", "--rows-dir", str(short)]
    command += ["--shape", "tiny", "--model-dir", str(tmp_path / "model"), "--jobs", "seed_epoch_b1"]
    command += ["--recipes", "tutorial", "reference", "unsloth", "--steps", "2", "--out", str(out)]
    # config/lean.yaml as a variant: a cell key (double quantisation) and offloaded checkpoints, as
    # the memory rows run (stock kernels on a CPU, for every pipeline recipe)
    command += ["--variant", f"lean:@{PROJECT / 'config' / 'lean.yaml'}", "--pipeline-train", "kernels=none"]
    # An unsloth layer without unsloth: bench/unsloth_row.py runs and reports its own not-run row.
    env = dict(os.environ, UNSLOTH_SITE=str(tmp_path / "unsloth-site"))
    (tmp_path / "unsloth-site").mkdir()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    table = {r["recipe"]: r for r in report["table"]}
    for recipe in ("tutorial", "reference"):
        assert table[recipe]["status"] == "ok", table[recipe]["status"]
        assert table[recipe]["steps"] == 2 and table[recipe]["tokens"] == 128
        # Two steps of an epoch: its speed, but no epoch time and no ratio to a whole epoch.
        assert table[recipe]["capped_at_step"] == 2 and table[recipe]["epoch_seconds"] is None
        assert table[recipe]["tokens_per_second"] > 0 and table[recipe]["vs_tutorial"] is None
    assert table["unsloth"]["status"].startswith("not run: ") and "unsloth" in table["unsloth"]["status"]
    lean, reference = ({r["recipe"]: r for r in report["rows"]}[name] for name in ("lean", "reference"))
    assert lean["status"] == "ok" and lean["double_quant"] and lean["offload_checkpoints"]
    assert not reference["double_quant"] and not reference["offload_checkpoints"]
    # every row, the not-run one too, names the machine it ran on (sittings differ by machine)
    assert {(r["hardware"]["cpu_count"], r["hardware"]["gpu_name"]) for r in report["rows"]} == {(os.cpu_count(), None)}
    # Same initial adapter, same rows: fp16 without autocast vs fp32 on the CPU differ only by rounding.
    losses = [r["losses"] for r in report["rows"] if r["status"] == "ok"]
    assert all(len(x) == 2 for x in losses)
    assert losses[0][0] != losses[0][1]  # two different rows
    assert table["tutorial"]["loss_max_abs_diff_vs_reference_50"] < 1e-3
    # --steps stops inside the whole epoch's schedule: warm-up over 3 % of 1000 steps, not of 2.
    assert all(0 < r["learning_rates"][1] < 2e-4 * 2 / 30 for r in report["rows"] if r["status"] == "ok")
    assert "SmolLM2-135M-Instruct" in out.with_suffix(".md").read_text()
    # The epoch's seconds outside its steps add up with the steps to train()'s wall time (on a CPU
    # every mark is the host's clock; each part rounded to 0.1 ms).
    for row in (r for r in report["rows"] if r["status"] == "ok"):
        outside = row["outside_steps"]
        assert set(outside) == {
            "before_train_begin",
            "before_first_step",
            "between_steps",
            "longest_gap",
            "after_last_step",
            "after_epoch_end",
            "after_train_end",
        }
        assert all(value >= 0 for value in outside.values()) and outside["longest_gap"] <= outside["between_steps"]
        assert outside["after_epoch_end"] <= outside["after_last_step"]  # a part of it
        parts = sum(row["step_seconds"]) + sum(
            v for k, v in outside.items() if k not in ("longest_gap", "after_epoch_end")
        )
        assert abs(parts - row["train_seconds"]) < 0.02, (parts, row["train_seconds"], outside)


def test_block_rows_are_measured_by_their_median_step(tmp_path, rows_dir):
    """A block row recorded with tokens over the whole run (first-step compilation included)
    is completed on the CPU as every block row is measured: the median step after warm-up."""
    import epoch_results

    step_seconds = [3.25, 0.71, 0.74, 0.70, 0.72, 0.71, 0.73, 0.70]
    row = dict(recipe="unsloth", kind="unsloth", job="block_2048x4", batch=4, status="ok", steps=8, tokens=65536)
    row.update(epoch_seconds=10.6, tokens_per_second=6183.1, step_seconds=step_seconds, peak_allocated_gib=5.754)
    import epochs

    report = dict(command="python bench/epochs.py run", device="cpu", versions={}, rows=[row])
    report["rows_files"] = epochs.rows_summary(rows_dir)
    results = tmp_path / "epochs"
    results.with_suffix(".json").write_text(json.dumps(report))
    done = epoch_results.main(results, rows_dir, False, [], PROJECT / "config" / "llama2-7b.yaml")
    (table,) = done["table"]
    assert table["epoch_seconds"] is None
    assert table["tokens_per_second"] == round(2048 * 4 / 0.71, 1)  # the median of the steps after 3
    assert "unsloth block_2048x4: tokens_per_second 6183.1" in done["completed_on_cpu"][0]


def test_memory_peak_replays_the_allocator_history_to_its_peak():
    """bench/memory_peak.py: the level after each event (allocations up, free requests down),
    the peak, and the blocks live there by their innermost frames outside torch."""
    import memory_peak

    def frames(*names):  # an installation whose own path contains "/torch/"
        return [{"filename": f"/opt/torch/site-packages/{n}", "line": 1, "name": n.split("/")[-1][:-3]} for n in names]

    trace = [
        dict(action="alloc", addr=1, size=100, frames=frames("torch/nn/functional.py", "peft/lora.py")),
        dict(action="alloc", addr=2, size=50, frames=frames("trl/utils.py")),
        dict(action="free_requested", addr=1, size=100),
        dict(action="free_completed", addr=1, size=100),
        dict(action="alloc", addr=3, size=80, frames=frames("peft/lora.py"), user_metadata="step 0"),
        dict(action="alloc", addr=4, size=30, frames=frames("peft/lora.py"), user_metadata="step 1"),
        dict(action="free_requested", addr=9, size=40),  # a block allocated before the recording
    ]
    gib = 1024**3
    scaled = [dict(e, size=e["size"] * gib // 1000) for e in trace]
    breakdown = memory_peak.peak_breakdown({"device_traces": [scaled]}, baseline=10 * gib // 1000)
    # levels: 110, 160, 60, 60, 140, 170 (peak), 130
    assert breakdown["peak_gib"] == round(170 * (gib // 1000) / gib, 3)
    assert breakdown["peak_event"] == 5
    assert [(s["site"], s["blocks"]) for s in breakdown["by_site"]] == [
        ("peft/lora.py:1:lora", 2),
        ("trl/utils.py:1:utils", 1),
    ]
    assert breakdown["traced_live_at_peak_gib"] == round(160 * (gib // 1000) / gib, 3)
    # each site's blocks by size and by the step that allocated them (untagged: before the first)
    lora = breakdown["by_site"][0]
    assert lora["sizes"] == {str(80 * gib // 1000): 1, str(30 * gib // 1000): 1}
    assert lora["allocated_in"] == {"step 0": 1, "step 1": 1}
    assert breakdown["by_site"][1]["allocated_in"] == {"untagged": 1}
