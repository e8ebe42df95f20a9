"""Where the host threads of a profiled step waited, from a torch.profiler timeline (bench/profile_step.py
--trace-dir): the CUDA calls that blocked (longest first, per thread), the driver's "Command Buffer Full"
stalls and the calls they sat in, and for each graph capture in the window the capturing thread's
stretches without a CUDA call beside the other threads' blocked calls and their CUDA calls (the
capture's backward launches from autograd's device thread), the same for every other thread
with CUDA calls during the capture (``beside``: autograd's device thread running the backward, the
loop replaying), and, where the timeline has Python stacks (bench/profile_step.py --python-stacks),
the innermost Python call each stretch sat in and the Python calls inside it. ``card_idle``: the
gaps between the card's kernels, each by its cause: the next kernel launched only after the card
ran dry (the host late: the Python call the host sat in meanwhile, and the blocking CUDA call that
ended inside the gap, a sync that drained the queue) or launched before and waiting on the card.

    python bench/trace_stalls.py traces/trace_x.json.gz --out bench/results/trace_stalls_x.json
"""

import argparse
import collections
import gzip
import json
from pathlib import Path

CUDA_CALLS = ("cuda_runtime", "cuda_driver")


def load_events(trace: Path) -> list[dict]:
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as handle:
        return [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X"]


def inside(inner: dict, outer: dict) -> bool:
    return outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + 0.5


def innermost_python_call(python_calls: list[dict], a: float, b: float) -> str | None:
    """The innermost of a thread's Python calls spanning the stretch from a to b."""
    spanning = [e for e in python_calls if e["ts"] <= a and b <= e["ts"] + e["dur"]]
    return min(spanning, key=lambda e: e["dur"])["name"] if spanning else None


def python_inside(python_calls: list[dict], a: float, b: float) -> dict[str, float]:
    """A thread's Python calls inside the stretch from a to b: the three longest names' total ms
    (a nested call counts in its own right): what a stretch no single call spans ran."""
    total = collections.Counter()
    for e in python_calls:
        if a <= e["ts"] and e["ts"] + e["dur"] <= b:
            total[e["name"]] += e["dur"]
    return {name: round(us / 1e3, 1) for name, us in total.most_common(3)}


SYNCS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent")  # CUDA calls that can block the host


def card_idle(kernels: list[dict], calls: list[dict], python_by_thread: dict, idle_us: float, top: int = 12) -> dict:
    """The card's gaps of at least ``idle_us`` between kernels, in ms by cause; for those the host
    caused, the innermost Python call spanning the host's stretch from the card running dry to the
    launch, and the blocking calls that ended in the gap (their queue drained first)."""
    launches = {e["args"]["correlation"]: e for e in calls if "correlation" in e.get("args", {})}
    blocking = [c for c in calls if any(s in c["name"] for s in SYNCS)]
    causes, sat_in, after = collections.Counter(), collections.Counter(), collections.Counter()
    gaps = 0
    for before, kernel in zip(kernels, kernels[1:], strict=False):
        dry = before["ts"] + before["dur"]
        idle = kernel["ts"] - dry
        if idle < idle_us:
            continue
        gaps += 1
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            causes["launch not in the timeline"] += idle
        elif launch["ts"] < dry:
            causes["launched before the card ran dry"] += idle
        else:
            causes["launched after the card ran dry"] += idle
            own = python_by_thread.get(launch["tid"], [])
            sat_in[innermost_python_call(own, dry, launch["ts"]) or "no Python call spans it"] += idle
            for c in blocking:
                if dry - 1 <= c["ts"] + c["dur"] <= kernel["ts"]:
                    after[c["name"]] += idle
    return dict(
        gaps=gaps,
        idle_ms=round(sum(causes.values()) / 1e3, 1),
        by_cause={k: round(v / 1e3, 1) for k, v in causes.most_common()},
        host_sat_in={k: round(v / 1e3, 1) for k, v in sat_in.most_common(top)},
        after_blocking_call={k: round(v / 1e3, 1) for k, v in after.most_common(top)},
    )


def main(trace: Path, out: Path | None, blocked_ms: float = 3.0, gap_ms: float = 5.0, idle_us: float = 20.0) -> dict:
    events = load_events(trace)
    start = min(e["ts"] for e in events)
    python_by_thread = collections.defaultdict(list)  # each thread's Python calls, gathered once
    for e in events:
        if e.get("cat") == "python_function":
            python_by_thread[e["tid"]].append(e)

    def ms(value: float) -> float:
        return round(value / 1e3, 1)

    calls = sorted((e for e in events if e.get("cat") in CUDA_CALLS), key=lambda e: e["ts"])
    blocked = [e for e in calls if e["dur"] >= blocked_ms * 1e3]
    threads = {}
    for tid in sorted({e["tid"] for e in calls}, key=str):
        own = [e for e in calls if e["tid"] == tid]
        time_by_call = collections.Counter()
        for e in own:
            time_by_call[e["name"]] += e["dur"]
        threads[str(tid)] = dict(
            calls=len(own),
            busiest=[name for name, _ in time_by_call.most_common(4)],
            blocked=[
                dict(at_ms=ms(e["ts"] - start), call=e["name"], ms=ms(e["dur"])) for e in blocked if e["tid"] == tid
            ],
        )
    full = [e for e in events if e["name"] == "Command Buffer Full"]
    sat_in: dict[str, float] = {}
    for stall in full:
        outer = next((e for e in calls if inside(stall, e)), None)
        key = f"{outer['tid']} {outer['name']}" if outer else "outside any call"
        sat_in[key] = sat_in.get(key, 0.0) + stall["dur"]

    def gap(a: float, b: float, tid, own_python: list[dict]) -> dict:
        """A stretch of thread ``tid`` without CUDA calls, and the other threads meanwhile."""
        return dict(
            at_ms=ms(a - start),
            ms=ms(b - a),
            others_blocked=[
                f"{e['tid']} {e['name']} {ms(e['dur'])} ms"
                for e in blocked
                if e["tid"] != tid and e["ts"] < b and e["ts"] + e["dur"] > a
            ],
            others_calls=dict(collections.Counter(str(e["tid"]) for e in calls if e["tid"] != tid and a < e["ts"] < b)),
            sat_in=innermost_python_call(own_python, a, b),
            python_inside=python_inside(own_python, a, b),
        )

    def stretches(tid, begin: dict, end: dict) -> dict:
        """Thread ``tid``'s CUDA calls from ``begin`` to ``end`` and its stretches without one."""
        own = [e for e in calls if e["tid"] == tid and begin["ts"] <= e["ts"] <= end["ts"]]
        own_python = python_by_thread.get(tid, [])
        gaps = [
            (a["ts"] + a["dur"], b["ts"])
            for a, b in zip(own, own[1:], strict=False)
            if b["ts"] - a["ts"] - a["dur"] > gap_ms * 1e3
        ]
        return dict(
            calls=len(own),
            in_cuda_calls_ms=ms(sum(e["dur"] for e in own)),
            gaps=[gap(a, b, tid, own_python) for a, b in gaps],
        )

    captures = []
    for begin in (e for e in calls if e["name"] == "cudaStreamBeginCapture"):
        end = next((e for e in calls if e["name"] == "cudaStreamEndCapture" and e["ts"] > begin["ts"]), None)
        if end is None:
            continue
        tid = begin["tid"]
        others = {e["tid"] for e in calls if e["tid"] != tid and begin["ts"] <= e["ts"] <= end["ts"]}
        captures.append(
            dict(
                thread=str(tid),
                from_ms=ms(begin["ts"] - start),
                ms=ms(end["ts"] - begin["ts"]),
                **stretches(tid, begin, end),
                beside={str(other): stretches(other, begin, end) for other in sorted(others, key=str)},
            )
        )
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    result = dict(
        trace=trace.name,
        blocked_call_ms=blocked_ms,
        threads=threads,
        command_buffer_full=dict(
            count=len(full), ms=ms(sum(e["dur"] for e in full)), sat_in={k: ms(v) for k, v in sat_in.items()}
        ),
        captures=captures,
        gpu_busy_ms=ms(sum(e["dur"] for e in kernels)),
        gpu_span_ms=ms(kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) if kernels else 0,
        card_idle=card_idle(kernels, calls, python_by_thread, idle_us),
    )
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--blocked-ms", type=float, default=3.0, help="a CUDA call at least this long counts as blocked"
    )
    parser.add_argument("--idle-us", type=float, default=20.0, help="a gap between kernels at least this long counts")
    a = parser.parse_args()
    print(json.dumps(main(a.trace, a.out, a.blocked_ms, idle_us=a.idle_us), indent=1))
