"""Where a small-batch QLoRA step spends its time, at the Llama-2-7B shape on one GPU.

Trains the first ``--steps`` rows of the real guanaco-1k lengths (``--lengths``: a JSON
list of token counts, random ids) at batch 1 with the pipeline recipe (scripts/recipe.py)
under variants of its train settings, each in a fresh process, and profiles steps
``--profile-from`` .. +4 with torch.profiler: wall time per step against the time the
GPU spent in kernels (their sum, and the busy span), and the operators that dominate
the host's time. Decides which lever pays before a measured epoch (bench/epochs.py).

    python bench/profile_step.py --lengths .carry/gpu/lengths.json --variants base compile nockpt
"""

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "scripts"))
sys.path.insert(0, str(PROJECT / "bench"))
VARIANTS = {
    "base": {},
    "nodefer": {"defer_metric_sync": False},
    "syncing": {"sync_free_forward": False},  # TRL's forward: the padding mask read, the labelled positions
    "nockpt": {"gradient_checkpointing": False},
    "auto8": {"gradient_checkpointing": "auto", "memory_budget_gib": 8},
    "compile": {"compile": True},
    "compile_nockpt": {"compile": True, "gradient_checkpointing": False},
    "compile_auto8": {"compile": True, "gradient_checkpointing": "auto", "memory_budget_gib": 8},
    "compile_noliger": {"compile": True, "kernels": "none"},
    "fused": {"fuse_lora_add": True},  # LoRA's product added by one addmm (scripts/lora_addmm.py)
    "noliger": {"kernels": "none"},
    "graphs_all": {"cuda_graphs_max_tokens": None},  # long batches recorded too
    "eager": {"cuda_graphs": False},
    "pad128": {"pad_to_multiple_of": 128},
    # a log line every 10th step, as the 7B config: between them the host may run ahead of the GPU
    "pad128_log10": {"pad_to_multiple_of": 128, "logging_steps": 10},
    # the recorder thread's captures beside the loop's replays (scripts/graph_recorder.py)
    "pad128_ahead_log10": {"pad_to_multiple_of": 128, "logging_steps": 10, "cuda_graphs_capture": "ahead"},
}


KERNEL_KINDS = (  # device time by kernel family, first match wins (lower-case substrings of kernel names)
    ("attention", ("flash", "fmha", "attention")),
    ("4-bit dequantise", ("dequant", "kdequantize")),
    ("matmul", ("gemm", "xmma", "cutlass", "sm90", "matmul", "_mm_")),
    ("liger / triton", ("liger", "_rms_norm", "swiglu", "rope", "triton", "_forward_kernel", "_backward_kernel")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "foreach")),
)


def top_kernels(kernels, count: int) -> list[dict]:
    """The kernels with the most device time: name (its first 120 characters), launches, seconds."""
    totals: dict[str, list] = {}
    for event in kernels:
        total = totals.setdefault(event.name[:120], [0, 0.0])
        total[0] += 1
        total[1] += event.device_time / 1e6
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:count]
    return [dict(name=name, launches=n, seconds=round(t, 5)) for name, (n, t) in ranked]


def kernel_kinds(kernels) -> dict:
    """Seconds of device time per kernel family (KERNEL_KINDS; the rest under "other")."""
    seconds: dict[str, float] = {}
    for event in kernels:
        name = event.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")
        seconds[kind] = seconds.get(kind, 0.0) + event.device_time / 1e6
    return {k: round(v, 4) for k, v in sorted(seconds.items(), key=lambda item: -item[1])}


def profiled_recordings(count: int) -> dict:
    """cProfile over the first ``count`` CUDA graph recordings (GraphedSteps._record): where a
    recording's host time goes. Fills and returns a dict (``functions``: by own and by cumulative time)."""
    import cProfile
    import pstats

    import cuda_graphs

    found: dict = {"recordings": 0}
    profiler = cProfile.Profile()
    record = cuda_graphs.GraphedSteps._record

    def profiled(self, *args, **kwargs):
        if found["recordings"] >= count:
            return record(self, *args, **kwargs)
        found["recordings"] += 1
        profiler.enable()
        try:
            return record(self, *args, **kwargs)
        finally:
            profiler.disable()
            stats = pstats.Stats(profiler)
            rows = [
                dict(
                    function=f"{Path(file).parent.name}/{Path(file).name}:{line}({name})",
                    calls=calls,
                    own_seconds=round(own, 4),
                    cumulative_seconds=round(cumulative, 4),
                )
                for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items()
            ]
            found["by_own_time"] = sorted(rows, key=lambda r: -r["own_seconds"])[:40]
            found["by_cumulative_time"] = sorted(rows, key=lambda r: -r["cumulative_seconds"])[:40]

    cuda_graphs.GraphedSteps._record = profiled
    return found


