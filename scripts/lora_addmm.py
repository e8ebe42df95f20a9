"""LoRA's product added to the base layer's output by one matmul (``train.fuse_lora_add``).

PEFT's LoRA forward on a 4-bit base is ``result = base(x).clone()`` then ``result = result +
lora_B(lora_A(dropout(x))) * scaling``: besides the base product, four passes over a tokens x
out_features tensor (the defensive clone, lora_B's output, the scaling, the sum) and one more in
the backward (the gradient times the scaling). Here one cuBLAS call, ``addmm(result, a, B^T,
alpha=scaling)``, writes ``result + scaling * (a @ B^T)``; the backward hands the gradient to the
base unchanged and scales only the two small products (tokens x rank, out_features x rank).

The numbers: the sum is rounded once, where PEFT rounds lora_B's product, its scaling and the sum
each to the compute dtype; with a power-of-two scaling (the tutorial's alpha 16 over r 64) the
scaling itself is exact either way. Not bit for bit in bf16: tests/test_lora_addmm.py measures
losses and gradients against PEFT's path, and bench rows compare loss curves on the card.

Only plain LoRA is fused (no DoRA or other variant, no lora_B bias, one forward argument);
anything else, a merged or disabled adapter, or a mixed-adapter batch runs PEFT's own forward.
"""

import functools

import torch
from torch import nn

from lora_dropout import DropoutLinear


class LoraAddmmFunction(torch.autograd.Function):
    """``result + scaling * a @ weight.T`` in one addmm, in ``result``'s dtype; keeps ``a``
    (tokens x rank) and the weight for the backward, as lora_B's own linear does."""

    @staticmethod
    def forward(ctx, result, a, weight, scaling: float):
        dtype = result.dtype
        rows = result.reshape(-1, result.shape[-1])
        with torch.autocast(result.device.type, enabled=False):  # the dtype is chosen here, once
            out = torch.addmm(rows, a.reshape(-1, a.shape[-1]).to(dtype), weight.to(dtype).t(), alpha=scaling)
        ctx.save_for_backward(a, weight)
        ctx.scaling = scaling
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        a, weight = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_a = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_a = (rows @ weight.to(rows.dtype)).mul_(ctx.scaling).view(a.shape).to(a.dtype)
        if ctx.needs_input_grad[2]:
            a_rows = a.reshape(-1, a.shape[-1]).to(rows.dtype)
            grad_weight = (rows.t() @ a_rows).mul_(ctx.scaling).to(weight.dtype)
        return grad_out, grad_a, grad_weight, None


def _fusable(module) -> bool:
    """Plain LoRA on every adapter of this layer: bias-free A and B linears, no variant, no bias."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict) or not len(lora_a):
        return False
    for name in lora_a:
        a, b = lora_a[name], lora_b[name] if name in lora_b else None
        if type(a) not in (nn.Linear, DropoutLinear) or type(b) is not nn.Linear or a.bias is not None:
            return False
        if b.bias is not None or name in getattr(module, "lora_variant", {}):
            return False
    return True


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA forward with each adapter's product added by LoraAddmmFunction."""
    if args or kwargs or self.disable_adapters or self.merged:
        return super(type(self), self).forward(x, *args, **kwargs)  # PEFT's, the class fused over
    result = self.base_layer(x)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a = self.lora_A[name]
        adapter_in = x if torch.is_autocast_enabled() else self._cast_input_dtype(x, lora_a.weight.dtype)
        a = lora_a(self.lora_dropout[name](adapter_in))
        result = LoraAddmmFunction.apply(result, a, self.lora_B[name].weight, self.scaling[name])
    return result


@functools.cache
def _fused_class(cls: type) -> type:
    return type(f"Addmm{cls.__name__}", (cls,), {"forward": fused_forward, "__module__": __name__})


def fuse_lora_add(model) -> int:
    """Give every plain LoRA layer the fused forward; returns how many (already fused: 0)."""
    fused = 0
    for module in model.modules():
        if type(module).forward is fused_forward or not _fusable(module):
            continue
        module.__class__ = _fused_class(type(module))
        fused += 1
    return fused
