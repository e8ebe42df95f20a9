"""Which Python lines make the host wait for the card in a window of training steps.

torch's sync debug mode warns at every synchronizing CUDA call the Python bindings run (an
``.item()``, the truth of a CUDA tensor, a device-to-host copy, ``torch.cuda.synchronize``); each
warning's Python stack, without torch's own frames, is counted by thread. After a sync the card's
queue is empty: it idles until the host launches again (bench/trace_stalls.py ``card_idle``).
Used by bench/profile_step.py ``--sync-sites``.
"""

import collections
import threading
import traceback
import warnings
from pathlib import Path

import torch

SYNC_WARNING = "synchronizing CUDA operation"  # torch's sync debug mode's message
TORCH_DIR = str(Path(torch.__file__).parent)
THIS_FILE = __file__


def _site(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno} {frame.name}"


class SyncSites:
    """Counts synchronizing calls by (thread, innermost ``frames`` Python frames outside torch)."""

    def __init__(self, frames: int = 4):
        self.frames = frames
        self.counts: collections.Counter = collections.Counter()
        self._saved = None

    def start(self) -> None:
        self._saved = (warnings.showwarning, warnings.filters[:])
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every call, not once per line
        warnings.showwarning = self.record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        if self._saved is not None:
            warnings.showwarning, warnings.filters[:] = self._saved
            self._saved = None

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WARNING not in str(message):
            return self._saved[0](message, category, filename, lineno, file, line)
        stack = [
            f
            for f in traceback.extract_stack()
            if not f.filename.startswith(TORCH_DIR) and f.filename != THIS_FILE and "warnings" not in f.filename
        ]
        sites = tuple(_site(f) for f in stack[-self.frames :])
        self.counts[(threading.current_thread().name, sites)] += 1

    def summary(self, steps: int) -> list[dict]:
        """The sites, most frequent first: the thread, calls a step, the stack (innermost last)."""
        return [
            dict(thread=thread, per_step=round(count / steps, 2), stack=list(sites))
            for (thread, sites), count in self.counts.most_common()
        ]