def stack_options(python_stacks: bool) -> dict:
    """The profiler's Python stacks on every thread (the recorder's and autograd's too), for
    bench/trace_stalls.py to name the call each stretch without CUDA calls sat in."""
    if not python_stacks:
        return {}
    from torch._C._profiler import _ExperimentalConfig

    try:
        return dict(with_stack=True, experimental_config=_ExperimentalConfig(profile_all_threads=True))
    except TypeError:  # a torch without the option: the stacks of the threads it follows
        return dict(with_stack=True)


def run_variant(
    name: str,
    lengths: list[int],
    steps: int,
    profile_from: int,
    model_dir: Path,
    batch: int = 1,
    trace: str = "",
    recordings: int = 0,
    python_stacks: bool = False,
    sync_sites: bool = False,
) -> dict:
    import datasets
    from sync_sites import SyncSites
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer, TrainerCallback, set_seed

    import checkpointing
    import recipe
    from gpu_recipes import bench_cell
    from train_metrics import step_timer

    logger = logging.getLogger("profile")
    train = yaml.safe_load((PROJECT / "config" / "llama2-7b.yaml").read_text())["train"]
    train.update(max_steps=steps, save_steps=10**6, logging_steps=1, group_by_length=False)
    train.update(VARIANTS[name])
    train["batch_size"] = batch
    max_length = max(1024, *lengths[: steps * batch])
    cell = bench_cell()
    set_seed(1)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in lengths[: steps * batch]]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    model, details = recipe.prepare_model(model_dir, cell, train, model_dir / "adapter_qv", max_length, logger)
    plan = (
        checkpointing.CheckpointPlan(checkpointing.decoder_layers(model), model_dir, cell, train, details["kernels"])
        if details["checkpoint_per_batch"]
        else None
    )
    traces = {}
    recording_profile = profiled_recordings(recordings) if recordings else None

    def recorder_between_shapes():
        """No capture under way on the recorder thread (``train.cuda_graphs_capture: ahead``): a device
        sync while it captures fails ("operation not permitted when stream is capturing"), and the
        profiler's start and stop sync. The main thread takes the graphs' lock as its own steps do."""
        graphs = getattr(trainer, "graphs", None)
        if graphs is None or graphs.recorder is None:
            return contextlib.nullcontext()
        return graphs.exclusive(timed=False)  # the training's own waits stay apart

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == profile_from and sync_sites:  # the syncs' Python lines, not a profile
                traces["syncs"] = SyncSites()
                traces["syncs"].start()
            elif state.global_step == profile_from:
                traces["prof"] = profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], **stack_options(python_stacks)
                )
                with recorder_between_shapes():
                    traces["prof"].__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == profile_from + 4 and "syncs" in traces:
                traces["syncs"].stop()
            if state.global_step == profile_from + 4 and "prof" in traces:
                with recorder_between_shapes():
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    traces["prof"].__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as scratch:
        args, _ = recipe.sft_config(
            train, cell, Path(scratch), details["compute_dtype"], train["optimizer"], max_length, logger
        )
        timer = step_timer()
        trainer = recipe.make_trainer(
            model,
            AutoTokenizer.from_pretrained(model_dir),
            dataset,
            args,
            train,
            [timer, Profile()],
            plan,
            checkpoint_every=details["checkpoint_every"],
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    steps_done = sorted(timer.steps.items())
    after = [s for step, s in steps_done if step > 3 and not profile_from <= step <= profile_from + 5]
    result = {
        "variant": name,
        "settings": VARIANTS[name],
        "batch": batch,
        "steps": len(steps_done),
        "train_seconds": round(seconds, 2),
        "first_step_seconds": round(steps_done[0][1]["step_seconds"], 2),
        "median_step_seconds": round(statistics.median(s["step_seconds"] for s in after), 4),
        "step_seconds": [round(s["step_seconds"], 4) for _, s in steps_done],
        "steady_tokens_per_second": round(
            sum(s["step_tokens"] for s in after) / sum(s["step_seconds"] for s in after), 1
        ),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        if torch.cuda.is_available()
        else None,
        "checkpoint_steps_by_layers": plan.summary() if plan else None,
        "checkpoint_plan": plan.plan if plan else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h][:30],
    }
    if recording_profile is not None:
        result["recording_profile"] = recording_profile
    result["cuda_graphs"] = trainer.graphs.summary() if trainer.graphs else None
    if "syncs" in traces:
        result["sync_sites"] = traces["syncs"].summary(steps=4)
    if "prof" in traces:
        events = traces["prof"].events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.device_time for e in kernels)
        wall = sum(s["step_seconds"] for step, s in steps_done if profile_from < step <= profile_from + 4)
        result["profile"] = {
            "steps": 4,
            "wall_seconds": round(wall, 4),
            "gpu_kernel_seconds": round(kernel_us / 1e6, 4),
            "kernel_launches": len(kernels),
            "kernel_seconds_by_kind": kernel_kinds(kernels),
            "gpu_busy_share": round(kernel_us / 1e6 / wall, 3) if wall else None,
            "top_kernels": top_kernels(kernels, 40),
        }
        table = traces["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        result["profile"]["top_cpu"] = table
        result["profile"]["top_cuda"] = (
            traces["prof"].key_averages().table(sort_by="self_device_time_total", row_limit=12)
        )
        if trace:  # the timeline (chrome://tracing, Perfetto), gzipped
            traces["prof"].export_chrome_trace(trace)
            subprocess.run(["gzip", "-f", trace], check=True)
    return result


def main(
    variants: list[str],
    lengths: list[int],
    steps: int,
    profile_from: int,
    model_dir: Path,
    out: Path,
    batch: int = 1,
    trace_dir: Path | None = None,
    recordings: int = 0,
    python_stacks: bool = False,
    sync_sites: bool = False,
) -> None:
    from gpu_recipes import build_model

    t0 = time.time()
    build_model(model_dir, PROJECT / ".carry" / "gpu" / "shape")
    print(f"model ready in {time.time() - t0:.0f} s", flush=True)
    results = []
    for name in variants:
        row = json.dumps(
            dict(
                name=name,
                lengths=lengths[: steps * batch],
                steps=steps,
                profile_from=profile_from,
                model_dir=str(model_dir),
                batch=batch,
                trace=str(trace_dir / f"trace_{out.stem}_{name}.json") if trace_dir else "",
                recordings=recordings,
                python_stacks=python_stacks,
                sync_sites=sync_sites,
            )
        )
        t0 = time.time()
        done = subprocess.run([sys.executable, __file__, "--child", row], capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
        if done.returncode or not lines:
            results.append({"variant": name, "status": "failed: " + done.stderr[-1500:]})
        else:
            results.append(json.loads(lines[-1][4:]))
        if sync_sites:  # syncs in C++ code no Python line called (autograd's backward): c10 prints them
            printed = [x.strip()[:300] for x in done.stderr.splitlines() if "synchronizing CUDA operation" in x]
            results[-1]["sync_warnings_on_stderr"] = dict(count=len(printed), distinct=sorted(set(printed))[:10])
        results[-1]["process_seconds"] = round(time.time() - t0, 1)
        brief = {k: v for k, v in results[-1].items() if k not in ("profile", "losses")}
        print(json.dumps(brief), flush=True)
        if "profile" in results[-1]:
            p = results[-1]["profile"]
            keys = ("wall_seconds", "gpu_kernel_seconds", "kernel_launches", "gpu_busy_share", "kernel_seconds_by_kind")
            print({k: p[k] for k in keys})
            print(p["top_cpu"][:4000], flush=True)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        out.write_text(json.dumps({"device": device, "results": results}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["base"])
    parser.add_argument("--lengths", type=Path, default=PROJECT / ".carry" / "gpu" / "lengths.json")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (in the lengths file's order)")
    parser.add_argument("--block", type=int, help="every row this many tokens (e.g. 2048), not --lengths")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile-from", type=int, default=20)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "llama2-7b-shape")
    parser.add_argument("--out", type=Path, default=Path("profile_step.json"))
    parser.add_argument("--trace-dir", type=Path, help="write each profiled window's timeline here (gzipped)")
    parser.add_argument("--profile-recordings", type=int, default=0, help="cProfile the first N graph recordings")
    parser.add_argument("--python-stacks", action="store_true", help="Python stacks of every thread in the timeline")
    parser.add_argument(
        "--sync-sites", action="store_true", help="the profile window's synchronizing calls by Python line (no profile)"
    )
    a = parser.parse_args()
    if a.child:
        c = json.loads(a.child)
        keys = (
            "name",
            "lengths",
            "steps",
            "profile_from",
            "batch",
            "trace",
            "recordings",
            "python_stacks",
            "sync_sites",
        )
        result = run_variant(model_dir=Path(c["model_dir"]), **{k: c[k] for k in keys})
        print("ROW " + json.dumps(result), flush=True)
    else:
        lengths = [a.block] * (a.steps * a.batch) if a.block else json.loads(a.lengths.read_text())
        main(
            a.variants,
            lengths,
            a.steps,
            a.profile_from,
            a.model_dir,
            a.out,
            a.batch,
            a.trace_dir,
            a.profile_recordings,
            a.python_stacks,
            a.sync_sites,
        )
