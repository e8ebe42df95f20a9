"""Which SDPA kernels serve the 7B shape's causal attention on this GPU, eager and inside a CUDA
graph recording, and how fast (forward + backward, bf16, no mask: the recorded step's call).

For each backend alone: the kernel runs or PyTorch's reason why not (its warnings); the host
time of its first call at the shape (cuDNN builds a plan per new shape, forward and backward) and
of a first recording at a second new length; the median of 10 timed calls eager and as replays of
one recording; the replay's output and input gradients against the eager call's. Decides the
recording's backend order (scripts/cuda_graphs.py, train.cuda_graphs_attention).

    python bench/attention_check.py --out bench/results/attention_check_h200.json
"""

import argparse
import json
import statistics
import time
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


def tensors(batch: int, seq: int, heads: int, head_dim: int):
    """q, k, v (requiring grad) and the output's gradient, random bf16."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_() for _ in range(3)
    )
    return q, k, v, torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)


def forward_backward(backend: str, q, k, v, grad) -> torch.Tensor:
    """The recorded step's attention call with ``backend`` alone, and its backward; the output."""
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad)
    return out


def first_recording_ms(backend: str, batch: int, seq: int, heads: int, head_dim: int) -> float:
    """Host milliseconds to record forward + backward at a length this process has not run."""
    q, k, v, grad = tensors(batch, seq, heads, head_dim)
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        forward_backward(backend, q, k, v, grad)
    return round((time.perf_counter() - started) * 1000, 2)


def check(backend: str, batch: int, seq: int, heads: int = 32, head_dim: int = 128) -> dict:
    q, k, v, grad = tensors(batch, seq, heads, head_dim)
    row = dict(backend=backend, batch=batch, seq=seq)

    def step():
        q.grad = k.grad = v.grad = None
        return forward_backward(backend, q, k, v, grad).detach()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            eager = step()
        except RuntimeError as error:
            row["eager"] = f"not run: {str(error).splitlines()[0][:200]}"
            row["reasons"] = sorted({str(w.message)[:300] for w in caught})
            return row
        torch.cuda.synchronize()
        row["first_call_ms"] = round((time.perf_counter() - started) * 1000, 2)
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
            out = forward_backward(backend, q, k, v, grad)
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
    # a length no call has run yet (the shapes are multiples of 64): what recording a new shape costs
    row["first_recording_ms_at_seq_plus_8"] = first_recording_ms(backend, batch, seq + 8, heads, head_dim)
    return row


def main(out: Path, shapes: list[tuple[int, int]]) -> None:
    for backend in BACKENDS:  # the process's own first calls stay out of the rows
        check(backend, 1, 200)
    rows = [check(backend, batch, seq) for batch, seq in shapes for backend in BACKENDS]
    for row in rows:
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("attention_check.json"))
    parser.add_argument(
        "--shapes", nargs="+", default=["4x1024", "4x2048", "1x512"], help="BATCHxLENGTH, e.g. 4x512 (multiples of 64)"
    )
    a = parser.parse_args()
    main(a.out, [tuple(int(n) for n in shape.split("x")) for shape in a.shapes])
