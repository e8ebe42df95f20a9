"""Checkpointed layers' inputs kept in host memory (``train.offload_checkpoints``).

A checkpointed decoder layer keeps only its input for the backward, where it is recomputed;
at the 7B shape that is 8 KiB a token and layer, 2 GiB for a 2,048 x 4 batch over 32 layers:
most of what checkpointing leaves on the GPU. Here the input is copied to pinned host
memory during the forward and back when the layer is recomputed (unsloth's "offloaded"
gradient checkpointing, on torch's own non-reentrant checkpoint): the recomputation gets
the same values, so the same losses and gradients bit for bit (tests/test_offload.py).

torch's checkpoint keeps a layer's inputs through its recomputation's closure, not as saved
tensors, so saved-tensor hooks cannot move them; the layer's checkpoint function
(transformers' ``_gradient_checkpointing_func``) is replaced instead, handing the checkpoint
a ``HostCopy`` that gives the forward the GPU tensor itself and every recomputation a copy
from the host. The first layer's input, the embedding output, stays: autograd keeps that leaf
for its gradient anyway.

Each layer copies into its own pinned buffer (``HostSlot``), reserved once for the longest
batch and reused every step, so a CUDA graph (``train.cuda_graphs``) can record the copies:
a replay writes and reads the addresses the recording saw. Eagerly, the copy to the host
runs on a side stream beside the layer's forward (the tensor's memory is not reused before
the copy has read it: ``record_stream``; the copy back waits for it: an event), and the copy
back is double-buffered: when the backward reaches a layer, the layer below it starts coming
back on the side stream, so its copy runs beside this layer's recomputation and backward
instead of in line with them (at 2,048 x 4 on the 7B shape, 31 copies of 64 MiB a step, each
~1.2 ms at the 55 GB/s one H200's link measured: 1.06-1.085x the blocks' speed in line,
bench/results/epochs_h200_offload_*). Its memory comes from the compute stream's pool (a side
stream's pool would hold a segment of its own). One input more is on the device meanwhile (the
memory model counts it). Inside a recording the copies run on the recorded stream, in order.
"""

import functools
import logging
import weakref

import torch
from torch.utils.checkpoint import checkpoint


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.cache
def _device_marker(device: torch.device) -> torch.Tensor:
    """An empty tensor on the device, made once: torch's checkpoint saves and restores the RNG
    state of the devices its tensor arguments live on (preserve_rng_state), and a HostCopy is
    not a tensor."""
    return torch.empty(0, device=device)


