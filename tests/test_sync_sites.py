"""bench/sync_sites.py: torch's sync-debug warnings counted by thread and Python stack (on a CPU the
warnings are raised as torch raises them on a GPU: "called a synchronizing CUDA operation")."""

import sys
import threading
import warnings
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "bench"))

MESSAGE = "called a synchronizing CUDA operation"


def read_loss():
    warnings.warn(MESSAGE, UserWarning, stacklevel=1)  # as torch warns from the line that synced


def log_step():
    read_loss()


def backward_hook():
    warnings.warn(MESSAGE, UserWarning, stacklevel=1)


def test_sync_sites_count_each_call_by_thread_and_stack_and_pass_other_warnings_on():
    from sync_sites import SyncSites

    sites = SyncSites(frames=2)
    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("default")  # once per line, which the window overrides for syncs
        sites.start()
        for _ in range(8):
            log_step()
        worker = threading.Thread(target=backward_hook, name="autograd")
        worker.start()
        worker.join()
        warnings.warn("not a sync", UserWarning, stacklevel=1)
        sites.stop()
        log_step()  # after stop: not counted, shown as any warning
    summary = sites.summary(steps=4)
    assert summary[0] == dict(
        thread="MainThread",
        per_step=2.0,
        stack=["tests/test_sync_sites.py:20 log_step", "tests/test_sync_sites.py:16 read_loss"],
    )
    assert summary[1]["thread"] == "autograd" and summary[1]["per_step"] == 0.25
    assert summary[1]["stack"][-1] == "tests/test_sync_sites.py:24 backward_hook"
    assert len(summary) == 2
    assert [str(w.message) for w in other] == ["not a sync", MESSAGE]
