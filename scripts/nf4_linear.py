"""bitsandbytes' 4-bit linear for long batches without its Python layers (``train.nf4_linear: triton``).

Above 1,536 tokens a step bitsandbytes 0.50 dequantises the NF4 weight to bf16 and calls
F.linear (its fused kernel serves shorter batches only), and its backward dequantises again and
calls torch.matmul. Each call first passes Linear4bit.forward, matmul_4bit, MatMul4Bit and the
``bitsandbytes::gemm_4bit`` custom op (``dequantize_4bit`` in the backward): ~0.3 ms of host time
a call in a profiled 2,048 x 4 step on an H200 (bench/results/profile_step_h200_block_fused.json),
~600 calls a step, while the card waited 15-19 % of the step for the host. Here one autograd
function runs the same two kernels (scripts/nf4_dequantize.py's Triton kernel, whose values are
bitsandbytes' bit for bit, and the same F.linear / torch.matmul): the same numbers, less host work.
Eager long batches gain; recorded steps replay kernels and do not run the host's Python.

Anything else (CPU, fp4, double quantisation, a bias, another block size or dtype, 1,536 tokens
or fewer) runs bitsandbytes' own forward.
"""

import functools

import torch

import nf4_dequantize

LONG_TOKENS = 1536  # bitsandbytes 0.50's _gemm_4bit_custom_max_m on CUDA: above it, dequantise + F.linear


class NF4LinearFunction(torch.autograd.Function):
    """``F.linear(x, dequantised W)``; the backward ``grad @ dequantised W`` (no grad for W, as
    bitsandbytes'). The packed weight and absmax stay on ctx, not saved tensors: they are the
    model's own, and checkpointing or offload hooks must not see them."""

    @staticmethod
    def forward(ctx, x, packed, absmax, shape):
        ctx.packed, ctx.absmax, ctx.shape, ctx.dtype = packed, absmax, shape, x.dtype
        return torch.nn.functional.linear(x, _dequantized(packed, absmax, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        # bitsandbytes dequantises in the weight's dtype (here x's), then casts to the gradient's
        weight = _dequantized(ctx.packed, ctx.absmax, ctx.shape, ctx.dtype).to(grad_out.dtype)
        return torch.matmul(grad_out, weight), None, None, None


def _dequantized(packed, absmax, shape, dtype) -> torch.Tensor:
    return nf4_dequantize.dequantize_nf4(packed, absmax, torch.empty(shape, dtype=dtype, device=packed.device))


def served(module, x: torch.Tensor) -> bool:
    """Whether this call takes the direct path (else bitsandbytes' forward)."""
    state = getattr(module.weight, "quant_state", None)
    return (
        state is not None
        and x.is_cuda
        and x.numel() // x.shape[-1] > LONG_TOKENS
        and module.bias is None
        and not state.nested
        and state.quant_type == "nf4"
        and state.blocksize == nf4_dequantize.BLOCKSIZE
        and x.dtype == state.dtype == module.compute_dtype
        and len(state.shape) == 2
        and x.shape[-1] == state.shape[1]
    )


def direct_forward(self, x: torch.Tensor) -> torch.Tensor:
    if served(self, x):
        state = self.weight.quant_state
        return NF4LinearFunction.apply(x, self.weight.data.view(-1), state.absmax, tuple(state.shape))
    return type(self).__mro__[1].forward(self, x)


@functools.cache
def _direct_class(cls: type) -> type:
    return type(f"Direct{cls.__name__}", (cls,), {"forward": direct_forward, "__module__": __name__})


def install(model, logger) -> int:
    """Give every bitsandbytes Linear4bit of ``model`` the direct long-batch path; returns how many."""
    if not torch.cuda.is_available():
        return 0
    try:
        import triton  # noqa: F401
        from bitsandbytes.nn import Linear4bit
    except ImportError as error:
        logger.info("nf4_linear: bitsandbytes' forward (%s)", error)
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and type(module).forward is not direct_forward:
            module.__class__ = _direct_class(type(module))
            count += 1
    logger.info("nf4_linear: %d 4-bit linears take batches over %d tokens directly", count, LONG_TOKENS)
    return count
