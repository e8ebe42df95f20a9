"""Data-parallel training on one node: torchrun relaunches the train stage once per GPU.

The train stage (scripts/train.py) calls these; the benches use ``join_processes`` and
``gather_memory`` to run exactly as the stage does.
"""

import os
import sys
from pathlib import Path

import torch

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def world_size() -> int:
    """Processes of this data-parallel run (torchrun sets WORLD_SIZE; 1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_command(
    processes: int, arguments_file: Path, log_dir: Path | None = None, script: Path = TRAIN_SCRIPT
) -> list[str]:
    """torchrun: this script once per GPU on one node, each process reading the same
    arguments; each QLoRA process holds its own 4-bit base on its own GPU. With log_dir,
    every process's output is also kept there (<run>/attempt_<n>/<rank>/stdout.log, stderr.log)."""
    logs = ["--log-dir", str(log_dir), "--tee", "3"] if log_dir else []
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *logs,
        str(script),
        "--arguments-json",
        str(arguments_file),
    ]


def join_processes() -> tuple[int, int]:
    """(processes, rank) of this run; call it before anything initialises CUDA. Alone: one
    GPU even where several are visible (transformers would wrap the model in
    nn.DataParallel, which TRL refuses). Under torchrun: this process's GPU and the
    process group."""
    processes, rank = world_size(), int(os.environ.get("RANK", "0"))
    if processes == 1:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        return processes, rank
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return processes, rank


def per_process_accumulation(train: dict, processes: int) -> int:
    """The step's global batch stays batch_size x gradient_accumulation_steps: N processes
    each accumulate 1/N of the micro-batches, so the step sees the examples one process
    would see with the full accumulation."""
    steps = train["gradient_accumulation_steps"]
    if steps % processes:
        raise ValueError(
            f"config key 'train.gradient_accumulation_steps' ({steps}) must be a multiple of "
            f"'resources.gpus_per_job' ({processes}) to keep the global batch"
        )
    return steps // processes


def from_main(value):
    """The first process's ``value`` on every process (the value itself when alone)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def gather_memory(stats: dict) -> list[dict]:
    """Every process's memory statistics, in rank order (just this one's when alone)."""
    if world_size() == 1:
        return [stats]
    import torch.distributed as dist

    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, stats)
    return gathered
