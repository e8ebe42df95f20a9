"""train.gc_freeze and the collection times (scripts/python_gc.py) on the tiny model, on the CPU."""

import gc
import threading
import time

import pytest
from transformers import TrainerCallback

import python_gc
from test_recipe import LENGTHS, train_tiny


class FreezeCount(TrainerCallback):
    """The collector's permanent generation at every step of the run."""

    def __init__(self):
        self.counts = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.counts.append(gc.get_freeze_count())


def test_a_frozen_heap_trains_to_the_same_losses_and_thaws_after(tiny_model, tmp_path):
    seen = {}
    for freeze in (False, True):
        during = FreezeCount()
        history, _, trainer = train_tiny(
            tiny_model, tmp_path / str(freeze), LENGTHS, callbacks=[during], gc_freeze=freeze
        )
        seen[freeze] = [h["loss"] for h in history], during.counts, trainer.collections.summary()
        assert gc.get_freeze_count() == 0  # thawed when train() returned
    (plain, plain_counts, plain_gc), (frozen, frozen_counts, frozen_gc) = seen[False], seen[True]
    assert frozen == plain and len(plain) == 4  # the same numbers, every logged step
    assert plain_counts == [0] * 6 and plain_gc["frozen_objects"] is None
    # the imports and the model: a large heap, frozen at the start and through every step (less
    # what reference counting frees meanwhile)
    assert len(frozen_counts) == 6 and all(100_000 < n <= frozen_gc["frozen_objects"] for n in frozen_counts)
    for summary in (plain_gc, frozen_gc):
        assert summary["by_generation"]["0"]["count"] > 0  # training allocates: collections ran, timed
        assert summary["seconds"] == pytest.approx(
            sum(g["seconds"] for g in summary["by_generation"].values()), abs=5e-4
        )


def test_each_collection_is_timed_with_the_thread_it_ran_on():
    with python_gc.during_training(freeze=False) as times:
        gc.collect(1)
        time.sleep(0.2)
        worker = threading.Thread(target=gc.collect, args=(2,))  # a full collection: measurably long
        worker.start()
        worker.join()
    gc.collect(0)  # after the block: not counted
    summary = times.summary()
    assert {g: s["count"] for g, s in summary["by_generation"].items()} == {"1": 1, "2": 1}
    assert summary["other_threads_seconds"] == summary["by_generation"]["2"]["seconds"] > 0
    # the full one: when it began (after the 0.2 s sleep) and how long it took
    ((began, seconds),) = summary["full_collections"]
    assert 0.2 <= began < 1.0 and seconds == pytest.approx(summary["by_generation"]["2"]["seconds"], abs=1e-4)
    assert summary["frozen_objects"] is None and times not in gc.callbacks
