"""Which SDPA kernels serve the 7B shape's causal attention on this GPU, eager and inside a CUDA
graph recording, and how fast (forward + backward, bf16, no mask: the recorded step's call).

For each backend alone: the kernel runs or PyTorch's reason why not (its warnings); the median
of 10 timed calls eager and as replays of one recording; the replay's output and input
gradients against the eager call's. Decides the recording's backend order (scripts/cuda_graphs.py).

    python bench/attention_check.py --out bench/results/attention_check_h200.json
"""

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


def timed(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def check(backend: str, batch: int, seq: int, heads: int = 32, head_dim: int = 128) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(
            batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator
        ).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    row = dict(backend=backend, batch=batch, seq=seq)

    def step():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
        return out.detach()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            eager = step()
        except RuntimeError as error:
            row["eager"] = f"not run: {str(error).splitlines()[0][:200]}"
            row["reasons"] = sorted({str(w.message)[:300] for w in caught})
            return row
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    row["eager_ms"] = timed(step)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on the side stream, as torch.cuda.graph records
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        q.grad = k.grad = v.grad = None
        with torch.cuda.graph(graph):
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(grad)
    except RuntimeError as error:
        row["recorded"] = f"not run: {str(error).splitlines()[0][:200]}"
        return row
    graph.replay()
    torch.cuda.synchronize()
    row["recorded_ms"] = timed(graph.replay)
    row["recorded_max_abs_diff"] = max(
        float((a - b).abs().max())
        for a, b in zip([out] + [t.grad for t in (q, k, v)], [eager] + eager_grads, strict=True)
    )
    return row


def main(out: Path, shapes: list[tuple[int, int]]) -> None:
    rows = [check(backend, batch, seq) for batch, seq in shapes for backend in BACKENDS]
    for row in rows:
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("attention_check.json"))
    a = parser.parse_args()
    main(a.out, [(4, 1024), (4, 2048), (1, 512)])
