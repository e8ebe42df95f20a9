"""NF4 dequantisation in one Triton kernel (``train.dequantize: triton``), for bitsandbytes' 4-bit
layers on a CUDA GPU.

A QLoRA step dequantises every 4-bit weight to bf16 before its matmul: twice per layer (forward,
backward) and a third time in a recomputed layer, ~450-600 times a step at the 7B shape whatever
the batch's length. bitsandbytes' kernel took 35 us a weight on average on an H200 (20 of 147 ms
of kernel time in a recorded 4 x 512 step, bench/results/profile_step_h200_b4_512_layers.json),
about half of what the card's memory bandwidth allows for the bytes it moves. This kernel
writes the same values: each weight is bf16(float32(NF4 table[code]) * float32(absmax)), the
product rounded once to nearest even, as bitsandbytes' kernel rounds it; tests/test_nf4_dequantize.py
checks bit equality on the GPU. Measured on an H200: a layer's seven weights in 237 against
278 us (bench/results/dequantize_h200.json), a batch-4 epoch 1.03x faster
(bench/results/epochs_h200_dequantize).

Installed by swapping bitsandbytes' CUDA dequantise implementation, which both its forward
(dequantise, then F.linear) and its backward call; anything else (fp4, another block size,
fp32 output, a CPU tensor) goes to bitsandbytes' own kernel.
"""

import functools

import torch

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block (one absmax per 64 weights)
BYTES_PER_PROGRAM = 2048  # packed bytes (4,096 weights) per Triton program
# bench/results/dequantize_h200.json: the fastest launch over a layer's weights; epoch 44.75 s against 44.93 at 4
WARPS = 8


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize(packed, absmax, table, out, n_bytes, BLOCK: tl.constexpr, BLOCKSIZE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n_bytes
        byte = tl.load(packed + offsets, mask=inside, other=0).to(tl.int32)
        # both weights of a byte share a block: BLOCKSIZE is even
        scale = tl.load(absmax + (2 * offsets) // BLOCKSIZE, mask=inside, other=0.0)
        high = tl.load(table + (byte >> 4)) * scale  # the first weight sits in the high nibble
        low = tl.load(table + (byte & 15)) * scale
        values = tl.interleave(high, low).to(out.dtype.element_ty)
        positions = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + positions, values, mask=positions < 2 * n_bytes)

    return nf4_dequantize


@functools.cache
def _table(device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device=device).to(torch.float32).contiguous()


def served(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, dtype, out) -> bool:
    """Whether this kernel writes the dequantised weight (else bitsandbytes' own does)."""
    return (
        quant_type == "nf4"
        and blocksize == BLOCKSIZE
        and dtype in (torch.bfloat16, torch.float16)
        and packed.is_cuda
        and packed.dtype == torch.uint8
        and absmax.dtype == torch.float32
        and absmax.is_contiguous()
        and out.is_contiguous()
        and out.numel() % 2 == 0
    )


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, block: int = BYTES_PER_PROGRAM, warps: int = WARPS
) -> torch.Tensor:
    """``out`` (bf16 or fp16, ``2 * packed.numel()`` weights) from NF4 codes and per-64 absmax.
    ``block`` and ``warps``: the launch (bench/dequantize.py measured the defaults)."""
    packed = packed.contiguous()
    n_bytes = out.numel() // 2
    grid = (-(-n_bytes // block),)
    with torch.cuda.device(packed.device):
        _kernel()[grid](packed, absmax, _table(packed.device), out, n_bytes, block, BLOCKSIZE, num_warps=warps)
    return out


def install(logger) -> str:
    """Route bitsandbytes' CUDA NF4 dequantisation through this kernel; returns what was set up."""
    if not torch.cuda.is_available():
        return "bitsandbytes (no CUDA device)"
    try:
        import triton  # noqa: F401
        from bitsandbytes.backends.cuda import ops
    except ImportError as error:
        return f"bitsandbytes (no Triton or no bitsandbytes CUDA backend: {error})"
    original = getattr(ops._dequantize_4bit_impl, "bitsandbytes_impl", ops._dequantize_4bit_impl)

    def dequantize_4bit_impl(A, absmax, blocksize, quant_type, dtype, out):
        if served(A, absmax, blocksize, quant_type, dtype, out):
            dequantize_nf4(A, absmax, out)
        else:
            original(A, absmax, blocksize, quant_type, dtype, out=out)

    dequantize_4bit_impl.bitsandbytes_impl = original
    ops._dequantize_4bit_impl = dequantize_4bit_impl
    logger.info("NF4 dequantisation: Triton kernel (scripts/nf4_dequantize.py)")
    return "triton"
