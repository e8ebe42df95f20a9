"""Train one grid cell: TRL SFTTrainer + PEFT on the 16-bit (lora) or 4-bit (qlora) base.

Both arms of a seed start from the same initial adapter (init_adapter.py), see the same
examples in the same order and use the same hyperparameters; only the base precision
differs (modeling.load_base_model).

Outputs: the adapter (vanilla PEFT loads it), ``metrics.json`` (peak GPU memory after
loading and during training, footprint, peak RSS, tokens/s, samples/s, wall time, final
and mean loss, device, dtypes, versions), ``loss_curve.csv`` and TensorBoard events.

Checkpoints go to a folder outside the rule's outputs: a job killed by SIGTERM/SIGKILL
(a SLURM time limit, preemption) resumes from its last checkpoint on the next run and
ends with the same total step count. A checkpoint written under other settings is
discarded, never resumed.
"""

import argparse
import csv
import dataclasses
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch

from modeling import device, load_base_model, resolve_compute_dtype
from runtime import hardware, log_arguments, package_versions, setup_logging, sha256_file, write_provenance

CUDA_ONLY_OPTIMIZERS = {"paged_adamw_32bit", "paged_adamw_8bit"}
SIGNATURE_FILE = "run_signature.json"
GIB = 1024**3


def choose_optimizer(requested: str, logger) -> str:
    if requested in CUDA_ONLY_OPTIMIZERS and not torch.cuda.is_available():
        logger.warning("optimizer %s needs CUDA; falling back to adamw_torch on the CPU", requested)
        return "adamw_torch"
    return requested


