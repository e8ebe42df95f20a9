"""A small synthetic study written as the pipeline writes it (metrics.json, merge_check.json,
loss curves, samples, perplexity.csv, perplexity_examples.csv), so tables, figures and the
report can be built from it in seconds with their real code.

Per-example NLLs come from a seeded generator: each model has a per-token rate per example
(the example's difficulty + the model's offset + per-seed noise); the planted ``outlier`` adds
a large cost to one example for the QLoRA arm only (the same for every seed).
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from grid import GRID_COLUMNS
from statistics_tables import training_base

GIB = 1024**3
DATASETS = ["eval_chat_assistant", "eval_chat"]


def grid(gpu: bool) -> list[dict]:
    """The GPU study's shape (targets × quant settings × seeds) or the CPU default's (two lrs, nf4)."""
    cells = []
    learning_rates = [2e-4] if gpu else [2e-6, 2e-4]
    targets = ["qv", "all_linear"] if gpu else ["qv"]
    quants = [("nf4", False), ("nf4", True), ("fp4", False)] if gpu else [("nf4", False)]
    seeds = [1, 2, 3] if gpu else [1, 2]
    for target in targets:
        for lr in learning_rates:
            for seed in seeds:
                arms = [("lora", "none", False)] + [("qlora", q, d) for q, d in quants]
                for method, quant_type, double_quant in arms:
                    cell = dict(
                        zip(
                            GRID_COLUMNS,
                            [method, 8, 16.0, 0.05, target, lr, quant_type, double_quant, seed],
                            strict=True,
                        )
                    )
                    cell["cell"] = f"{method}-{target}-lr{lr:g}-{quant_type}-dq{int(double_quant)}-s{seed}"
                    cells.append(cell)
    return cells


def offset(model: dict) -> float:
    """Per-token NLL offset of a model: the 4-bit bases are worse (fp4 most), training helps."""
    quant = {"none": 0.0, "nf4": 0.04, "fp4": 0.10}[model.get("quant_type") or "none"]
    quant += 0.002 if model.get("double_quant") else 0.0
    trained = {2e-6: -0.0002, 2e-4: -0.3}.get(model.get("learning_rate"), 0.0)
    return quant + trained


def write_study(root: Path, gpu: bool = False, n_examples: int = 12, outlier: float = 0.0, seed: int = 0) -> Path:
    """Write the synthetic study under root (results_dir layout); returns root / 'tables'."""
    rng = np.random.default_rng(seed)
    cells = grid(gpu)
    tokens = {"eval_chat": rng.integers(40, 200, n_examples), "eval_chat_assistant": rng.integers(10, 80, n_examples)}
    difficulty = rng.uniform(2.2, 3.2, n_examples)
    bases = [{"model": "base-16bit", "precision": "16bit", "quant_type": None, "double_quant": None}]
    for quant_type, double_quant in sorted(
        {(c["quant_type"], c["double_quant"]) for c in cells if c["method"] == "qlora"}
    ):
        name = training_base("qlora", quant_type, double_quant)
        bases.append({"model": name, "precision": "4bit", "quant_type": quant_type, "double_quant": double_quant})
    examples, perplexity = [], []

    def evaluate(model_kind: str, description: dict, rate_offset: np.ndarray) -> None:
        for dataset in DATASETS:
            nll = tokens[dataset] * (difficulty + rate_offset)
            for example in range(n_examples):
                examples.append(
                    {**description, "model_kind": model_kind, "dataset": dataset, "example": example}
                    | {"tokens": int(tokens[dataset][example]), "nll": float(nll[example])}
                )
            total, count = float(nll.sum()), int(tokens[dataset].sum())
            perplexity.append(
                {**description, "model_kind": model_kind, "dataset": dataset, "tokens": count}
                | {"nll": total / count, "perplexity": math.exp(total / count)}
            )
        wikitext = 3.0 + float(rate_offset.mean())
        perplexity.append(
            {**description, "model_kind": model_kind, "dataset": "wikitext", "tokens": 512}
            | {"nll": wikitext, "perplexity": math.exp(wikitext)}
        )

    for base in bases:
        evaluate("base", base, np.full(n_examples, offset(base)))
    for cell in cells:
        noise = rng.normal(0, 0.0005, n_examples)
        planted = np.zeros(n_examples)
        if cell["method"] == "qlora":
            planted[0] = outlier
        description = {"model": cell["cell"], "precision": "4bit" if cell["method"] == "qlora" else "16bit"}
        description |= {c: cell[c] for c in GRID_COLUMNS}
        evaluate("adapter", description, offset(cell) + noise + planted)
        evaluate("merged", description, offset(cell) + noise + planted + 0.001)
        write_run(root, cell, gpu, rng)
    tables = root / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    columns = ["model_kind", "model", "precision", *GRID_COLUMNS, "dataset"]
    pd.DataFrame(perplexity).reindex(columns=columns + ["tokens", "nll", "perplexity"]).to_csv(
        tables / "perplexity.csv", index=False
    )
    pd.DataFrame(examples).reindex(columns=columns + ["example", "tokens", "nll"]).to_csv(
        tables / "perplexity_examples.csv", index=False
    )
    return tables


def write_run(root: Path, cell: dict, gpu: bool, rng: np.random.Generator) -> None:
    qlora = cell["method"] == "qlora"
    run = root / "train" / cell["cell"]
    run.mkdir(parents=True, exist_ok=True)
    metrics = {c: cell[c] for c in GRID_COLUMNS} | {
        "device": "NVIDIA H200" if gpu else "cpu",
        "compute_dtype": "bfloat16" if gpu else "float32",
        "optimizer": "paged_adamw_32bit" if gpu else "adamw_torch",
        "model_footprint_bytes": int((0.1 if qlora else 0.5) * GIB),
        "load_peak_allocated_bytes": int((0.12 if qlora else 0.5) * GIB) if gpu else None,
        "train_peak_allocated_bytes": int((2.0 if qlora else 2.4) * GIB + rng.integers(0, 2**20)) if gpu else None,
        "train_peak_reserved_bytes": int(2.6 * GIB) if gpu else None,
        "train_peak_rss_bytes": int((1.3 if qlora else 1.1) * GIB + rng.integers(0, 2**20)),
        "rss_at_train_start_bytes": int((1.2 if qlora else 0.5) * GIB),
        "process_peak_rss_bytes": int((1.4 if qlora else 1.2) * GIB),
        "optimizer_state_bytes": 3_686_400,
        "optimizer_paged": gpu,
        "tokens_per_second": float((9000 if qlora else 12000) if gpu else (300 if qlora else 400)),
        "steady_tokens_per_second": float((9500 if qlora else 12600) if gpu else (320 if qlora else 420)),
        "steady_from_step": 4,
        "samples_per_second": 3.0,
        "wall_seconds": 1800.0 if gpu else 300.0,
        "global_steps": 40,
        "final_train_loss": 1.5,
        "final_loss_steps": 4,
        "last_batch_loss": 6.4,
        "mean_train_loss": 1.8,
        "world_size": 1,
        "versions": {"torch": "2.13.0"},
        "hardware": {"cpus": 16 if gpu else 2},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    curve = pd.DataFrame(
        {"step": range(1, 11), "loss": np.linspace(2.5, 1.5, 10), "learning_rate": cell["learning_rate"]}
    )
    curve.to_csv(run / "loss_curve.csv", index=False)
    merged = root / "merged" / cell["cell"]
    merged.mkdir(parents=True, exist_ok=True)
    check = {"max_abs_logit_diff": 0.01, "mean_abs_logit_diff": 0.001, "rel_ppl_diff": 1e-4, "dtype": "bfloat16"}
    check |= {"adapter_effect_mean_abs_logit_diff": 0.4, "fold_error_share": 1e-4}
    check |= {"precision_floor_max_abs_logit_diff": 0.02, "precision_floor_mean_abs_logit_diff": 0.002}
    if qlora:
        check |= {"adapter_on_4bit_ppl": 10.0, "merged_ppl": 10.1, "merge_gap_rel_ppl": 0.01}
    (merged / "merge_check.json").write_text(json.dumps(check))
    samples = root / "samples" / "adapter"
    samples.mkdir(parents=True, exist_ok=True)
    sample = {"model_kind": "adapter", "model": cell["cell"], "precision": "4bit" if qlora else "16bit"}
    sample |= {"method": cell["method"], "learning_rate": cell["learning_rate"], "seed": cell["seed"]}
    (samples / f"{cell['cell']}.jsonl").write_text(json.dumps(sample | {"prompt": "Hi", "completion": "Hello"}) + "\n")


def build_tables(root: Path, **study) -> Path:
    """The synthetic study through the real tables script; returns the tables folder."""
    import tables as tables_script

    folder = write_study(root, **study)
    metrics = sorted((root / "train").glob("*/metrics.json"))
    checks = [root / "merged" / m.parent.name / "merge_check.json" for m in metrics]
    samples = sorted((root / "samples").glob("*/*.jsonl"))
    tables_script.main(metrics, checks, folder / "perplexity.csv", folder / "perplexity_examples.csv", samples, folder)
    return folder
