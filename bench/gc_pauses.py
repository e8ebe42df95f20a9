"""Python's garbage collector against the training stack, on this machine's CPU: a full collection
of the heap the imports leave, with and without gc.freeze(), and the collections of 30 steps of the
tests' tiny model with train.gc_freeze off and on (scripts/python_gc.py times them).

    python bench/gc_pauses.py --out bench/results/gc_pauses_cpu.json
"""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(PROJECT / "scripts"), str(PROJECT / "tests")]


def full_collections(repeats: int = 3) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect(2)
        seconds.append(round(time.perf_counter() - started, 4))
    return seconds


def main(out: Path, steps: int) -> dict:
    import datasets  # noqa: F401  the heap a training run has (make_trainer imports TRL when it runs)
    import trl  # noqa: F401

    import recipe  # noqa: F401
    import test_recipe
    import train  # noqa: F401

    result = dict(machine=f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores")
    result["command"] = " ".join(["python", "bench/gc_pauses.py", *sys.argv[1:]])
    result["python"] = platform.python_version()
    result["tracked_objects"] = len(gc.get_objects())
    result["full_collection_seconds"] = full_collections()
    gc.freeze()
    result["frozen_objects"] = gc.get_freeze_count()
    result["full_collection_seconds_frozen"] = full_collections()
    gc.unfreeze()
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = test_recipe.build_tiny_model(Path(scratch) / "model")
        for freeze in (False, True):
            started = time.perf_counter()
            _, _, trainer = test_recipe.train_tiny(
                model_dir, Path(scratch) / str(freeze), test_recipe.LENGTHS * 5, max_steps=steps, gc_freeze=freeze
            )
            runs[f"gc_freeze={str(freeze).lower()}"] = dict(
                train_seconds=round(time.perf_counter() - started, 2), python_gc=trainer.collections.summary()
            )
    result[f"tiny_model_{steps}_steps"] = runs
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gc_pauses.json"))
    parser.add_argument("--steps", type=int, default=30)
    a = parser.parse_args()
    print(json.dumps(main(a.out, a.steps), indent=1))