def sft_config(
    train: dict, cell: dict, checkpoint_dir: Path, compute_dtype: torch.dtype, optimizer: str, max_length: int, logger
):
    """SFTConfig from the config's train section; options this transformers lacks are logged, not lost silently."""
    from trl import SFTConfig

    wanted = dict(
        output_dir=str(checkpoint_dir),
        num_train_epochs=train["epochs"],
        max_steps=train["max_steps"],
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        optim=optimizer,
        learning_rate=cell["learning_rate"],
        lr_scheduler_type=train["lr_scheduler"],
        warmup_steps=train["warmup_ratio"],  # transformers 5: a float below 1 is a ratio
        max_grad_norm=train["max_grad_norm"],
        weight_decay=train["weight_decay"],
        train_sampling_strategy="group_by_length" if train["group_by_length"] else "random",
        gradient_checkpointing=train["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        logging_steps=train["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train["save_steps"],
        save_total_limit=2,
        seed=cell["seed"],
        data_seed=cell["seed"],
        max_length=max_length,
        dataset_text_field="text",
        packing=False,
        pad_to_multiple_of=train["pad_to_multiple_of"],
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    dropped = sorted(set(wanted) - known)
    if dropped:
        logger.warning("this transformers/TRL has no %s; running without", dropped)
    return SFTConfig(**{k: v for k, v in wanted.items() if k in known}), dropped


def checkpoint_is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def prepare_checkpoints(checkpoint_dir: Path, signature: dict, logger) -> str | None:
    """The checkpoint to resume from, if one exists for exactly these settings."""
    from transformers.trainer_utils import get_last_checkpoint

    signature_path = checkpoint_dir / SIGNATURE_FILE
    if checkpoint_dir.is_dir():
        previous = json.loads(signature_path.read_text()) if signature_path.is_file() else None
        if previous != signature:
            logger.warning("checkpoints in %s were made with other settings: discarded", checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    signature_path.write_text(json.dumps(signature, indent=2, sort_keys=True))
    # A kill during a save leaves a partial checkpoint: trainer_state.json is written last.
    while (last := get_last_checkpoint(str(checkpoint_dir))) and not checkpoint_is_complete(Path(last)):
        logger.warning("discarding incomplete checkpoint %s (killed while saving)", last)
        shutil.rmtree(last)
    if last:
        logger.info("resuming from %s", last)
    return last


def memory_stats(prefix: str) -> dict:
    if not torch.cuda.is_available():
        return {f"{prefix}_peak_allocated_bytes": None, f"{prefix}_peak_reserved_bytes": None}
    return {
        f"{prefix}_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        f"{prefix}_peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


def step_timer():
    """A Trainer callback timing every optimizer step (wall seconds, non-padding tokens).

    The whole-run tokens/s includes one-off costs (first-shape kernel setup, checkpoint
    saves); the median step shows the steady state. Both are reported."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: dict[int, dict] = {}

        def on_step_begin(self, args, state, control, **kwargs):
            self._started, self._tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps[state.global_step] = {
                "step_seconds": time.perf_counter() - self._started,
                "step_tokens": state.num_input_tokens_seen - self._tokens,
            }

    return StepTimer()


def steady_tokens_per_second(steps: dict[int, dict], warmup: int = 3) -> float | None:
    """Median per-step throughput after the first warm-up steps."""
    rates = [
        s["step_tokens"] / s["step_seconds"] for step, s in sorted(steps.items())[warmup:] if s["step_seconds"] > 0
    ]
    return round(statistics.median(rates), 2) if rates else None


def loss_curve(log_history: list[dict], steps: dict[int, dict]) -> list[dict]:
    return [
        {
            "step": entry["step"],
            "epoch": entry.get("epoch"),
            "loss": entry["loss"],
            "learning_rate": entry.get("learning_rate"),
            "grad_norm": entry.get("grad_norm"),
            **steps.get(entry["step"], {"step_seconds": None, "step_tokens": None}),
        }
        for entry in log_history
        if "loss" in entry
    ]


def main(
    model_dir: Path,
    train_file: Path,
    init_adapter_dir: Path,
    cell: dict,
    train: dict,
    max_length: int,
    adapter_dir: Path,
    metrics_path: Path,
    loss_curve_path: Path,
    tensorboard_dir: Path,
    checkpoint_dir: Path,
    threads: int = 2,
    provenance_path: Path | None = None,
    log_path: Path | None = None,
) -> dict:
    import datasets
    from peft import PeftModel
    from torch.utils.tensorboard import SummaryWriter
    from transformers import AutoTokenizer, set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import SFTTrainer

    started = time.time()
    logger = setup_logging(log_path, "train")
    log_arguments(
        logger,
        model_dir=model_dir,
        train_file=train_file,
        init_adapter_dir=init_adapter_dir,
        cell=cell,
        train=train,
        max_length=max_length,
        adapter_dir=adapter_dir,
        checkpoint_dir=checkpoint_dir,
        threads=threads,
    )
    torch.set_num_threads(threads)
    set_seed(cell["seed"])
    compute_dtype = resolve_compute_dtype(train["compute_dtype"])
    optimizer = choose_optimizer(train["optimizer"], logger)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_base_model(model_dir, cell["method"], compute_dtype, cell["quant_type"], cell["double_quant"])
    footprint = model.get_memory_footprint()
    load_memory = memory_stats("load")
    model = PeftModel.from_pretrained(model, str(init_adapter_dir), is_trainable=True)
    model.train()  # gradient checkpointing silently does nothing in eval mode
    if train["gradient_checkpointing"]:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grad inputs
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s base: footprint %.3f GiB, %d trainable / %d parameters, compute %s on %s",
        cell["method"],
        footprint / GIB,
        trainable,
        total,
        compute_dtype,
        device(),
    )

    dataset = datasets.load_dataset("json", data_files=str(train_file), split="train").select_columns(["text"])
    args, dropped_options = sft_config(train, cell, checkpoint_dir, compute_dtype, optimizer, max_length, logger)
    signature = {
        "cell": cell,
        "train": train,
        "max_length": max_length,
        "train_file": str(train_file),
        "rows": len(dataset),
    }
    resume_from = prepare_checkpoints(Path(checkpoint_dir), signature, logger)

    Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[TensorBoardCallback(SummaryWriter(log_dir=str(tensorboard_dir))), timer := step_timer()],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tokens_before = 0
    if resume_from:
        tokens_before = json.loads((Path(resume_from) / "trainer_state.json").read_text()).get(
            "num_input_tokens_seen", 0
        )
    train_started = time.time()
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - train_started
    train_memory = memory_stats("train")

    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(adapter_dir))
    curve = loss_curve(trainer.state.log_history, timer.steps)
    with Path(loss_curve_path).open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["step", "epoch", "loss", "learning_rate", "grad_norm", "step_seconds", "step_tokens"]
        )
        writer.writeheader()
        writer.writerows(curve)

    tokens_this_run = trainer.state.num_input_tokens_seen - tokens_before
    steps_this_run = trainer.state.global_step - (int(Path(resume_from).name.split("-")[-1]) if resume_from else 0)
    samples_this_run = steps_this_run * train["batch_size"] * train["gradient_accumulation_steps"]
    metrics = {
        **cell,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "optimizer": optimizer,
        "optimizer_requested": train["optimizer"],
        "unsupported_options": dropped_options,
        "model_footprint_bytes": footprint,
        **load_memory,
        **train_memory,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "init_adapter": str(init_adapter_dir),
        "init_adapter_sha256": sha256_file(Path(init_adapter_dir) / "adapter_model.safetensors"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "global_steps": trainer.state.global_step,
        "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else None,
        "train_tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds_this_run": round(train_seconds, 3),
        "tokens_per_second": round(tokens_this_run / train_seconds, 2) if train_seconds else None,
        "samples_per_second": round(samples_this_run / train_seconds, 4) if train_seconds else None,
        "steady_tokens_per_second": steady_tokens_per_second(timer.steps),
        "wall_seconds": round(time.time() - started, 3),
        "final_train_loss": curve[-1]["loss"] if curve else None,
        "mean_train_loss": round(sum(p["loss"] for p in curve) / len(curve), 6) if curve else None,
        "trainer_reported_loss": output.training_loss,
        "threads": threads,
        "versions": package_versions(),
        "hardware": hardware(),
    }
    Path(metrics_path).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    if provenance_path:
        write_provenance(provenance_path, "train", started, cell=cell, train=train, resumed_from=resume_from)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: the adapter is the result
    logger.info(
        "done: %d steps, final loss %.4f, %.1f tokens/s",
        trainer.state.global_step,
        metrics["final_train_loss"] or float("nan"),
        metrics["tokens_per_second"] or 0,
    )
    return metrics


def _from_snakemake(smk) -> None:
    from runtime import write_manifest  # here, not at the top: train.py's imports are shared work

    started = time.time()
    main(
        model_dir=Path(smk.input.model_dir),
        train_file=Path(smk.input.train),
        init_adapter_dir=Path(smk.input.init_adapter),
        cell=dict(smk.params.cell),
        train=smk.params.train,
        max_length=smk.params.max_length,
        adapter_dir=Path(smk.output.adapter_dir),
        metrics_path=Path(smk.output.metrics),
        loss_curve_path=Path(smk.output.loss_curve),
        tensorboard_dir=Path(smk.output.tensorboard),
        checkpoint_dir=Path(smk.params.checkpoint_dir),
        threads=smk.threads,
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "train", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="pipeline config (train and data.max_length)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--init-adapter", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--method", choices=["lora", "qlora"], required=True)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--quant-type", default="nf4")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    cfg = yaml.safe_load(a.config.read_text())
    settings = dict(cfg["train"], **({"max_steps": a.max_steps} if a.max_steps else {}))
    # The rank, alpha, dropout and targets are the initial adapter's own.
    lora = json.loads((a.init_adapter / "adapter_config.json").read_text())
    targets = "qv" if sorted(lora["target_modules"]) == ["q_proj", "v_proj"] else "all_linear"
    cell = {
        "method": a.method,
        "lora_r": lora["r"],
        "lora_alpha": lora["lora_alpha"],
        "lora_dropout": lora["lora_dropout"],
        "target_modules": targets,
        "learning_rate": a.learning_rate,
        "quant_type": a.quant_type if a.method == "qlora" else "none",
        "double_quant": a.double_quant,
        "seed": a.seed,
    }
    out = a.out_dir
    main(
        a.model_dir,
        a.train_file,
        a.init_adapter,
        cell,
        settings,
        cfg["data"]["max_length"],
        out / "adapter",
        out / "metrics.json",
        out / "loss_curve.csv",
        out / "tensorboard",
        out / "checkpoints",
        a.threads,
        log_path=out / "train.log",
    )
