"""Slurm's warning before a time limit: the train job saves a checkpoint at its next step.

The train rule asks ``sbatch --signal=URG@<seconds>`` (``slurm_extra``, rules/train.smk):
that many seconds before the limit Slurm sends SIGURG to every process of the job's steps.
SIGURG, not the customary USR1: a process that does not listen ignores SIGURG, while USR1
kills it, and the step also holds the Snakemake process and shell that run train.py (seen
on the test cluster: USR1 killed both). Slurm checks its timers about every 30 s, so the
warning may come up to a minute early.

The rerun after the limit (Snakemake's retry with a longer ``runtime``) resumes from that
checkpoint (train.prepare_checkpoints).
"""

import signal
import threading

WARNING_SIGNAL = signal.SIGURG
MAX_WARNING_SECONDS = 300
_warned = threading.Event()


def warning_seconds(runtime_min: int) -> int:
    """Warn half the job's time before its limit, at most 5 minutes (a LoRA checkpoint saves
    in seconds; the rest covers Slurm's timer resolution and a long step)."""
    return min(MAX_WARNING_SECONDS, int(runtime_min) * 30)


def sbatch_options(runtime_min: int) -> str:
    """The train job's extra sbatch options: the warning signal; requeueable (preemption with
    PreemptMode=REQUEUE, `scontrol requeue`); a requeued run appends to the job's log."""
    return f"--signal=URG@{warning_seconds(runtime_min)} --requeue --open-mode=append"


def listen() -> None:
    """Remember the warning from now on (call it before the slow imports and model load)."""
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
        signal.signal(WARNING_SIGNAL, lambda signum, frame: _warned.set())


def _all_agree(flag: bool) -> bool:
    """True when any data-parallel process was warned: all of them save at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    on_gpu = dist.get_backend() == "nccl"
    value = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def save_on_warning(logger):
    """A Trainer callback: after the warning, save a checkpoint at the end of the next step."""
    from transformers import TrainerCallback

    class SaveOnWarning(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _all_agree(_warned.is_set()):
                _warned.clear()
                control.should_save = True
                logger.warning("Slurm's time-limit warning (SIGURG): saving a checkpoint at step %d", state.global_step)
            return control

    return SaveOnWarning()
