"""Train real grid cells of config/smollm2-full.yaml on a GPU, LoRA vs QLoRA, through the
pipeline's own scripts (init_adapter.py, train.py), and tabulate memory and speed.

The model has SmolLM2-135M-Instruct's exact shape and tokenizer with random bf16 weights
(its 98 MB GGUF does not fit one device-tool transfer): memory and tokens/s equal the
real checkpoint's, the loss values do not. Arms run interleaved and repeated (A B A B)
in fresh processes; the table reports every run and the per-arm median.

    python bench/gpu_train_cells.py --shape-dir DIR --train-file train.jsonl --out OUT
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

PROJECT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def random_model(shape_dir: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_dir), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out_dir)


def run_cell(method: str, config: Path, args, model_dir: Path, init_dir: Path, out_dir: Path) -> dict:
    command = [
        sys.executable,
        str(PROJECT / "scripts" / "train.py"),
        "--config",
        str(config),
        "--model-dir",
        str(model_dir),
        "--train-file",
        str(args.train_file),
        "--init-adapter",
        str(init_dir),
        "--out-dir",
        str(out_dir),
        "--method",
        method,
        "--seed",
        "1",
        "--max-steps",
        str(args.max_steps),
        "--threads",
        "8",
    ]
    subprocess.run(command, check=True)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    with (out_dir / "loss_curve.csv").open() as handle:
        metrics["loss_curve"] = [float(row["loss"]) for row in csv.DictReader(handle)]
    return metrics


def main(shape_dir: Path, train_file: Path, configs: list[Path], out: Path, max_steps: int, repeats: int) -> None:
    work = Path("/tmp/gpu_cells")
    model_dir, init_dir = work / "model", work / "init_adapter"
    random_model(shape_dir, model_dir)
    grid = yaml.safe_load(configs[0].read_text())["grid"]
    subprocess.run(
        [
            sys.executable,
            str(PROJECT / "scripts" / "init_adapter.py"),
            "--model-dir",
            str(model_dir),
            "--out-dir",
            str(init_dir),
            "--lora-r",
            str(grid["lora_r"][0]),
            "--lora-alpha",
            str(grid["lora_alpha"][0]),
            "--lora-dropout",
            str(grid["lora_dropout"][0]),
            "--target-modules",
            "qv",
            "--seed",
            "1",
        ],
        check=True,
    )
    args = argparse.Namespace(train_file=train_file, max_steps=max_steps)
    runs = []
    for repeat in range(repeats):  # interleaved: A B A B, never A A B B
        for config in configs:
            for method in ("lora", "qlora"):
                metrics = run_cell(method, config, args, model_dir, init_dir, work / f"{config.stem}-{method}-{repeat}")
                runs.append(
                    {
                        "repeat": repeat,
                        "config": config.name,
                        "pad_to_multiple_of": yaml.safe_load(config.read_text())["train"]["pad_to_multiple_of"],
                        **{
                            k: metrics[k]
                            for k in (
                                "method",
                                "device",
                                "compute_dtype",
                                "optimizer",
                                "model_footprint_bytes",
                                "load_peak_allocated_bytes",
                                "train_peak_allocated_bytes",
                                "train_peak_reserved_bytes",
                                "tokens_per_second",
                                "steady_tokens_per_second",
                                "samples_per_second",
                                "global_steps",
                                "final_train_loss",
                                "loss_curve",
                                "kernels",
                                "padding_free",
                                "checkpoint_every",
                                "versions",
                                "unsupported_options",
                            )
                        },
                    }
                )
    summary = {}
    for config in configs:
        for method in ("lora", "qlora"):
            mine = [r for r in runs if r["method"] == method and r["config"] == config.name]
            summary[f"{config.name}:{method}"] = {
                "median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in mine),
                "median_steady_tokens_per_second": statistics.median(r["steady_tokens_per_second"] for r in mine),
                "train_peak_allocated_gib": round(max(r["train_peak_allocated_bytes"] for r in mine) / GIB, 3),
                "train_peak_reserved_gib": round(max(r["train_peak_reserved_bytes"] for r in mine) / GIB, 3),
                "load_peak_allocated_gib": round(max(r["load_peak_allocated_bytes"] for r in mine) / GIB, 3),
                "footprint_gib": round(mine[0]["model_footprint_bytes"] / GIB, 3),
            }
    result = {
        "card": runs[0]["device"],
        "max_steps": max_steps,
        "train_settings": {c.name: yaml.safe_load(c.read_text())["train"] for c in configs},
        "weights": "random, SmolLM2-135M-Instruct shape",
        "runs": runs,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_train_cells.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# LoRA vs QLoRA train cells on {result['card']} ({max_steps} steps, SmolLM2-135M shape, random weights)",
        "",
        "| config:method | footprint GiB | peak alloc after load GiB | train peak alloc GiB | train peak reserved GiB"
        " | tokens/s whole run (median) | tokens/s steady (median of per-run steady rates) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['footprint_gib']} | {s['load_peak_allocated_gib']} | {s['train_peak_allocated_gib']} | "
            f"{s['train_peak_reserved_gib']} | {s['median_tokens_per_second']:.0f} | "
            f"{s['median_steady_tokens_per_second']:.0f} |"
        )
    (out / "gpu_train_cells.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape-dir", type=Path, required=True, help="config.json + tokenizer of the model shape")
    parser.add_argument("--train-file", type=Path, required=True, help="prepare_data's train.jsonl")
    parser.add_argument("--config", type=Path, action="append", help="one or more configs to compare (interleaved)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    main(
        a.shape_dir, a.train_file, a.config or [PROJECT / "config" / "smollm2-full.yaml"], a.out, a.max_steps, a.repeats
    )
