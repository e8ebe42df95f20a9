"""How the training job measures speed, loss and CPU memory (scripts/train_metrics.py)."""

import json
import subprocess
import sys

import pytest

import train_metrics
from conftest import PROJECT


def test_steady_speed_is_tokens_over_time_not_a_median_of_rates():
    # Steps grouped by length: three warm-up steps, then short cheap steps and long ones.
    steps = {1: {"step_seconds": 5.0, "step_tokens": 100}, 2: {"step_seconds": 5.0, "step_tokens": 100}}
    steps[3] = {"step_seconds": 5.0, "step_tokens": 100}
    for step in range(4, 10):  # six short steps: 28 tokens in 0.02 s (1,400 tok/s)
        steps[step] = {"step_seconds": 0.02, "step_tokens": 28}
    for step in range(10, 13):  # three long steps: 4,096 tokens in 0.5 s (8,192 tok/s)
        steps[step] = {"step_seconds": 0.5, "step_tokens": 4096}
    expected = (6 * 28 + 3 * 4096) / (6 * 0.02 + 3 * 0.5)
    assert train_metrics.steady_tokens_per_second(steps, warmup=3) == pytest.approx(expected, abs=0.01)
    assert expected > 7000  # the median of per-step rates would say 1,400
    assert train_metrics.steady_tokens_per_second({1: {"step_seconds": 1.0, "step_tokens": 9}}, warmup=3) is None


def test_final_loss_is_a_token_weighted_mean_over_the_last_steps():
    steps = {s: {"step_seconds": 0.1, "step_tokens": 1000} for s in range(1, 21)}
    steps[20]["step_tokens"] = 28  # a short last batch with an extreme loss
    log = [{"step": s, "loss": 2.0} for s in range(1, 20)] + [{"step": 20, "loss": 6.4}]
    curve = train_metrics.loss_curve(log, steps)
    value, covered = train_metrics.final_loss(curve, total_steps=20)
    assert covered == 2  # the last 10 % of 20 steps
    assert value == pytest.approx((1000 * 2.0 + 28 * 6.4) / 1028, abs=1e-6)
    assert curve[-1]["loss"] == 6.4  # what the old "final" loss reported


def test_final_loss_weights_logging_intervals_by_their_tokens():
    steps = {s: {"step_seconds": 0.1, "step_tokens": 100 * s} for s in range(1, 41)}
    log = [{"step": s, "loss": float(s)} for s in range(10, 41, 10)]  # logging_steps = 10
    curve = train_metrics.loss_curve(log, steps)
    assert curve[-1]["interval_tokens"] == sum(100 * s for s in range(31, 41))
    value, covered = train_metrics.final_loss(curve, total_steps=40)
    assert covered == 4 and value == 40.0  # only the last logged interval lies in the last 4 steps


PHASE = """
import json, sys
import numpy as np
sys.path.insert(0, {scripts!r})
import train_metrics
train_metrics.reset_peak_rss()
transient = np.ones(400 * 1024**2 // 8)  # 400 MiB touched, like loading a checkpoint
del transient
process_peak = train_metrics.peak_rss_bytes()
start = train_metrics.reset_peak_rss()
working = np.ones(50 * 1024**2 // 8)  # the training phase's own 50 MiB
phase_peak = train_metrics.peak_rss_bytes()
print(json.dumps([process_peak, start, phase_peak]))
"""


def test_cpu_memory_phase_excludes_an_earlier_transient_peak():
    # A fresh interpreter: its memory is only what this test allocates.
    code = PHASE.format(scripts=str(PROJECT / "scripts"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    process_peak, start, phase_peak = json.loads(out)
    assert start is not None, "the kernel refused to reset the RSS high-water mark"
    assert phase_peak >= start + 45 * 1024**2
    assert phase_peak < process_peak - 300 * 1024**2
