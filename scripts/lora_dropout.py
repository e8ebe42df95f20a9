"""LoRA dropout that keeps the layer's input once and each mask as bits (``train.recompute_lora_dropout``).

PEFT computes ``lora_B(lora_A(dropout(x)))``: for the backward, autograd keeps every adapter's
dropout output (lora_A's input: 2 bytes a feature in bf16) and its mask (1 byte). The q and v
adapters of a layer read the same ``x``; here lora_A takes the dropout in with it, keeps ``x``
(one copy for every adapter that reads it) and its mask packed 8 to a byte, and recomputes the
dropout output in the backward with the op autograd uses for the dropout's own gradient
(``native_dropout_backward``: the same values). At the 7B shape with q/v adapters that is
9.5 instead of 24.8 KB kept per token and layer (0.47 GiB at 1,024 tokens over 32 layers).

The mask is drawn by the op PEFT's ``nn.Dropout`` runs on a GPU (``native_dropout``: the same
random numbers) and the backward re-runs lora_A's own linear, so losses and gradients are
the stock path's bit for bit (tests/test_lora_dropout.py: on the CPU in float32, the
pipeline's CPU dtype, and on a GPU in bf16).

In a checkpointed layer the forward keeps the packed masks for the layer's recomputation
(``checkpoint_context``), which then draws nothing: it needs no RNG state saved and restored
(``preserve_rng_state=False``), which a CUDA graph recording cannot do. Stock checkpointing
restores the RNG to draw the same masks again: the same numbers.
"""

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

BITS = 8
# Entry i of 8 (one byte each, 0 or 1) sits at bit 8i of their int64 word (little-endian);
# times GATHER it also lands on bit 56 + i, and no two partial products share a bit (no carries).
GATHER = 0x0102040810204080


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as uint8 bytes, 8 entries each, entry i in bit i (numel must divide by 8).

    One multiply and shift per 8 entries: a sum over the 8 shifted entries, as this first was,
    took 0.24 ms per 2,048 x 4 x 4,096 mask on an H200, 15 ms of a 0.61 s step
    (bench/results/profile_step_h200_b4_2048.json)."""
    entries = mask if mask.dtype in (torch.bool, torch.uint8) else mask.to(torch.uint8)
    words = entries.contiguous().view(torch.uint8).reshape(-1, BITS).view(torch.int64).squeeze(1)
    return ((words * GATHER) >> 56).to(torch.uint8)  # the wrapped product's top byte


@functools.cache
def _spread(device: torch.device) -> torch.Tensor:
    """Each byte value's bits as an int64 of 8 bytes of 0 or 1 (bit i in byte i), made once per device."""
    values, bits = torch.arange(256, dtype=torch.int64), torch.arange(BITS, dtype=torch.int64)
    return (((values.unsqueeze(1) >> bits) & 1) << (8 * bits)).sum(dim=1).to(device)


