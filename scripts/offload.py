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
from the host. On a GPU the copy to the host runs on a side stream, beside the layer's
forward; the tensor's memory is not reused before the copy has read it (``record_stream``) and
the copy back waits for it (an event). The copy back runs on the compute stream, in order.
"""

import functools

import torch
from torch.utils.checkpoint import checkpoint


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class HostCopy:
    """A checkpointed layer's input: the tensor itself for the forward, a copy in (pinned)
    host memory from then on, brought back for each recomputation."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        self.host = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
        self.copied = None
        if tensor.is_cuda:
            stream = _copy_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written
            with torch.cuda.stream(stream):
                self.host.copy_(tensor.detach(), non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(stream)
            tensor.record_stream(stream)
        else:
            self.host.copy_(tensor.detach())
        self.tensor: torch.Tensor | None = tensor

    def get(self) -> torch.Tensor:
        if self.tensor is not None:  # the forward: the tensor itself, its autograd history included
            return self.tensor
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
        return self.host.to(self.device, non_blocking=True).requires_grad_(self.requires_grad)

    def release(self) -> None:
        """Drop the device tensor: the caller's graph keeps no other reference to it."""
        self.tensor = None


def _from_host(function, copy: HostCopy, device_marker: torch.Tensor, *args):
    return function(copy.get(), *args)


def offloaded_checkpoint(function, *args, **checkpoint_kwargs):
    """torch.utils.checkpoint.checkpoint with the first argument (a decoder layer's hidden
    states) held in host memory between the forward and the recomputation."""
    if not args or not isinstance(args[0], torch.Tensor):  # hidden states passed by name: keep them
        return checkpoint(function, *args, **checkpoint_kwargs)
    copy = HostCopy(args[0])
    # An empty tensor on the input's device: checkpoint saves and restores the RNG state of the
    # devices its tensor arguments live on (preserve_rng_state), and the copy is not a tensor.
    device_marker = torch.empty(0, device=args[0].device)
    output = checkpoint(_from_host, function, copy, device_marker, *args[1:], **checkpoint_kwargs)
    copy.release()
    return output


def offload_checkpoints(layers: list, checkpoint_kwargs: dict) -> int:
    """Every given decoder layer checkpoints through ``offloaded_checkpoint`` when its plan
    checkpoints it; returns how many layers were switched."""
    function = functools.partial(offloaded_checkpoint, **checkpoint_kwargs)
    for layer in layers:
        layer._gradient_checkpointing_func = function
    return len(layers)
