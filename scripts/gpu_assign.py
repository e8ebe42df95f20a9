"""Which GPU(s) a model job runs on, so that concurrent local jobs never share a card.

Snakemake's ``--resources gpu=N`` only counts: it lets at most N GPUs' worth of jobs run at
once but does not say which card each job gets. Every model job therefore claims its cards
here, before anything initialises CUDA: it takes an exclusive ``flock`` on a lock file per
card slot in a host-wide folder (``QLORA_GPU_LOCK_DIR``, default
``/tmp/qlora-snakemake-gpu-locks``), one slot on each of the cards it needs (the least
busy first), and sets ``CUDA_VISIBLE_DEVICES`` to them. A card has
``resources.jobs_per_gpu`` slots: 1 (the default) gives every job cards of its own; more
lets evaluation and merge jobs of a small model share a card (then run Snakemake with
``--resources gpu=<cards x jobs_per_gpu>``). A training job always takes every slot of
its cards, so its speed and memory are its own. The kernel drops a lock when
its process ends, killed or not, so a dead job never holds a card.

The cards a job may use are those of ``CUDA_VISIBLE_DEVICES`` when it is set, else every
card ``nvidia-smi`` lists. Under Slurm (``SLURM_JOB_ID`` set) nothing is claimed: the job
uses exactly the GPUs Slurm gave it. Data-parallel processes started by torchrun inherit
their parent's claim.
"""

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

DEFAULT_LOCK_DIR = "/tmp/qlora-snakemake-gpu-locks"
_held: list = []  # open lock files: the claim lasts as long as this process


class GpuAssignmentError(RuntimeError):
    pass


def candidate_gpus(environ=os.environ) -> list[str]:
    """The cards this job may use: CUDA_VISIBLE_DEVICES when set, else those nvidia-smi lists."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    return [line.strip() for line in listed.stdout.splitlines() if line.strip().isdigit()]


def _try_lock(path: Path):
    # Shared by every user of the host: anyone may open the lock file.
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    handle.flush()
    return handle


def _free_slots(lock_dir: Path, gpu: str, slots: int) -> int:
    free = 0
    for slot in range(slots):
        handle = _try_lock(lock_dir / f"gpu{gpu}.slot{slot}.lock")
        if handle is not None:
            free += 1
            handle.close()
    return free


def claim(
    count: int,
    candidates: list[str],
    lock_dir: Path,
    slots: int = 1,
    exclusive: bool = False,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
) -> list[str]:
    """One slot (``exclusive``: every slot) on each of ``count`` distinct cards among
    ``candidates``, the least busy first; waits up to timeout_s for them to come free.
    Held until this process ends."""
    if count > len(candidates):
        raise GpuAssignmentError(
            f"this job needs {count} GPU(s) but only {len(candidates)} may be used here "
            f"({','.join(candidates) or 'none'}): lower resources.gpu / resources.gpus_per_job"
        )
    if not Path(lock_dir).is_dir():
        Path(lock_dir).mkdir(parents=True, exist_ok=True)
        Path(lock_dir).chmod(0o1777)  # like /tmp: everyone may add a lock file
    deadline = time.monotonic() + timeout_s
    while True:
        taken: dict[str, list] = {}
        for gpu in sorted(candidates, key=lambda g: -_free_slots(Path(lock_dir), g, slots)):
            handles = []
            for slot in range(slots):
                handle = _try_lock(Path(lock_dir) / f"gpu{gpu}.slot{slot}.lock")
                if handle is not None:
                    handles.append(handle)
                    if not exclusive:
                        break
            if handles and (not exclusive or len(handles) == slots):
                taken[gpu] = handles
            else:
                for handle in handles:
                    handle.close()
            if len(taken) == count:
                _held.extend(h for hs in taken.values() for h in hs)
                return list(taken)
        for handle in (h for hs in taken.values() for h in hs):  # not enough: give back, let others proceed
            handle.close()
        if time.monotonic() > deadline:
            holders = {p.name: p.read_text().strip() for p in sorted(Path(lock_dir).glob("gpu*.lock"))}
            raise GpuAssignmentError(
                f"no {count} free GPU(s) among {candidates} after {timeout_s:.0f} s (held: {holders}); "
                f"run snakemake with --resources gpu=<number of GPUs> so it never starts more GPU jobs than cards"
            )
        time.sleep(poll_s)


def assign_gpus(
    count: int, logger=None, environ=os.environ, jobs_per_gpu: int = 1, exclusive: bool = False
) -> list[str]:
    """Claim this job's GPU(s) and make them the only ones CUDA sees; call it before any
    CUDA call. Returns the physical card indices ([] on a CPU, or under Slurm the ones
    Slurm gave, unchanged)."""
    if count <= 0:
        return []
    if environ.get("SLURM_JOB_ID") or int(environ.get("WORLD_SIZE", "1")) > 1:
        # Slurm's own allocation, or a torchrun child of a job that already claimed.
        return candidate_gpus(environ)
    candidates = candidate_gpus(environ)
    if not candidates:
        if logger:
            logger.warning("no GPU found (nvidia-smi lists none): this job runs on the CPU")
        return []
    lock_dir = Path(environ.get("QLORA_GPU_LOCK_DIR", DEFAULT_LOCK_DIR))
    gpus = claim(count, candidates, lock_dir, jobs_per_gpu, exclusive)
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if logger:
        logger.info("GPU(s) claimed for this job: %s (CUDA_VISIBLE_DEVICES)", ",".join(gpus))
    return gpus
