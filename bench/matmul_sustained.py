"""The card's bf16 matmul rate in a burst and sustained, at the 7B shape's training matmuls.

The 6·N bound of issue 15 divides by 798 TFLOP/s, measured by 20 back-to-back 8192^3 matmuls
(../shared/notes/gpu_probe.py): a burst at the boost clock. A training step keeps the card at its
power limit for seconds, where the clock drops (bench/results/smi_h200_block_clocks.csv). For each
shape: the burst as the probe timed it, then ``--seconds`` of back-to-back calls, timed in windows
of about ``window`` seconds (one) each with the SM clock and the power draw nvidia-smi reads after the window.

    python bench/matmul_sustained.py --out bench/results/matmul_sustained_h200.json
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

# (tokens, in, out): the square probe, then a 2048 x 4 step's q/k/v/o, gate/up and down projections
SHAPES = ((8192, 8192, 8192), (8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096))


def clocks() -> dict:
    """The SM clock (MHz) and power draw (W) now, from nvidia-smi; empty where there is none."""
    query = "clocks.sm,power.draw,clocks_event_reasons.active"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()[0]
        sm, power, reasons = (x.strip() for x in line.split(","))
        return dict(sm_mhz=int(sm), power_w=float(power), reasons=reasons)
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return {}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rate(a: torch.Tensor, b: torch.Tensor, calls: int, device: str) -> float:
    """TFLOP/s of ``calls`` back-to-back a @ b, timed from a synced start to a synced end."""
    sync(device)
    started = time.perf_counter()
    for _ in range(calls):
        a @ b
    sync(device)
    return calls * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - started) / 1e12


def significant(tflops: float) -> float:
    """Four significant digits: 802.3 on the card, 0.02131 for a CPU's small shapes (one decimal
    rounded a slow CPU's burst to 0.0)."""
    return float(f"{tflops:.4g}")


def measure(shape: tuple, seconds: float, device: str, dtype: torch.dtype, window: float = 1.0) -> dict:
    tokens, inner, out = shape
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(tokens, inner, device=device, dtype=dtype, generator=generator)
    b = torch.randn(inner, out, device=device, dtype=dtype, generator=generator)
    rate(a, b, 3, device)  # warm-up, as the probe
    burst = rate(a, b, 20, device)
    per_window = max(1, int(window * burst * 1e12 / (2 * tokens * inner * out)))  # calls in about a window
    windows, ends = [], time.perf_counter() + seconds
    while time.perf_counter() < ends:
        windows.append(dict(tflops=significant(rate(a, b, per_window, device)), **clocks()))
    steady = windows[len(windows) // 2 :] or windows  # the second half: the clock has settled
    return dict(
        shape=dict(tokens=tokens, inner=inner, out=out),
        burst_tflops=significant(burst),
        sustained_tflops=significant(statistics.median(w["tflops"] for w in steady)),
        windows=windows,
    )


def main(seconds: float, out: Path | None, device: str = "cuda", shapes=SHAPES, window: float = 1.0) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(json.dumps(dict(seconds=seconds, device=device, dtype=str(dtype), shapes=shapes)), flush=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = dict(device=name, torch=torch.__version__, seconds_per_shape=seconds, rows=[])
    for shape in shapes:
        result["rows"].append(measure(shape, seconds, device, dtype, window))
        row = result["rows"][-1]
        print(shape, row["burst_tflops"], row["sustained_tflops"], flush=True)
        if out:
            out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="sustained calls per shape")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    main(a.seconds, a.out)
