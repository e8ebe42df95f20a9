"""The host link's copy rate now: pinned host memory to the card and back, in the offloaded
layers' size (``train.offload_checkpoints``: 64 MiB a layer at 2,048 x 4 on the 7B shape).

The offloaded recipe (config/lean.yaml) moves 31 such inputs each way a step; its blocks'
run-to-run spread (bench/results/epochs_h200_offload_*) is timed against the link's rate
measured before and after each run.

    python bench/host_link.py --label before_run_1 --out /tmp/bgout/host_link.jsonl
"""

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("host_link")


def copy_rates(mib: int = 64, repeats: int = 20) -> dict:
    """Median and slowest GB/s of ``repeats`` single copies each way, each timed by events."""
    host = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    rates = {}
    for direction, (source, target) in {"to_device": (host, device), "to_host": (device, host)}.items():
        seconds = []
        for _ in range(repeats + 2):  # the first two warm the path
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        gbps = [(mib << 20) / s / 1e9 for s in seconds[2:]]
        rates[direction] = dict(median_gbps=round(statistics.median(gbps), 2), slowest_gbps=round(min(gbps), 2))
    return rates


def main(label: str, out: Path | None, mib: int = 64, repeats: int = 20) -> dict:
    log.info("host_link: label=%s out=%s mib=%d repeats=%d", label, out, mib, repeats)
    record = dict(label=label, time=time.time(), mib=mib, repeats=repeats, **copy_rates(mib, repeats))
    print(json.dumps(record))
    if out is not None:
        with out.open("a") as file:
            file.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    main(**vars(parser.parse_args()))