def unpack_mask(kept: torch.Tensor, packed: bool, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """The mask as native_dropout returned it, from what was kept (packed or as it was):
    a table lookup per byte, no per-bit shifts."""
    if not packed:
        return kept
    return _spread(kept.device)[kept.long()].view(torch.bool).reshape(like.shape).to(dtype)


_ACTIVE = threading.local()  # .masks: the CheckpointMasks of the layer call running on this thread


class CheckpointMasks:
    """The masks one checkpointed layer call drew in its forward, handed in order to its
    recomputation (torch.utils.checkpoint's ``context_fn``, non-reentrant; the recomputation
    runs whole on one thread, the autograd engine's)."""

    def __init__(self):
        self.masks: list[tuple] = []
        self.next = 0

    def take(self) -> tuple:
        if self.next == len(self.masks):
            raise RuntimeError(
                "a checkpointed layer's recomputation asked for more dropout masks than its forward drew"
            )
        self.next += 1
        return self.masks[self.next - 1]


class _Active:
    """Makes ``masks`` this thread's current layer call, recording (forward) or replaying;
    re-enterable: a second backward through a retained graph recomputes again."""

    def __init__(self, masks: CheckpointMasks, replaying: bool):
        self.masks, self.replaying, self.previous = masks, replaying, []

    def __enter__(self):
        self.previous.append((getattr(_ACTIVE, "masks", None), getattr(_ACTIVE, "replaying", False)))
        _ACTIVE.masks, _ACTIVE.replaying, self.masks.next = self.masks, self.replaying, 0

    def __exit__(self, *exc):
        _ACTIVE.masks, _ACTIVE.replaying = self.previous.pop()
        return False


def checkpoint_context():
    """``context_fn`` for torch.utils.checkpoint: (forward context, recompute context)."""
    masks = CheckpointMasks()
    return _Active(masks, replaying=False), _Active(masks, replaying=True)


def _rates(value) -> list[float]:
    """Every number under a config key naming a dropout (dropout, pdrop), nested configs too."""
    found = []
    for key, item in value.items():
        if isinstance(item, dict):
            found += _rates(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and ("dropout" in key or "pdrop" in key):
            found.append(float(item))
    return found


def recompute_needs_rng(model) -> bool:
    """Whether a checkpointed layer's recomputation must replay random numbers: a dropout
    module left unfolded (p > 0) or a dropout rate in the model's config. When unsure, yes."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    try:
        config = model.config
        return any(rate > 0 for rate in _rates(config if isinstance(config, dict) else config.to_dict()))
    except Exception:  # an unknown config layout: keep the RNG replay (correct, only slower)
        return True


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear`` as the caller's autocast runs it (both operands in its dtype: the same
    numbers), with the weight cast here: autocast caches its own cast of a weight that requires
    grad until the forward's autocast region ends, each lora_A's bf16 copy alive beside every
    layer's activations (32 MiB at the 7B shape's forward peak with q/v adapters, torch's
    allocation history in bench/results/memory_h200_steps). Operands already in autocast's dtype
    are not cast again, so nothing is cached. The backward casts the weight again."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return F.linear(x, weight)
    dtype = torch.get_autocast_dtype(device)
    return F.linear(x.to(dtype), weight.to(dtype))


class DropoutLinearFunction(torch.autograd.Function):
    """``F.linear(dropout(x), weight)`` keeping x and the packed mask, not the dropout output."""

    @staticmethod
    def forward(ctx, x, weight, p: float):
        scale, masks = 1.0 / (1.0 - p), getattr(_ACTIVE, "masks", None)
        if masks is not None and _ACTIVE.replaying:  # a checkpointed layer's recomputation
            kept, packed, mask_dtype = masks.take()
            mask = unpack_mask(kept, packed, mask_dtype, x)
            dropped = torch.ops.aten.native_dropout_backward(x, mask, scale)  # the forward's values
        else:
            dropped, mask = torch.native_dropout(x, p, True)
            packed = mask.numel() % BITS == 0
            kept, mask_dtype = pack_mask(mask) if packed else mask, mask.dtype
            if masks is not None:
                masks.masks.append((kept, packed, mask_dtype))
        out = _linear(dropped, weight)
        ctx.save_for_backward(x, kept, weight)
        ctx.packed, ctx.mask_dtype, ctx.scale = packed, mask_dtype, scale
        ctx.device_type = x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, kept, weight = ctx.saved_tensors
        mask = unpack_mask(kept, ctx.packed, ctx.mask_dtype, x)
        want_x, want_weight = ctx.needs_input_grad[:2]
        with torch.enable_grad(), torch.autocast(ctx.device_type, ctx.autocast_dtype, enabled=ctx.autocast):
            dropped = torch.ops.aten.native_dropout_backward(x.detach(), mask, ctx.scale).requires_grad_(want_x)
            weight = weight.detach().requires_grad_(want_weight)
            out = F.linear(dropped, weight)
            wanted = [t for t, want in ((dropped, want_x), (weight, want_weight)) if want]
            grads = list(torch.autograd.grad(out, wanted, grad_out))
        grad_dropped = grads.pop(0) if want_x else None
        grad_weight = grads.pop(0) if want_weight else None
        grad_x = torch.ops.aten.native_dropout_backward(grad_dropped, mask, ctx.scale) if want_x else None
        return grad_x, grad_weight, None


class DropoutLinear(nn.Linear):
    """A LoRA A matrix with its adapter's dropout taken in (same parameters, same state dict)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # folded only without a bias (recompute_lora_dropout)
            return F.linear(x, self.weight)
        return DropoutLinearFunction.apply(x, self.weight, self.dropout_p)


def recompute_lora_dropout(model) -> int:
    """Fold every plain LoRA adapter's dropout (p > 0) into its lora_A; returns how many.

    DoRA and other PEFT variants, and adapters with a biased lora_A, keep PEFT's path."""
    folded = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            a = lora_a[name] if name in lora_a else None
            plain = name not in getattr(module, "lora_variant", {})
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and type(a) is nn.Linear and a.bias is None and plain:
                a.__class__ = DropoutLinear
                a.dropout_p = float(dropout.p)
                dropouts[name] = nn.Identity()
                folded += 1
    return folded
