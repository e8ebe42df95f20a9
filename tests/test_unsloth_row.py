"""bench/unsloth_row.py keeps its row when unsloth cannot run (here: not installed, or no GPU)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "unsloth_row.py"
ROW = dict(model_dir="/nonexistent", seq=64, batch=1, steps=2, learning_rate=2e-4, lr_scheduler="constant")
ROW.update(warmup_ratio=0.03, max_grad_norm=0.3, weight_decay=0.001, optimizer="paged_adamw_32bit", lora_r=64)
ROW.update(lora_alpha=16, lora_dropout=0.1, targets="qv", seed=1, gradient_checkpointing="unsloth", loss_steps=50)


def row_of(row: dict) -> dict:
    done = subprocess.run([sys.executable, SCRIPT, "--row", json.dumps(row)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    assert len(lines) == 1 and done.stdout.rstrip().endswith(lines[0]), done.stdout
    return json.loads(lines[0][4:])


def test_without_unsloth_or_gpu_the_row_says_why():
    result = row_of(ROW)
    assert result["recipe"] == "unsloth"
    # ModuleNotFoundError: No module named 'unsloth', or unsloth's own "cannot find any torch accelerator"
    assert result["status"].startswith("not run: ") and "unsloth" in result["status"].lower(), result
    assert set(result["versions"]) >= {"unsloth", "unsloth_zoo", "trl", "transformers", "torch", "xformers", "torchao"}
    assert result["versions"]["torch"] != "absent"


def test_a_row_lacking_keys_names_them():
    result = row_of({k: v for k, v in ROW.items() if k not in ("seed", "seq")})
    assert result["status"] == "not run: the row lacks ['seed', 'rows_file']"


def test_epochs_count_wall_time_and_blocks_their_median_step():
    sys.path.insert(0, str(SCRIPT.parent))
    import unsloth_row

    steps = [3.25, 0.71, 0.74, 0.70, 0.72, 0.71, 0.73, 0.70]
    epoch = unsloth_row.tokens_per_second({"rows_file": "rows_b1.json", "batch": 1}, 460720, 390.35, steps)
    assert epoch == 460720 / 390.35
    block = unsloth_row.tokens_per_second({"seq": 2048, "batch": 4}, 65536, 10.6, steps)
    assert block == 2048 * 4 / 0.71  # the first step's compilation and two more warm-up steps left out
