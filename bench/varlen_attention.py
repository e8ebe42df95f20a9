"""What padding costs the batch-4 epoch, and what packing its rows would cost attention (one GPU).

The shipped batch-4 recipe pads each batch of 4 rows to its longest row, rounded up to a multiple
of 64 (128 for the first 100 batches): 9.2 % of the epoch's tokens are padding, and a recorded
step's time is proportional to its padded tokens (bench/results/epochs_h200_loop_ahead: 0.275 ms
per token of row length at batch 4, from 4 x 128 to 4 x 1,024). Packing a batch's rows into one row
(padding-free, rounded up once per batch) removes most of it, but needs attention over several
sequences in one row: torch's varlen_attn (FlashAttention-2) instead of cuDNN's causal SDPA.

For the epoch's 250 batches (bench/epoch_rows.py's rows_b4.json, in training order) this times
one decoder layer's attention, forward and backward, at the 7B shape (32 heads of 128) under:
``padded_cudnn`` (the shipped shapes, cuDNN SDPA, causal), ``padded_flash`` (the same shapes,
flash SDPA) and ``packed_<m>`` (varlen_attn over the 4 rows and a padding segment, the row
rounded up to a multiple of m; ``max_q`` the whole row's length, as a recorded step would hold
it, and, ``_exact``, the longest row's). Each shape's median of ``--repeats`` timed replays of
its forward and backward recorded in a CUDA graph (CUDA events), summed over the epoch's
batches; and each scheme's tokens. A scheme that fails says why in its entry.

    python bench/varlen_attention.py --rows .carry/epochs/rows_b4.json --out bench/results/varlen_attention_h200.json
"""

import argparse
import inspect
import json
import statistics
from pathlib import Path

import torch

HEADS, HEAD_DIM, LAYERS, MAX_LENGTH = 32, 128, 32, 1024
COARSE_MULTIPLE, COARSE_STEPS, MULTIPLE = 128, 100, 64  # config/batch4.yaml


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_seq(lengths: list[int], step: int) -> int:
    multiple = COARSE_MULTIPLE if step < COARSE_STEPS else MULTIPLE
    return min(MAX_LENGTH, round_up(max(lengths), multiple))


def packed_tokens(lengths: list[int], multiple: int) -> int:
    return round_up(sum(lengths), multiple)


def cu_seqlens(lengths: list[int], total: int, device) -> torch.Tensor:
    """Cumulative starts of the rows and of the padding segment after them (empty or not)."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    bounds.append(total)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _timed(run, repeats: int) -> float:
    """Median seconds of one replay of ``run`` recorded in a CUDA graph (as a recorded training
    step runs it: no host launch time), after two eager calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    del graph
    return statistics.median(seconds)


def padded_call(batch: int, seq: int, backend, device):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    # transformers' layout: [batch, seq, heads, dim] projections, transposed to [batch, heads, seq, dim]
    q, k, v = (torch.randn(batch, seq, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))
    grad = torch.randn(batch, HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16)

    def run():
        with sdpa_kernel(backend):
            scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    return run


def varlen_causal() -> dict:
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters  # torch 2.11: is_causal; 2.12+: window_size
    return {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}


def packed_call(lengths: list[int], total: int, exact: bool, device):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    grad = torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    bounds = cu_seqlens(lengths, total, device)
    longest = max(max(lengths), total - sum(lengths)) if exact else total
    causal = varlen_causal()

    def run():
        varlen_attn(q, k, v, bounds, bounds, longest, longest, **causal).backward(grad)

    return run


def packed_matches_padded(lengths: list[int], device) -> float:
    """Max abs difference of varlen_attn's output against cuDNN SDPA on each row alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn
    from torch.nn.functional import scaled_dot_product_attention

    total = packed_tokens(lengths, 64)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = varlen_attn(q, k, v, *(cu_seqlens(lengths, total, device),) * 2, total, total, **varlen_causal())
    worst, start = 0.0, 0
    for length in lengths:
        rows = [t[start : start + length].transpose(0, 1)[None] for t in (q, k, v)]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            alone = scaled_dot_product_attention(*rows, is_causal=True)[0].transpose(0, 1)
        worst = max(worst, (alone.float() - out[start : start + length].float()).abs().max().item())
        start += length
    return worst


def main(rows: Path, out: Path, repeats: int, multiples: list[int]) -> dict:
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda")
    lengths = [len(ids) for ids in json.loads(rows.read_text())["input_ids"]]
    batches = [lengths[i : i + 4] for i in range(0, len(lengths), 4)]
    print(f"{len(batches)} batches, {sum(lengths)} tokens, repeats {repeats}, multiples {multiples}", flush=True)
    schemes: dict[str, dict] = {}

    def scheme(name: str, keys: list, call) -> None:  # each key ends in its batch's padded tokens
        cache: dict = {}
        try:
            for key in keys:
                if key not in cache:
                    cache[key] = _timed(call(key), repeats)
        except RuntimeError as error:  # a kernel this torch lacks: the entry says so
            schemes[name] = {"error": str(error).splitlines()[0][:300], "at": str(key)}
            print(name, schemes[name], flush=True)
            return
        seconds = sum(cache[key] for key in keys)
        tokens = sum(key[-1] for key in keys)
        schemes[name] = dict(
            tokens=tokens,
            padding_share=round(1 - sum(lengths) / tokens, 4),
            shapes=len({key[-1] for key in keys}),  # batch shapes to record (batch 4: one per token count)
            timed=len(cache),  # packed: each batch its own sequence bounds
            attention_seconds_per_layer=round(seconds, 4),
            attention_seconds_all_layers=round(seconds * LAYERS, 3),
        )
        print(name, schemes[name], flush=True)

    seqs = [(seq, 4 * seq) for seq in (padded_seq(batch, step) for step, batch in enumerate(batches))]
    scheme("padded_cudnn", seqs, lambda key: padded_call(4, key[0], SDPBackend.CUDNN_ATTENTION, device))
    scheme("padded_flash", seqs, lambda key: padded_call(4, key[0], SDPBackend.FLASH_ATTENTION, device))
    for multiple in multiples:
        for exact in (False, True):
            keys = [(tuple(batch), exact, packed_tokens(batch, multiple)) for batch in batches]
            name = f"packed_{multiple}" + ("_exact" if exact else "")
            scheme(name, keys, lambda key: packed_call(list(key[0]), key[2], key[1], device))
    result = dict(
        command=f"python bench/varlen_attention.py --rows {rows} --repeats {repeats}",
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        rows=str(rows),
        real_tokens=sum(lengths),
        schemes=schemes,
    )
    try:
        result["packed_vs_cudnn_max_abs_diff"] = packed_matches_padded(batches[60], device)
    except RuntimeError as error:
        result["packed_vs_cudnn_max_abs_diff"] = str(error).splitlines()[0][:300]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--multiples", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/varlen_attention.py times CUDA kernels: no CUDA device here")
    print(json.dumps(vars(args), default=str), flush=True)
    main(args.rows, args.out, args.repeats, args.multiples)
