"""NF4 dequantisation at the Llama-2-7B shape: bitsandbytes' kernel against scripts/nf4_dequantize.py's
Triton kernel (``train.dequantize``), per weight shape, over a few launch settings.

Each weight (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008) is quantised by
bitsandbytes and dequantised to bf16 ``--repeats`` times back to back per kernel, timed with CUDA
events; rows interleave the kernels. Reports microseconds per weight, the bandwidth of the bytes
moved (packed codes + absmax read, bf16 written) and a 7B layer's seven weights in sum.

    python bench/dequantize.py --out bench/results/dequantize_h200.json

``--graph``: the default Triton launch inside one CUDA graph instead (``GRAPH_CALLS`` calls
back to back, no launch gaps, as in a recorded step), per weight and for q, k and v as one
12,288 x 4,096 weight: what dequantising them in one launch would save.

    python bench/dequantize.py --graph --out bench/results/dequantize_graph_h200.json
"""

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import nf4_dequantize  # noqa: E402

LAYER = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2), "down": ((4096, 11008), 1)}
LAUNCHES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]  # (bytes per program, warps)
GRAPH_CALLS = 20  # per replay (--graph)


def timed(fn, repeats: int) -> float:
    """Median microseconds of one call over ``repeats`` calls, each between two CUDA events."""
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1000 for start, end in events)


def graphed(fn, calls: int, repeats: int) -> float:
    """Median microseconds of one call when ``calls`` of them replay back to back in one CUDA graph."""
    fn()  # compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, repeats) / calls


def kernels(bitsandbytes_impl, packed, absmax, target) -> dict:
    """Name -> a call writing ``target``: bitsandbytes' kernel, then the Triton one per launch."""
    calls = {"bitsandbytes": lambda: bitsandbytes_impl(packed, absmax, 64, "nf4", torch.bfloat16, target)}
    for block, warps in LAUNCHES:
        calls[f"triton {block}/{warps}"] = functools.partial(
            nf4_dequantize.dequantize_nf4, packed, absmax, target, block, warps
        )
    return calls


def main(repeats: int, out: Path, graph: bool = False) -> dict:
    import bitsandbytes.functional as F
    from bitsandbytes.backends.cuda import ops

    weights = dict(LAYER)
    default = f"triton {nf4_dequantize.BYTES_PER_PROGRAM}/{nf4_dequantize.WARPS}"
    if graph:  # q, k and v dequantised by one launch: not a layer's weight (per_layer 0)
        weights["q+k+v as one"] = ((3 * 4096, 4096), 0)
    rows = []
    for name, (shape, count) in weights.items():
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        target = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        moved = packed.numel() + state.absmax.numel() * 4 + target.numel() * 2
        calls = kernels(ops._dequantize_4bit_impl, packed, state.absmax, target)
        if graph:
            calls = {f"{default}, in a graph": calls[default]}
        for kernel, fn in calls.items():
            microseconds = graphed(fn, GRAPH_CALLS, repeats) if graph else timed(fn, repeats)
            rows.append(
                dict(
                    weight=name,
                    shape=list(shape),
                    per_layer=count,
                    kernel=kernel,
                    microseconds=round(microseconds, 2),
                    tb_per_second=round(moved / microseconds / 1e6, 2),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    layer = {}
    for row in rows:
        layer[row["kernel"]] = layer.get(row["kernel"], 0.0) + row["microseconds"] * row["per_layer"]
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "bitsandbytes": __import__("bitsandbytes").__version__},
        "command": f"python bench/dequantize.py{' --graph' if graph else ''} --repeats {repeats}",
        "graph_calls": GRAPH_CALLS if graph else None,
        "rows": rows,
        "layer_microseconds": {k: round(v, 1) for k, v in layer.items()},
    }
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("dequantize.json"))
    parser.add_argument("--graph", action="store_true", help="the default launch inside a CUDA graph")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/dequantize.py times CUDA kernels: no CUDA device here")
    print(json.dumps(main(args.repeats, args.out, args.graph)["layer_microseconds"], indent=1))
