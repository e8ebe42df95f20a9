"""The tutorial's QLoRA recipe vs the pipeline's, at the Llama-2-7B shape, on one GPU.

Builds the 7B shape (hidden 4096, 32 layers, vocab 32000) with random bf16 weights on the
GPU (speed and memory equal a real checkpoint's; loss does not) and times training steps:

- ``tutorial``: the tutorial's recipe: NF4 with fp16 compute, ``prepare_model_for_kbit_training``
  (fp32 embeddings, norms and head; reentrant checkpointing), no autocast (fp16=False,
  bf16=False), paged_adamw_32bit. Its LoRA counterpart loads the base in fp16.
- ``pipeline``: the train stage's own code: ``train.prepare_model`` (load, kernels, PEFT,
  layer-wise checkpointing from the memory model), ``train.sft_config`` and
  ``train.make_trainer`` with the settings of the config given (config/llama2-7b.yaml).

Every row runs in a fresh process (Liger patches transformers' classes process-wide), the
rows of a repeat run in order and repeats follow each other (A B C A B C): only ratios from
one call count. Per row: median step time after warm-up (the train stage's own step timer),
tokens/s, peak allocated/reserved GiB, the memory model's prediction, card and versions.

    python bench/gpu_recipes.py --rows qv --repeats 2 --out OUT_PREFIX
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "scripts"))
GIB = 1024**3
LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# Row sets: (recipe, method, targets, seq, batch, checkpointing); checkpointing is
# "on" (every layer), "off", or "auto:<GiB>" (the memory model's choice in that budget).
ROWS = {
    "qv": [
        ("tutorial", "qlora", "qv", 2048, 4, "on"),
        ("pipeline", "qlora", "qv", 2048, 4, "on"),
        ("pipeline", "qlora", "qv", 2048, 4, "auto:40"),
    ],
    "all": [
        ("tutorial", "qlora", "all_linear", 2048, 4, "on"),
        ("pipeline", "qlora", "all_linear", 2048, 4, "on"),
        ("pipeline", "qlora", "all_linear", 2048, 4, "auto:80"),
    ],
    # Data-parallel scaling (issue 8): the same QLoRA cell on 1 and 2 GPUs, per-GPU batch 4.
    "scaling": [
        ("pipeline", "qlora", "qv", 2048, 4, "on", 1),
        ("pipeline", "qlora", "qv", 2048, 4, "on", 2),
    ],
    "scaling_lora": [  # defined, not yet measured (device budget)
        ("pipeline", "lora", "qv", 2048, 4, "on", 1),
        ("pipeline", "lora", "qv", 2048, 4, "on", 2),
    ],
    "small": [
        ("tutorial", "qlora", "qv", 1024, 1, "on"),
        ("pipeline", "qlora", "qv", 1024, 1, "on"),
        ("tutorial", "lora", "qv", 1024, 1, "on"),
        ("pipeline", "lora", "qv", 1024, 1, "on"),
        ("tutorial", "lora", "qv", 2048, 4, "on"),
        ("pipeline", "lora", "qv", 2048, 4, "on"),
    ],
}


def bench_cell(method: str = "qlora", targets: str = "qv", seed: int = 1) -> dict:
    """The grid cell every bench trains: the tutorial's LoRA (r=64, alpha 16, dropout 0.1), lr 2e-4, NF4."""
    return dict(
        method=method,
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=targets,
        learning_rate=2e-4,
        quant_type="nf4" if method == "qlora" else "none",
        double_quant=False,
        seed=seed,
    )


