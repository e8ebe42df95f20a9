"""What is alive on the GPU at a run's allocation peak, grouped by where it was allocated.

``bench/epochs.py run --memory-history`` records the CUDA caching allocator's history over a
row (``torch.cuda.memory._record_memory_history``, Python stacks at each allocation) and this
module replays it: the allocated bytes after every event (allocations up, free requests down,
as ``torch.cuda.memory_allocated`` counts them), the peak, and the blocks live at the peak by
the innermost frames outside torch. It answers why one recipe peaks above another (issue 15:
recorded CUDA-graph steps peaked ~0.55 GiB above the eager plan at batch 4, because every
recording kept the autograd graph behind its loss: bench/results/graph_memory_h200_recorded).
"""

from collections import Counter

import torch

GIB = 1024**3
SKIP = ("<frozen", "/contextlib.py", "/functools.py")  # frames that name no owner, with torch's own


def torch_frame(filename: str) -> bool:
    """A frame of the torch package itself (the installation's own path may contain "/torch/")."""
    return filename.rpartition("-packages/")[2].startswith("torch/")


def start(max_entries: int = 3_000_000) -> int:
    """Start recording; returns the bytes already allocated (the replay's starting level)."""
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=max_entries)
    return torch.cuda.memory_allocated()


def stop() -> dict:
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snapshot


def site(frames: list[dict], depth: int = 3) -> str:
    """The ``depth`` innermost frames outside torch's own modules, innermost first."""
    owners = [f for f in frames if not torch_frame(f["filename"]) and not any(s in f["filename"] for s in SKIP)]
    return " < ".join(f"{'/'.join(f['filename'].rsplit('/', 2)[-2:])}:{f['line']}:{f['name']}" for f in owners[:depth])


def peak_breakdown(snapshot: dict, baseline: int, top: int = 30, device: int = 0) -> dict:
    """The allocation peak of the recorded history and what was live at it, by allocation site.
    ``baseline``: bytes allocated when the recording started (their owners are not in the trace)."""
    trace = snapshot["device_traces"][device]
    level, peak, peak_index = baseline, baseline, -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            level += event["size"]
            if level > peak:
                peak, peak_index = level, index
        elif event["action"] == "free_requested":
            level -= event["size"]
    # Replay again up to the peak: the blocks allocated in the trace and not yet freed there.
    at_peak: dict[int, dict] = {}
    for event in trace[: peak_index + 1]:
        if event["action"] == "alloc":
            at_peak[event["addr"]] = event
        elif event["action"] == "free_requested":
            at_peak.pop(event["addr"], None)
    # per site: its blocks by size, and by the step that allocated them (step_levels' tags)
    groups: dict[str, tuple[Counter, Counter]] = {}
    for event in at_peak.values():
        sizes, steps = groups.setdefault(site(event.get("frames", [])), (Counter(), Counter()))
        sizes[event["size"]] += 1
        steps[event.get("user_metadata") or "untagged"] += 1
    totals = {name: sum(size * n for size, n in sizes.items()) for name, (sizes, _) in groups.items()}
    ranked = sorted(groups, key=lambda name: -totals[name])
    return {
        "peak_gib": round(peak / GIB, 3),
        "baseline_gib": round(baseline / GIB, 3),
        "events": len(trace),
        "peak_event": peak_index,
        "traced_live_at_peak_gib": round(sum(totals.values()) / GIB, 3),
        # the allocation that set the peak, deeper: forward, recomputation or backward, and where
        "peak_allocation": {
            "gib": round(trace[peak_index]["size"] / GIB, 4) if peak_index >= 0 else None,
            "site": site(trace[peak_index].get("frames", []), depth=10) if peak_index >= 0 else None,
        },
        "by_site": [
            {
                "site": name,
                "gib": round(totals[name] / GIB, 4),
                "blocks": groups[name][0].total(),
                "sizes": {str(size): n for size, n in groups[name][0].most_common(4)},
                "allocated_in": dict(groups[name][1].most_common(4)),
            }
            for name in ranked[:top]
        ],
        "other_sites_gib": round(sum(totals[name] for name in ranked[top:]) / GIB, 4),
    }


def tag_allocations(tag: str) -> None:
    """Attach ``tag`` to the allocations from here on in the recorded history (the trace's
    ``user_metadata``), where this torch can (``_set_memory_metadata``, recent releases)."""
    setter = getattr(torch.cuda.memory, "_set_memory_metadata", None)
    if setter is not None:
        setter(tag)


def step_levels():
    """A Trainer callback: after every step, the running peak and the allocated bytes (GiB);
    a recipe whose peak grows over the run shows at which steps. Each step's allocations carry
    its number in a recorded history, so a block alive at the peak says which step made it."""
    from transformers import TrainerCallback

    class StepLevels(TrainerCallback):
        def __init__(self):
            self.levels: list[list] = []

        def on_step_begin(self, args, state, control, **kwargs):
            tag_allocations(f"step {state.global_step}")

        def on_step_end(self, args, state, control, **kwargs):
            peak, now = torch.cuda.max_memory_allocated() / GIB, torch.cuda.memory_allocated() / GIB
            self.levels.append([state.global_step, round(peak, 3), round(now, 3)])

    return StepLevels()


def allocator_state() -> dict:
    """The allocator settings in force and whether its segments are expandable (the snapshot's
    word; None where this torch's snapshot does not say), so a row shows what it ran with."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    segments = torch.cuda.memory_snapshot()
    flags = [s["is_expandable"] for s in segments if "is_expandable" in s]
    return {
        "settings": getter() if getter else None,
        "segments": len(segments),
        "expandable_segments": sum(flags) if flags else None,
    }
