"""Python's garbage collector during training: each collection timed, and the heap that was there
before training frozen out of them (``train.gc_freeze``).

A full (generation 2) collection walks every tracked object, ~580k when a run starts training: in
30 steps of the tests' tiny model one ran, 0.29 s on a 2-core CPU, and took no time with the heap
frozen (bench/results/gc_pauses_cpu.json). A collection runs on whichever thread allocates when a
threshold is crossed: the training loop between launches, or the recorder thread in the middle
of a capture (cuda_graphs_capture: ahead), whose captures stood 66-317 ms at a time without a CUDA
call while the loop waited on the card (bench/results/trace_stalls_*). On one H200 the times
recorded here say no: each batch-4 epoch ran one full collection, 0.27-0.31 s on the main thread
(the other threads' 0.012 s at most), and with the heap frozen the epochs were not faster nor the
thread's lag shorter (bench/results/epochs_h200_gc_b4): gc_freeze stays off. Freezing moves the
objects alive at the start into a permanent generation that collections skip; it is undone when
training ends, so what follows collects as before. Nothing numeric changes.
"""

import contextlib
import gc
import threading
import time


class CollectionTimes:
    """Every collection while active: its generation, seconds, whether it ran on the main thread and
    when it began (seconds since training began)."""

    def __init__(self, frozen_objects: int | None):
        self.frozen_objects = frozen_objects
        self.collections: list[tuple[int, float, bool, float]] = []
        self._began = time.perf_counter()
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        ident = threading.get_ident()
        if phase == "start":
            self._started[ident] = time.perf_counter()
        elif ident in self._started:
            started = self._started.pop(ident)
            main = threading.current_thread() is threading.main_thread()
            self.collections.append((info["generation"], time.perf_counter() - started, main, started - self._began))

    def summary(self) -> dict:
        """For metrics.json and bench rows: per generation, how many and how long; and when each full
        one ran (inside the steps, or in a gap)."""
        by_generation = {}
        for generation in sorted({g for g, *_ in self.collections}):
            seconds = [s for g, s, *_ in self.collections if g == generation]
            by_generation[str(generation)] = dict(
                count=len(seconds), seconds=round(sum(seconds), 4), max_seconds=round(max(seconds), 4)
            )
        return dict(
            frozen_objects=self.frozen_objects,
            by_generation=by_generation,
            seconds=round(sum(s for _, s, *_ in self.collections), 4),
            other_threads_seconds=round(sum(s for _, s, main, _ in self.collections if not main), 4),
            full_collections=[(round(began, 3), round(s, 4)) for g, s, _, began in self.collections if g == 2],
        )


@contextlib.contextmanager
def during_training(freeze: bool):
    """Times every collection inside; with ``freeze``, the heap alive at entry is left out of them."""
    frozen = None
    if freeze:
        gc.collect()  # what is garbage now is collected, not frozen
        gc.freeze()
        frozen = gc.get_freeze_count()
    times = CollectionTimes(frozen)
    gc.callbacks.append(times)
    try:
        yield times
    finally:
        gc.callbacks.remove(times)
        if freeze:
            gc.unfreeze()
