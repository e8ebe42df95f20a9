"""One live training job per grid cell: a lock file beside the cell's checkpoint folder.

``checkpoints/<cell>.lock`` names its owner (Slurm job id, host, pid, start) and a heartbeat
the owner rewrites every minute. ``fcntl.flock`` on it separates processes on one node; the
record separates nodes, where a shared file system may not pass flock on. The owner counts
as alive while Slurm still runs its job (``squeue``), or, outside Slurm, while its pid lives
on this host or its heartbeat is under 5 minutes old on another. So a dead job's leftovers
never hold a cell, and a requeued job (the same job id) takes its own lock back.

A duplicate is refused with one sentence: by the train job (train.py) and, before any job
is submitted, by the workflow (rules/common.smk: ``live_owners``).
"""

import argparse
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HEARTBEAT_SECONDS = 60
STALE_SECONDS = 300
SLURM_LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "REQUEUED"}


class CellBusy(RuntimeError):
    """Another live job owns the cell's checkpoint folder."""


def lock_path(checkpoint_dir: Path) -> Path:
    """Beside the folder, not in it: prepare_checkpoints may delete the folder."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.with_name(checkpoint_dir.name + ".lock")


def own_record() -> dict:
    now = time.time()
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
    }


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # absent, or caught mid-write
        return None


def slurm_job_alive(job_id: str) -> bool | None:
    """Whether Slurm still runs the job; None when Slurm cannot be asked."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    except OSError:
        return None
    if result.returncode != 0:
        return False if "Invalid job id" in result.stderr else None
    return bool(SLURM_LIVE_STATES & set(result.stdout.split()))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(record: dict) -> bool:
    job_id = record.get("slurm_job_id")
    if job_id and job_id == os.environ.get("SLURM_JOB_ID"):
        return False  # this job's earlier run, before a requeue
    if job_id:
        alive = slurm_job_alive(job_id)
        if alive is not None:
            return alive
    if record.get("host") == socket.gethostname():
        return pid_alive(record.get("pid", 0))
    return time.time() - float(record.get("heartbeat", 0)) < STALE_SECONDS


def describe(record: dict) -> str:
    started = datetime.fromtimestamp(float(record.get("started", 0)), UTC).strftime("%Y-%m-%d %H:%M UTC")
    who = f"Slurm job {record['slurm_job_id']}" if record.get("slurm_job_id") else f"pid {record.get('pid')}"
    return f"{who} on {record.get('host')} (started {started})"


def busy_message(checkpoint_dir: Path, record: dict | None) -> str:
    owner = describe(record) if record else "a process on this node"
    cancel = f" (scancel {record['slurm_job_id']})" if record and record.get("slurm_job_id") else ""
    return (
        f"{checkpoint_dir} belongs to a live training job, {owner}: this duplicate stops without "
        f"touching it; wait for that job to end or cancel it{cancel}, then rerun"
    )


class CellLock:
    """Context manager owning a checkpoint folder; raises CellBusy when a live job owns it."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.path = lock_path(self.checkpoint_dir)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _write(self, record: dict) -> None:
        # In place: a replaced file would be a new inode, outside the flock.
        data = json.dumps(record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def acquire(self) -> "CellLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CellBusy(busy_message(self.checkpoint_dir, read_record(self.path))) from None
        previous = read_record(self.path)
        if previous and owner_alive(previous):
            os.close(fd)
            raise CellBusy(busy_message(self.checkpoint_dir, previous))
        self._fd = fd
        self.record = own_record()
        self._write(self.record)
        self._heartbeat = threading.Thread(target=self._beat, daemon=True)
        self._heartbeat.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.record["heartbeat"] = time.time()
            self._write(self.record)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # also drops the flock
        self._fd = None

    def __enter__(self) -> "CellLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_owners(checkpoints_root: Path) -> list[tuple[str, dict]]:
    """(cell, owner) of every cell under checkpoints_root that a live job owns."""
    owners = []
    for path in sorted(Path(checkpoints_root).glob("*.lock")):
        record = read_record(path)
        if record and owner_alive(record):
            owners.append((path.name.removesuffix(".lock"), record))
    return owners


def main(checkpoint_dir: Path) -> int:
    """Take and release the cell's lock: 0 when no live job owns it, 1 (and why) when one does."""
    try:
        CellLock(checkpoint_dir).acquire().release()
    except CellBusy as busy:
        print(busy, file=sys.stderr)
        return 1
    print(f"{checkpoint_dir}: no live job owns it")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="results_dir/checkpoints/<cell>")
    sys.exit(main(parser.parse_args().checkpoint_dir))
