"""Slurm's warning before a time limit: the train job saves a checkpoint and stops.

The train rule asks ``sbatch --signal=URG@<seconds>`` (``slurm_extra``, rules/train.smk):
that many seconds before the limit Slurm sends SIGURG to every process of the job's steps.
SIGURG, not the customary USR1: a process that does not listen ignores SIGURG, while USR1
kills it, and the step also holds the Snakemake process and shell that run train.py (seen
on the test cluster: USR1 killed both). Slurm checks its timers about every 30 s, so the
warning may come up to a minute early, even before this process listens: ``listen`` then
asks Slurm for the time left.

On the warning the job saves a checkpoint at the end of the step it is in and stops with an
error: work after that save would be lost at the kill anyway. Snakemake's retry asks twice
the time (rules: ``attempt``) and resumes from the checkpoint (resume.prepare_checkpoints).
"""

import os
import re
import signal
import subprocess
import threading

WARNING_SIGNAL = signal.SIGURG
MAX_WARNING_SECONDS = 300
WARNING_ENV = "QLORA_SLURM_WARNING_SECONDS"  # read by torchrun's processes
_warned = threading.Event()
_stopped_at: list[int] = []


def warning_seconds(runtime_min: int) -> int:
    """Warn half the job's time before its limit, at most 5 minutes (a LoRA checkpoint saves
    in seconds; the rest covers Slurm's timer resolution and a long step)."""
    return min(MAX_WARNING_SECONDS, int(runtime_min) * 30)


def sbatch_options(runtime_min: int) -> str:
    """The train job's extra sbatch options: the warning signal; requeueable (preemption with
    PreemptMode=REQUEUE, `scontrol requeue`); a requeued run appends to the job's log."""
    return f"--signal=URG@{warning_seconds(runtime_min)} --requeue --open-mode=append"


def slurm_seconds_left(job_id: str) -> int | None:
    """The job's time left as squeue reports it ([days-]hours:minutes:seconds); None if unknown."""
    try:
        left = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", left.strip())
    if not match:
        return None  # UNLIMITED, NOT_SET, or not a job
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def listen(warning: int | None = None) -> None:
    """Remember the warning from now on; call it before the slow imports and the model load.
    With the warning's lead time (given, or inherited from the launching process) a job
    already that close to its limit counts as warned."""
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
        signal.signal(WARNING_SIGNAL, lambda signum, frame: _warned.set())
    warning = warning or int(os.environ.get(WARNING_ENV, 0))
    job_id = os.environ.get("SLURM_JOB_ID")
    if not (warning and job_id):
        return
    os.environ[WARNING_ENV] = str(warning)
    left = slurm_seconds_left(job_id)
    if left is not None and left <= warning:
        _warned.set()


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
    """A Trainer callback: after the warning, save a checkpoint at the end of this step and stop."""
    from transformers import TrainerCallback

    class SaveOnWarning(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _all_agree(_warned.is_set()):
                _warned.clear()
                control.should_save = True
                control.should_training_stop = True
                _stopped_at.append(state.global_step)
                logger.warning(
                    "Slurm's time-limit warning (SIGURG): saving a checkpoint at step %d and stopping",
                    state.global_step,
                )
            return control

    return SaveOnWarning()


def stopped_at(step: int) -> bool:
    """The warning stopped the run at this step (its checkpoint saved there)."""
    return step in _stopped_at


def exit_if_stopped() -> None:
    """After trainer.train(): a run stopped by the warning writes no outputs and fails, so
    that Snakemake reruns it (with more time) from the checkpoint."""
    if _stopped_at:
        raise SystemExit(
            f"train: stopped at step {_stopped_at[-1]} by Slurm's time-limit warning after saving "
            "a checkpoint; the rerun (Snakemake's retry with twice the time) resumes from it"
        )