class HostSlot:
    """One decoder layer's pinned host buffer, reused every step. A batch that does not fit
    (longer than reserved, or in another dtype) gets a new buffer of at least ``longest``
    elements; the old ones stay (a recording may hold their addresses)."""

    def __init__(self, longest: int = 0, chain: "CopyChain | None" = None, index: int = 0):
        self.longest = longest
        # its input comes back while the layer above recomputes: one model's slots share a
        # ``chain``, by layer ``index`` (the backward reaches a lower index later); None: in line
        self.chain, self.index = chain, index
        self.buffers: list[torch.Tensor] = []
        self.owner: HostCopy | None = None  # the forward whose input the buffer holds

    def reserve(self, numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        last = self.buffers[-1] if self.buffers else None
        if last is None or last.numel() < numel or last.dtype != dtype:
            if pinned and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("offload_checkpoints: a recorded batch is larger than the reserved host buffer")
            last = torch.empty(max(numel, self.longest), dtype=dtype, pin_memory=pinned)
            self.buffers.append(last)
        return last

    def take(self, like: torch.Tensor, owner: "HostCopy") -> torch.Tensor:
        buffer = self.reserve(like.numel(), like.dtype, like.is_cuda)
        self.owner = owner
        return buffer[: like.numel()].view(like.shape)


class CopyChain:
    """One model's offloaded layers: the HostCopy made last, the next one's ``below`` (the layer
    the backward reaches next). Weak: a finished run's last copy keeps no pinned buffer alive."""

    def __init__(self):
        self.latest = lambda: None  # a weakref.ref once a copy is made


class HostCopy:
    """A checkpointed layer's input: the tensor itself for the forward, a copy in (pinned)
    host memory from then on, brought back for each recomputation; bringing it back starts
    the copy back of the layer below (``below``: the HostCopy made just before this one in the
    same forward), which the backward recomputes next."""

    def __init__(self, tensor: torch.Tensor, slot: HostSlot):
        self.device, self.slot = tensor.device, slot
        self.requires_grad = tensor.requires_grad
        self.host = slot.take(tensor, self)
        self.copied = None
        self.fetched: torch.Tensor | None = None  # brought back ahead of its recomputation
        self.fetched_ready = None  # the side stream's event for it
        self.prefetched = False  # its recomputation found it fetched (tests, bench)
        self.brought_back = False  # a recomputation has had it
        self.below = None
        if slot.chain is not None:
            below = slot.chain.latest()
            # a lower layer of this forward; not a copy of an earlier forward's (brought back, or
            # a higher layer's: a forward whose backward never ran)
            if below is not None and below.pending() and below.slot.index < slot.index:
                self.below = below
            slot.chain.latest = weakref.ref(self)
        if tensor.is_cuda and not torch.cuda.is_current_stream_capturing():
            stream = _copy_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written
            with torch.cuda.stream(stream):
                self.host.copy_(tensor.detach(), non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(stream)
            tensor.record_stream(stream)
        else:  # a CPU, or a recording: on the current stream, in order
            self.host.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        self.tensor: torch.Tensor | None = tensor

    def pending(self) -> bool:
        """Released by its forward, still in its host buffer, not yet brought back."""
        return self.tensor is None and self.fetched is None and not self.brought_back and self.slot.owner is self

    def get(self) -> torch.Tensor:
        if self.tensor is not None:  # the forward: the tensor itself, its autograd history included
            return self.tensor
        if self.slot.owner is not self:
            raise RuntimeError(
                "offload_checkpoints: a layer ran forward again before the backward of its previous call "
                "(its host buffer holds the newer input)"
            )
        if self.fetched is not None:
            tensor, self.fetched, self.prefetched = self.fetched, None, True
            if self.fetched_ready is not None:
                torch.cuda.current_stream(self.device).wait_event(self.fetched_ready)
        else:
            tensor = self._bring_back(on_side_stream=False)
        self.brought_back = True
        below, self.below = self.below, None
        # inside a recording every copy runs in line, in order: nothing to overlap
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if below is not None and below.pending() and not capturing:
            below.fetched = below._bring_back(on_side_stream=True)
        return tensor.requires_grad_(self.requires_grad)

    def _bring_back(self, on_side_stream: bool) -> torch.Tensor:
        """The input from the host buffer to the device: in line on the current stream, or (a
        prefetch, eager on a GPU) on the side stream, after its copy to the host (the same
        stream, in order) and with an event the recomputation waits for."""
        if on_side_stream and self.device.type == "cuda":
            # allocated from the compute stream's pool: a block allocated on the side stream
            # stays in that stream's pool (its own segment), ~0.6 GiB more reserved at 2,048 x 4
            # (bench/results/epochs_h200_offload_prefetch)
            current, stream = torch.cuda.current_stream(self.device), _copy_stream(self.device)
            tensor = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            stream.wait_stream(current)  # work queued before may still use the block's memory
            with torch.cuda.stream(stream):
                tensor.copy_(self.host, non_blocking=True)
                self.fetched_ready = torch.cuda.Event()
                self.fetched_ready.record(stream)
            tensor.record_stream(stream)  # a prefetch never used is not reused before it is written
            return tensor
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
        return self.host.to(self.device, non_blocking=True)

    def release(self) -> None:
        """Drop the device tensor: the caller's graph keeps no other reference to it."""
        self.tensor = None


def _from_host(function, copy: HostCopy, device_marker: torch.Tensor, *args):
    return function(copy.get(), *args)


def offloaded_checkpoint(function, *args, slot: HostSlot, **checkpoint_kwargs):
    """torch.utils.checkpoint.checkpoint with the first argument (a decoder layer's hidden
    states) held in the layer's host slot between the forward and the recomputation."""
    if not args or not isinstance(args[0], torch.Tensor):
        _warn_once("offload_checkpoints: this model passes its hidden states by name; its layers keep them on the GPU")
        return checkpoint(function, *args, **checkpoint_kwargs)
    if args[0].grad_fn is None and args[0].requires_grad:  # a leaf (the embedding output): autograd
        return checkpoint(function, *args, **checkpoint_kwargs)  # keeps it for its gradient anyway
    copy = HostCopy(args[0], slot)
    marker = _device_marker(args[0].device)
    output = checkpoint(_from_host, function, copy, marker, *args[1:], **checkpoint_kwargs)
    copy.release()
    return output


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("offload").warning(message)


def offload_checkpoints(
    layers: list, checkpoint_kwargs: dict, longest: tuple | None = None, prefetch: bool = True
) -> int:
    """Every given decoder layer checkpoints through ``offloaded_checkpoint`` (with its own
    host slot) when its plan checkpoints it. ``longest``: (numel, dtype) of the longest
    batch's hidden states, pinned up front on a GPU (a recording cannot allocate them);
    ``prefetch``: each input comes back while the layer above recomputes. Returns the pinned
    bytes reserved."""
    reserved, chain = 0, CopyChain() if prefetch else None
    for index, layer in enumerate(layers):
        slot = HostSlot(longest[0] if longest else 0, chain, index)
        if longest is not None and torch.cuda.is_available():
            reserved += slot.reserve(*longest, pinned=True).nbytes
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, slot=slot, **checkpoint_kwargs)
    return reserved