def build_model(model_dir: Path, tokenizer_dir: Path, shape: dict | None = None) -> None:
    """Random 7B-shape (or ``shape``) checkpoint plus the initial adapters (q/v and all-linear, r=64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modeling import TARGET_MODULES

    if (model_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # the CPU: tiny shapes in tests
        model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA2_7B))).to(torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    # Only the pad id is read from it: every row is exactly seq tokens long.
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    for targets in TARGET_MODULES:
        config = LoraConfig(
            r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGET_MODULES[targets], task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(model_dir / f"adapter_{targets}")
        model = peft_model.unload()  # the bare base again, for the next targets


def token_rows(rows: int, seq: int, vocab: int):
    import datasets

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, seq), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def tutorial_model(model_dir: Path, method: str, adapter_dir: Path):
    """The tutorial's model: fp16 compute, kbit preparation (fp32 upcast), no autocast."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from modeling import device_map, quantization_config

    kwargs = {"dtype": torch.float16, "device_map": device_map()}
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config("nf4", False, torch.float16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    model.train()
    return model, {"kernels": "none", "checkpoint_every": 1}


def run_row(row: dict) -> dict:
    """One recipe in this process: build, train `steps` steps, measure."""
    import logging

    import train as train_stage

    # One GPU alone, or this process's GPU and the process group under torchrun, exactly as
    # the train stage does; before transformers' import, which counts the CUDA devices.
    processes, _ = train_stage.join_processes()
    from transformers import AutoTokenizer, set_seed

    from memory_model import predict_peak
    from model_shape import ModelShape

    logger = logging.getLogger("bench")
    logging.basicConfig(level=logging.INFO)
    model_dir, config = Path(row["model_dir"]), yaml.safe_load(Path(row["config"]).read_text())
    settings = dict(config["train"], batch_size=row["batch"], max_steps=row["steps"], pad_to_multiple_of=None)
    settings.update(save_steps=10**6, logging_steps=1, group_by_length=False, padding_free=False)
    checkpointing = row["checkpointing"]
    if checkpointing.startswith("auto:"):
        settings.update(gradient_checkpointing="auto", memory_budget_gib=float(checkpointing[5:]))
    else:
        settings.update(gradient_checkpointing=checkpointing == "on", checkpoint_every=1)
    cell = bench_cell(row["method"], row["targets"])
    set_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter_dir = model_dir / f"adapter_{row['targets']}"
    torch.cuda.reset_peak_memory_stats()
    if row["recipe"] == "tutorial":
        model, details = tutorial_model(model_dir, row["method"], adapter_dir)
        compute_dtype = torch.float16
        settings["sync_free_forward"] = False  # TRL's forward: the padding mask read, the labelled positions
    else:
        model, details = train_stage.prepare_model(model_dir, cell, settings, adapter_dir, row["seq"], logger)
        compute_dtype = details["compute_dtype"]
    load_peak = torch.cuda.max_memory_allocated()
    dataset = token_rows(row["batch"] * row["steps"] * processes, row["seq"], LLAMA2_7B["vocab_size"])
    with tempfile.TemporaryDirectory() as scratch:
        # The tutorial trains without autocast (fp16=False, bf16=False).
        autocast = row["recipe"] != "tutorial"
        args, _ = train_stage.sft_config(
            settings, cell, Path(scratch), compute_dtype, "paged_adamw_32bit", row["seq"], logger, autocast
        )
        timer = train_stage.step_timer()
        every = details["checkpoint_every"]
        trainer = train_stage.make_trainer(model, tokenizer, dataset, args, settings, [timer], checkpoint_every=every)
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    times = [s["step_seconds"] for step, s in sorted(timer.steps.items())][row["warmup"] :]
    median = statistics.median(times)
    tokens = row["seq"] * row["batch"] * processes  # every process's batch in a step
    every = details["checkpoint_every"]
    folded = dict(row, folded_lora_dropouts=details.get("folded_lora_dropouts", 0))
    predicted = predict_peak(
        ModelShape.from_config(model_dir), checkpoint_every=every, **prediction_recipe(folded, details["kernels"])
    )
    peak = torch.cuda.max_memory_allocated()
    peaks = train_stage.gather_memory({"peak": peak})
    return {
        **{k: row[k] for k in ("recipe", "method", "targets", "seq", "batch", "checkpointing", "repeat")},
        "processes": processes,
        "per_gpu_peak_allocated_gib": [round(p["peak"] / GIB, 3) for p in peaks],
        "kernels": details["kernels"],
        "folded_lora_dropouts": folded["folded_lora_dropouts"],
        "checkpoint_every": every,
        "median_step_seconds": round(median, 4),
        "step_seconds": [round(t, 4) for t in times],
        "tokens_per_second": round(tokens / median, 1),
        "peak_allocated_gib": round(peak / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        "load_peak_allocated_gib": round(load_peak / GIB, 3),
        "predicted_peak_gib": round(predicted["total"] / GIB, 3),
        "prediction_error_pct": round(100 * (predicted["total"] - peak) / peak, 1),
        "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
        "train_seconds": round(seconds, 2),
        "adapter_dtypes": train_stage.adapter_dtypes(trainer.model),
    }


def prediction_recipe(row: dict, kernels: str) -> dict:
    """The memory model's arguments for a bench row (the tutorial's LoRA counterpart has no
    fp32 upcast: the pipeline's layout without autocast; a row that folded its LoRA dropouts,
    offloaded its checkpointed inputs, ahead of their recomputation or in line, or
    double-quantised says so)."""
    recipe = dict(method=row["method"], rank=64, targets=row["targets"], seq=row["seq"], batch=row["batch"])
    if row["recipe"] == "tutorial" and row["method"] == "lora":
        return dict(recipe, recipe="pipeline", kernels="none", autocast=False)
    recipe.update(recompute_dropout=bool(row.get("folded_lora_dropouts")), double_quant=bool(row.get("double_quant")))
    # rows before offload_prefetch copied in line
    recipe.update(
        offload_checkpoints=bool(row.get("offload_checkpoints")), offload_prefetch=bool(row.get("offload_prefetch"))
    )
    return dict(recipe, recipe=row["recipe"], kernels=kernels)


def summarise(results: list[dict]) -> list[dict]:
    """Median over repeats per row, and its ratio to the tutorial row of the same shape and targets."""
    keys = ("recipe", "method", "targets", "seq", "batch", "checkpointing", "processes")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get(k, 1) for k in keys), []).append(r)
    table = []
    for key, runs in groups.items():
        row = dict(zip(keys, key, strict=True))
        row.update(
            kernels=runs[0]["kernels"],
            checkpoint_every=runs[0]["checkpoint_every"],
            tokens_per_second=round(statistics.median(r["tokens_per_second"] for r in runs), 1),
            runs_tokens_per_second=[r["tokens_per_second"] for r in runs],
            peak_allocated_gib=max(r["peak_allocated_gib"] for r in runs),
            peak_reserved_gib=max(r["peak_reserved_gib"] for r in runs),
            predicted_peak_gib=runs[0]["predicted_peak_gib"],
        )
        row["prediction_error_pct"] = round(
            100 * (row["predicted_peak_gib"] - row["peak_allocated_gib"]) / row["peak_allocated_gib"], 1
        )
        table.append(row)
    for row in table:
        base = [
            t
            for t in table
            if t["recipe"] == "tutorial"
            and all(t[k] == row[k] for k in ("method", "targets", "seq", "batch"))
            and t["checkpointing"] == "on"
        ]
        row["vs_tutorial"] = round(row["tokens_per_second"] / base[0]["tokens_per_second"], 2) if base else None
        single = [t for t in table if t["processes"] == 1 and all(t[k] == row[k] for k in keys[:-1])]
        row["vs_one_gpu"] = round(row["tokens_per_second"] / single[0]["tokens_per_second"], 2) if single else None
    return table


