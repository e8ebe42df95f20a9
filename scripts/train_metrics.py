"""What a training job measures, and exactly how (report/columns.md names the same).

- Speed: every optimizer step is timed (wall seconds, non-padding tokens).
  ``steady_tokens_per_second`` is the tokens of all steps after the first ``warmup`` divided
  by their total time: a ratio of sums, not a median of per-step rates (which is biased low
  when steps are grouped by length and short steps carry few tokens).
- Loss: ``final_train_loss`` is the token-weighted mean of the logged losses over the last
  10 % of optimizer steps (at least one logged entry), so one short last batch does not
  decide it; the last logged value alone is kept as ``last_batch_loss``.
- Memory on a GPU: torch's allocator peaks, reset after loading, so the training peak is
  the training phase's. A paged optimizer's state lives in CUDA unified memory outside that
  allocator: its size is stated beside the peak (``optimizer_state_bytes``).
- Memory on a CPU: the process's resident set. Its high-water mark is reset right before
  training (Linux ``/proc/self/clear_refs``), so ``train_peak_rss_bytes`` is the peak
  during training, model weights resident included, loading's transient peak excluded.
"""

import csv
import itertools
import statistics
import time
from pathlib import Path

import torch

FINAL_LOSS_SHARE = 0.10


def memory_stats(prefix: str) -> dict:
    if not torch.cuda.is_available():
        return {f"{prefix}_peak_allocated_bytes": None, f"{prefix}_peak_reserved_bytes": None}
    return {
        f"{prefix}_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        f"{prefix}_peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


def _status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> int | None:
    """Reset the process's RSS high-water mark to its current RSS; returns that RSS.
    Where the kernel does not allow it, returns None (the phase peak is then unknown)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    return _status_bytes("VmHWM")


def optimizer_state_bytes(optimizer) -> tuple[int, bool]:
    """Bytes held by the optimizer's state tensors, and whether they are paged
    (bitsandbytes' paged optimizers keep them outside torch's allocator)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the real one
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total, bool(getattr(inner, "is_paged", False))


def step_timer():
    """A Trainer callback timing every optimizer step (seconds, non-padding tokens).

    On a GPU a step is timed by CUDA events, on the device's timeline, and read after training:
    a synchronize per step would stall the host that otherwise queues the next step while the
    GPU runs this one. A step waiting for the host shows its idle time all the same."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: dict[int, tuple] = {}  # step -> (start, end, tokens)
            self.train_marks: dict[str, object] = {}  # on_train_begin / on_train_end
            self.train_host: dict[str, float] = {}  # the same moments by the host's clock

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_marks["begin"], self.train_host["begin"] = _time_mark(), time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._started, self._tokens = _time_mark(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.marks[state.global_step] = (self._started, _time_mark(), state.num_input_tokens_seen - self._tokens)

        def on_epoch_end(self, args, state, control, **kwargs):
            self.train_marks["epoch_end"] = _time_mark()  # the last epoch's, once training ends

        def on_train_end(self, args, state, control, **kwargs):
            self.train_marks["end"], self.train_host["end"] = _time_mark(), time.perf_counter()

        @property
        def steps(self) -> dict[int, dict]:
            return {
                step: {"step_seconds": _seconds_between(start, end), "step_tokens": tokens}
                for step, (start, end, tokens) in self.marks.items()
            }

        @property
        def outside_steps(self) -> dict | None:
            """Seconds of the training loop (on_train_begin to on_train_end) outside the timed steps:
            before the first, between steps (the gaps summed, and the longest), after the last (and
            of that, after the epoch's end); on a GPU on the device's timeline, where a gap is the
            card waiting for the host."""
            if not self.marks or not {"begin", "end"} <= set(self.train_marks):
                return None
            spans = [self.marks[step][:2] for step in sorted(self.marks)]
            gaps = [_seconds_between(end, start) for (_, end), (start, _) in itertools.pairwise(spans)]
            return {
                "before_first_step": round(_seconds_between(self.train_marks["begin"], spans[0][0]), 4),
                "between_steps": round(sum(gaps), 4),
                "longest_gap": round(max(gaps, default=0.0), 4),
                "after_last_step": round(_seconds_between(spans[-1][1], self.train_marks["end"]), 4),
                # of which the trainer's wrap-up after its epoch loop (final log line and metrics)
                "after_epoch_end": round(_seconds_between(self.train_marks["epoch_end"], self.train_marks["end"]), 4)
                if "epoch_end" in self.train_marks
                else None,
            }

    return StepTimer()


def _time_mark():
    if torch.cuda.is_available():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds_between(start, end) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


def median_step_tokens_per_second(step_seconds: list[float], tokens_per_step: int, warmup: int = 3) -> float:
    """Fixed-size steps (synthetic blocks): tokens of one step over the median step after the
    first ``warmup`` (compilation, allocator growth); all steps if there are no more."""
    return tokens_per_step / statistics.median(step_seconds[warmup:] or step_seconds)


def steady_tokens_per_second(steps: dict[int, dict], warmup: int = 3) -> float | None:
    """Tokens over time of every step after the first ``warmup`` ones (a ratio of sums)."""
    after = [s for _, s in sorted(steps.items())[warmup:]]
    seconds = sum(s["step_seconds"] for s in after)
    return round(sum(s["step_tokens"] for s in after) / seconds, 2) if seconds > 0 else None


def loss_curve(log_history: list[dict], steps: dict[int, dict]) -> list[dict]:
    """The logged losses with the timing of their step; ``interval_tokens`` are the tokens
    of every step the logged loss averages (logging_steps may be > 1)."""
    curve, previous = [], 0
    for entry in log_history:
        if "loss" not in entry:
            continue
        step = entry["step"]
        timed = [steps[s] for s in range(previous + 1, step + 1) if s in steps]
        curve.append(
            {
                "step": step,
                "epoch": entry.get("epoch"),
                "loss": entry["loss"],
                "learning_rate": entry.get("learning_rate"),
                "grad_norm": entry.get("grad_norm"),
                **steps.get(step, {"step_seconds": None, "step_tokens": None}),
                "interval_tokens": sum(s["step_tokens"] for s in timed) if timed else None,
            }
        )
        previous = step
    return curve


LOSS_CURVE_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "step_seconds", "step_tokens"]
LOSS_CURVE_COLUMNS += ["interval_tokens"]


def write_loss_curve(curve: list[dict], path: Path) -> None:
    """loss_curve.csv: one row per logged step (loss_curve's rows)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOSS_CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(curve)


def final_loss(curve: list[dict], total_steps: int, share: float = FINAL_LOSS_SHARE) -> tuple[float | None, int]:
    """Token-weighted mean of the logged losses of the last ``share`` of the steps, and the
    number of steps it covers. Entries without token counts (a resumed run's earlier
    steps) weigh equally among themselves."""
    if not curve:
        return None, 0
    first = total_steps - max(1, round(share * total_steps))
    last = [p for p in curve if p["step"] > first] or curve[-1:]
    weights = [p.get("interval_tokens") or 0 for p in last]
    if sum(weights) == 0:
        return round(statistics.fmean(p["loss"] for p in last), 6), total_steps - first
    return round(sum(w * p["loss"] for w, p in zip(weights, last, strict=True)) / sum(weights), 6), total_steps - first
