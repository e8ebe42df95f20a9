"""Train one grid cell: TRL SFTTrainer + PEFT on the 16-bit (lora) or 4-bit (qlora) base.

Both arms of a seed start from the same initial adapter (init_adapter.py), see the same
examples in the same order and use the same hyperparameters; only the base precision
differs (modeling.load_base_model).

Outputs: the adapter (vanilla PEFT loads it), ``metrics.json`` (peak GPU memory after
loading and during training, optimizer state, footprint, RSS, tokens/s, samples/s, wall
time, losses, device and card, dtypes, versions; how each is measured:
``train_metrics.py``), ``loss_curve.csv`` and TensorBoard events.

Checkpoints go to a folder outside the rule's outputs: a job killed by SIGTERM/SIGKILL
(a SLURM time limit, preemption) resumes from its last checkpoint on the next run and
ends with the same total step count (resume.py). A checkpoint written under other settings is
discarded, never resumed.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import preemption
import trackers
from cell_lock import CellBusy, CellLock
from checkpointing import CheckpointPlan, decoder_layers
from data_parallel import (
    from_main,
    gather_memory,
    join_processes,
    launch_command,
    per_process_accumulation,
    world_size,
)
from gpu_assign import assign_gpus
from modeling import device
from recipe import choose_optimizer, make_trainer, prepare_model, sft_config
from resume import prepare_checkpoints, progress_at
from runtime import (
    hardware,
    log_arguments,
    package_versions,
    set_cuda_memory,
    setup_logging,
    sha256_file,
    write_provenance,
)
from train_metrics import (
    final_loss,
    loss_curve,
    memory_stats,
    optimizer_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    steady_tokens_per_second,
    step_timer,
    write_loss_curve,
)

PATH_ARGUMENTS = {
    "model_dir",
    "train_file",
    "init_adapter_dir",
    "adapter_dir",
    "metrics_path",
    "loss_curve_path",
    "tensorboard_dir",
    "checkpoint_dir",
    "provenance_path",
    "log_path",
}
STEADY_FROM_STEP = 4  # steps 1-3 set up kernels for their shapes: steady speed counts from step 4
GIB = 1024**3


def adapter_dtypes(model) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


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
    processes: int = 1,
    gpus: int = 0,
    jobs_per_gpu: int = 1,
    tracking: dict | None = None,
) -> dict:
    """Train one cell; with processes > 1, relaunch this script data-parallel under torchrun
    (one process per GPU) and return the metrics its first process wrote. ``gpus``: cards
    is the job's Snakemake GPU resource (0: CPU, no card claimed; else one card per process,
    every slot of it: gpu_assign.py)."""
    preemption.listen()  # Slurm's time-limit warning may come while the model loads
    # Every slot of its cards (exclusive), before anything initialises CUDA; torchrun's processes inherit it.
    assign_gpus(processes if gpus else 0, jobs_per_gpu=jobs_per_gpu, exclusive=True)
    if processes > 1 and world_size() == 1:
        arguments = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items()}
        # Beside the checkpoints, not in them: that folder belongs to prepare_checkpoints.
        arguments_file = Path(checkpoint_dir).with_name(Path(checkpoint_dir).name + ".launch.json")
        arguments_file.parent.mkdir(parents=True, exist_ok=True)
        arguments_file.write_text(json.dumps(arguments, indent=2))
        log_dir = Path(log_path).with_suffix(".torchrun") if log_path else None
        launched = subprocess.run(launch_command(processes, arguments_file, log_dir))
        if launched.returncode:
            raise RuntimeError(
                f"data-parallel training of {processes} processes failed (exit {launched.returncode}): "
                f"see {log_path} and the job's stderr"
            )
        arguments_file.unlink()
        return json.loads(Path(metrics_path).read_text())

    cuda_memory = set_cuda_memory(train)  # before the model loads: torch reads these once
    processes, rank = join_processes()

    import datasets
    from accelerate import PartialState
    from torch.utils.tensorboard import SummaryWriter
    from transformers import AutoTokenizer, set_seed
    from transformers.integrations import TensorBoardCallback

    started = time.time()
    state = PartialState()  # uses join_processes' process group
    main_process = rank == 0
    # The first process writes the rule's log and every output; the others log to stderr.
    logger = setup_logging(log_path if main_process else None, f"train.rank{rank}")
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
        processes=processes,
        cuda_memory=cuda_memory,
    )
    train = dict(train, gradient_accumulation_steps=per_process_accumulation(train, processes))
    torch.set_num_threads(max(1, threads // processes))
    set_seed(cell["seed"])
    optimizer = choose_optimizer(train["optimizer"], logger)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, details = prepare_model(model_dir, cell, train, init_adapter_dir, max_length, logger)
    compute_dtype = details["compute_dtype"]
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s base: footprint %.3f GiB, %d trainable / %d parameters, compute %s on %s, kernels %s",
        cell["method"],
        details["model_footprint_bytes"] / GIB,
        trainable,
        total,
        compute_dtype,
        device(),
        details["kernels"],
    )

    with state.main_process_first():  # one process fills the datasets cache and tidies checkpoints
        dataset = datasets.load_dataset("json", data_files=str(train_file), split="train").select_columns(["text"])
        trackers.prepare(tracking, train, cell)
        args, dropped_options = sft_config(
            train,
            cell,
            checkpoint_dir,
            compute_dtype,
            optimizer,
            max_length,
            logger,
            run_name=(tracking or {}).get("run_name"),
        )
        signature = {
            "cell": cell,
            "train": train,
            "max_length": max_length,
            "train_file": str(train_file),
            "rows": len(dataset),
            "processes": processes,
        }
        # The first process alone tidies the checkpoints; every process resumes where it decided.
        resume_from = prepare_checkpoints(Path(checkpoint_dir), signature, logger) if main_process else None
    resume_from = from_main(resume_from)

    timer = step_timer()
    callbacks = [timer, preemption.save_on_warning(logger)]
    if main_process:
        Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(tensorboard_dir))))
    plan = (
        CheckpointPlan(decoder_layers(model), model_dir, cell, train, details["kernels"])
        if details["checkpoint_per_batch"]
        else None
    )
    trainer = make_trainer(
        model, tokenizer, dataset, args, train, callbacks, plan, checkpoint_every=details["checkpoint_every"]
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_at_train_start = reset_peak_rss()  # the CPU's training-phase peak starts here
    tokens_before, step_before = progress_at(resume_from)
    train_started = time.time()
    output = trainer.train(resume_from_checkpoint=resume_from)
    preemption.exit_if_stopped()  # Slurm's time-limit warning: checkpoint saved, no outputs
    train_seconds = time.time() - train_started
    train_peak_rss = peak_rss_bytes() if rss_at_train_start is not None else None
    optimizer_bytes, optimizer_paged = optimizer_state_bytes(trainer.optimizer)
    load_keys = ("load_peak_allocated_bytes", "load_peak_reserved_bytes")
    per_process = gather_memory({**{k: details[k] for k in load_keys}, **memory_stats("train")})
    if not main_process:
        return {}
    train_memory = memory_stats("train")
    if torch.cuda.is_available():  # the largest process is what a GPU must hold
        for key in train_memory:
            train_memory[key] = max(p[key] for p in per_process)

    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(adapter_dir))
    curve = loss_curve(trainer.state.log_history, timer.steps)
    write_loss_curve(curve, Path(loss_curve_path))

    final_train_loss, final_loss_steps = final_loss(curve, trainer.state.global_step)
    tokens_this_run = trainer.state.num_input_tokens_seen - tokens_before
    steps_this_run = trainer.state.global_step - step_before
    samples_this_run = steps_this_run * train["batch_size"] * train["gradient_accumulation_steps"] * processes
    metrics = {
        **cell,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "optimizer": optimizer,
        "optimizer_requested": train["optimizer"],
        "unsupported_options": dropped_options,
        **{k: v for k, v in details.items() if k != "compute_dtype"},
        **train_memory,
        "adapter_dtypes": adapter_dtypes(trainer.model),
        "padding_free": train["padding_free"],
        "checkpoint_steps_by_layers": plan.summary() if plan else None,
        "checkpoint_plan": plan.plan if plan else None,
        "offload_layers": plan.offload_summary() if plan else None,
        "plan_predicted_peak_bytes": plan.predicted_peak_bytes() if plan else None,
        "metric_sync_deferred": trainer.metric_sync_deferred,
        "cuda_graphs": trainer.graphs.summary() if trainer.graphs else None,
        "python_gc": trainer.collections.summary(),
        **cuda_memory,
        "optimizer_state_bytes": optimizer_bytes,
        "optimizer_paged": optimizer_paged,
        "rss_at_train_start_bytes": rss_at_train_start,
        "train_peak_rss_bytes": train_peak_rss,
        # getrusage's mark is the kernel's lazily updated high-water: a newer training-phase peak can top it
        "process_peak_rss_bytes": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, train_peak_rss or 0),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES") if torch.cuda.is_available() else None,
        "init_adapter": str(init_adapter_dir),
        "init_adapter_sha256": sha256_file(Path(init_adapter_dir) / "adapter_model.safetensors"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "global_steps": trainer.state.global_step,
        "resumed_from_step": step_before if resume_from else None,
        "train_tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds_this_run": round(train_seconds, 3),
        "tokens_per_second": round(tokens_this_run / train_seconds, 2) if train_seconds else None,
        "samples_per_second": round(samples_this_run / train_seconds, 4) if train_seconds else None,
        "steady_tokens_per_second": steady_tokens_per_second(timer.steps, STEADY_FROM_STEP - 1),
        "steady_from_step": STEADY_FROM_STEP,
        "wall_seconds": round(time.time() - started, 3),
        "final_train_loss": final_train_loss,
        "final_loss_steps": final_loss_steps,
        "last_batch_loss": curve[-1]["loss"] if curve else None,
        "mean_train_loss": round(sum(p["loss"] for p in curve) / len(curve), 6) if curve else None,
        "trainer_reported_loss": output.training_loss,
        # every micro-batch's loss of this run, read once at the end (log lines: every logging_steps)
        "micro_batch_losses_this_run": [round(x, 6) for x in trainer.step_losses_on_host()],
        "threads": threads,
        "world_size": processes,
        "gradient_accumulation_steps_per_process": train["gradient_accumulation_steps"],
        "per_process_memory": per_process,
        "versions": package_versions(),
        "hardware": hardware(),
    }
    Path(metrics_path).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    if provenance_path:
        write_provenance(provenance_path, "train", started, cell=cell, train=train, resumed_from=resume_from)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: the adapter is the result
    trackers.log_metrics(tracking, train, trackers.final_train_metrics(metrics))
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
    preemption.listen(preemption.warning_seconds(smk.resources.runtime))
    try:  # a live job owns the cell's checkpoints: a duplicate stops before touching them
        lock = CellLock(Path(smk.params.checkpoint_dir)).acquire()
    except CellBusy as busy:  # not in the rule's log: that file is the owner's
        raise SystemExit(f"train {smk.wildcards.cell}: {busy}") from None
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
        processes=smk.params.processes,
        gpus=getattr(smk.resources, "gpu", 0),
        jobs_per_gpu=smk.config["resources"].get("jobs_per_gpu", 1),
        tracking=trackers.identity(smk.wildcards.cell, smk.config),
    )
    lock.release()
    write_manifest(smk, "train", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__" and sys.argv[1:2] == ["--arguments-json"]:  # one process of launch_command
    arguments = json.loads(Path(sys.argv[2]).read_text())
    main(**{k: Path(v) if k in PATH_ARGUMENTS and v is not None else v for k, v in arguments.items()})
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
    parser.add_argument("--processes", type=int, default=1, help="data-parallel processes (GPUs)")
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
        processes=a.processes,
    )