def markdown(table: list[dict], device: str) -> str:
    lines = [
        f"Card: {device}. Median tokens/s over repeats; ratio to the tutorial row of the same method, targets and shape.",
        "",
        "| recipe | method | targets | seq x batch | checkpointing | kernels | GPUs | tok/s (runs) | x tutorial "
        "| x 1 GPU | peak alloc GiB | reserved GiB | predicted GiB (err %) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ckpt = r["checkpointing"] + (
            f" -> every {r['checkpoint_every']}" if r["checkpointing"].startswith("auto") else ""
        )
        lines.append(
            f"| {r['recipe']} | {r['method']} | {r['targets']} | {r['seq']} x {r['batch']} | {ckpt} | {r['kernels']} "
            f"| {r['processes']} "
            f"| {r['tokens_per_second']:,.0f} ({', '.join(f'{t:,.0f}' for t in r['runs_tokens_per_second'])}) "
            f"| {r['vs_tutorial']} | {r['vs_one_gpu']} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} "
            f"| {r['predicted_peak_gib']} ({r['prediction_error_pct']:+}) |"
        )
    return "\n".join(lines) + "\n"


def main(rows: list[str], repeats: int, steps: int, warmup: int, config: Path, model_dir: Path, out: Path) -> dict:
    import importlib.metadata

    build_model(model_dir, PROJECT / ".carry" / "gpu" / "shape")
    results = []
    for repeat in range(repeats):
        for name in rows:
            for recipe, method, targets, seq, batch, checkpointing, *gpus in ROWS[name]:
                row = dict(recipe=recipe, method=method, targets=targets, seq=seq, batch=batch)
                row.update(checkpointing=checkpointing, repeat=repeat, steps=steps, warmup=warmup)
                row.update(model_dir=str(model_dir), config=str(config))
                command = [sys.executable, __file__, "--row", json.dumps(row)]
                if gpus and gpus[0] > 1:
                    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                    command += [f"--nproc_per_node={gpus[0]}", __file__, "--row", json.dumps(row)]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
                if done.returncode or not lines:
                    print("FAILED", row, done.stderr[-3000:], flush=True)
                    continue
                results.append(json.loads(lines[-1][4:]))
                print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name(0)
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft", "trl", "bitsandbytes")}
    versions["liger-kernel"] = importlib.metadata.version("liger-kernel")
    table = summarise(results)
    report = {"device": device, "versions": versions, "config": str(config), "rows": results, "table": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(table, device))
    print(markdown(table, device))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=["qv"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--config", type=Path, default=PROJECT / "config" / "llama2-7b.yaml")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "llama2-7b-shape")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results" / "gpu_recipes")
    a = parser.parse_args()
    if a.row:
        result = run_row(json.loads(a.row))
        if int(__import__("os").environ.get("RANK", "0")) == 0:
            print("ROW " + json.dumps(result), flush=True)
    else:
        main(a.rows, a.repeats, a.steps, a.warmup, a.config, a.model_dir, a.out)
