"""Whole decoder layers whose saved activations wait in host memory (``train.offload_layers``).

Checkpointing buys memory with arithmetic: a recomputed layer runs its forward matmuls again in
the backward (all but ``down_proj``'s), and the 7B shape's 2,048 x 4 step runs at the card's
power limit, where less arithmetic is less time. A layer whose activations go to pinned host
memory during the forward and come back before its backward needs neither the GPU memory nor
the recomputation: it costs the host link instead (~0.84 GB each way per layer at 2,048 x 4,
~15 ms at the 55 GB/s one H200 measured), on copy engines beside the compute. The link is slower
than the forward makes activations, so only some of the layers the plan would recompute are
offloaded, spaced so that each one's copies overlap the layers between (``offloaded_layers``).
Every 3rd of them at the 7B config's 8 GiB: 1.088x (bench/results/epochs_h200_offload_layers_3).

The activations are the tensors autograd saves inside the layer, moved by saved-tensor hooks
(as torch's ``save_on_cpu``, with streams): the copy to the host runs on a side stream, and the
tensors are kept until the next offloaded layer's forward, where the compute stream waits for
those copies before it lets their memory go (the peak counts them until then). In the
backward, when it reaches an offloaded layer, the offloaded layer below starts coming back on a
second side stream, beside the backward of this layer and of the recomputed ones between (the
highest offloaded layer starts when the backward enters the top layer); a layer reached before
its copy was started brings it back in line. The values come back as they left: the same
losses and gradients bit for bit (tests/test_layer_offload.py).

Small tensors, parameters and the frozen 4-bit weights stay (bitsandbytes keeps those as
attributes anyway, not as saved tensors). Eager steps only: a CUDA graph recording keeps the
layer's activations on the device (the plan does not offload a recorded shape).
"""

import functools

import torch

from memory_model import MIN_OFFLOAD_BYTES  # saved tensors below it stay on the device (counted there)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its extent in memory, in some order of its dimensions
    (then a host buffer of the same strides holds it exactly)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


@functools.cache
def _streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """One stream to the host and one back: separate copy engines, so a layer's copy back can run
    beside the copy out of the layers above it still draining."""
    return torch.cuda.Stream(device), torch.cuda.Stream(device)


class _Saved:
    """One saved tensor: its host copy, its way back, how many unpacks it still serves."""

    __slots__ = ("host", "back", "shape", "stride", "dtype", "uses")

    def __init__(self, host: torch.Tensor, like: torch.Tensor):
        self.host, self.back = host, None
        self.shape, self.stride, self.dtype = like.shape, like.stride(), like.dtype
        self.uses = 1


class _LayerActivations:
    """One offloaded layer's saved tensors of one step."""

    def __init__(self, index: int, device: torch.device):
        self.index, self.device = index, device
        self.saved: dict[tuple, _Saved] = {}
        # the tensors themselves until their copies to the host are done (the compute stream waits
        # for them at the next offloaded layer's forward, or the top layer's end); a freed tensor's
        # address could otherwise come back as another's within the layer and be taken for it
        self.originals: list[torch.Tensor] = []
        self.sent: torch.cuda.Event | None = None  # the copies to the host done
        self.arrived = None  # the copies back done: an event on a GPU, True on the CPU (None: not started)
        self.waited = False


class LayerOffload:
    """Saved-tensor hooks on the decoder layers ``select`` names, for the forwards that keep
    their activations (not checkpointed, training, not inside a recording)."""

    def __init__(self, layers: list, min_bytes: int | None = None):
        self.layers = layers
        self.min_bytes = MIN_OFFLOAD_BYTES if min_bytes is None else min_bytes
        self.chosen: frozenset[int] = frozenset()
        self.pending: list[_LayerActivations] = []  # this step's, in forward order
        self.bytes_last_step = 0
        self.in_line_fetches = 0  # layers whose copy back was not started ahead
        self._context = None
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self._enter, index), with_kwargs=True)
            layer.register_forward_hook(self._exit, always_call=True)

    def select(self, indices) -> None:
        """The layers offloaded from the next forward on."""
        self.chosen = frozenset(indices)

    @staticmethod
    def _training(layer) -> bool:
        """A training forward outside any recording (a recording keeps its activations)."""
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return layer.training and torch.is_grad_enabled() and not capturing

    def _active(self, index: int, layer) -> bool:
        return index in self.chosen and not getattr(layer, "gradient_checkpointing", False) and self._training(layer)

    def _enter(self, index: int, layer, args, kwargs) -> None:
        if not self._active(index, layer):
            return
        self._release_sent()
        if self.pending and self.pending[-1].index >= index:  # a new step: the last one's are spent
            self.pending.clear()
        if not self.pending:
            self.bytes_last_step = 0
        hidden = args[0] if args else kwargs.get("hidden_states")
        device = hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
        self.pending.append(_LayerActivations(index, device))
        self._context = torch.autograd.graph.saved_tensors_hooks(
            functools.partial(self._pack, self.pending[-1]), functools.partial(self._unpack, self.pending[-1])
        )
        self._context.__enter__()

    def _exit(self, layer, args, output) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
            group = self.pending[-1]
            if group.device.type == "cuda" and group.saved:
                group.sent = _streams(group.device)[0].record_event()
            else:
                group.originals.clear()
        if layer is self.layers[-1] and self.pending and self._training(layer):
            self._release_sent()
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                # the backward enters the top layer: the highest offloaded layer starts coming back
                hidden.register_hook(self._backward_begins)

    def _release_sent(self) -> None:
        """The layers offloaded before: the compute stream waits for their copies to the host, and
        their tensors go. Their memory then returns to the compute stream's pool in its order
        (no ``record_stream``, whose blocks the allocator counts as free while a copy still reads
        them and cannot reuse until it has: the device's true footprint stays in the peak)."""
        for group in self.pending:
            if group.originals and group.sent is not None:
                torch.cuda.current_stream(group.device).wait_event(group.sent)
                group.originals.clear()

    def _pack(self, group: _LayerActivations, tensor: torch.Tensor):
        if (
            isinstance(tensor, torch.nn.Parameter)
            or tensor.numel() * tensor.element_size() < self.min_bytes
            or tensor.device != group.device
            or not _dense(tensor)
        ):
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        key += (tensor.dtype, tensor._version)
        if key in group.saved:  # the same tensor saved twice (q's and v's LoRA share their input)
            group.saved[key].uses += 1
            return group.saved[key]
        if tensor.is_cuda:
            host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=True)
            to_host, _ = _streams(tensor.device)
            to_host.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(to_host):
                host.copy_(tensor, non_blocking=True)
        else:  # the CPU (tests): a copy, so that the values that come back are not the tensor's own
            host = tensor.clone()
        saved = group.saved[key] = _Saved(host, tensor)
        group.originals.append(tensor)
        self.bytes_last_step += tensor.numel() * tensor.element_size()
        return saved

    def _fetch(self, group: _LayerActivations) -> None:
        """Starts bringing a layer's tensors back (on the second side stream on a GPU)."""
        if group.arrived is not None:
            return
        if group.device.type != "cuda":
            for saved in group.saved.values():
                saved.back = saved.host.clone()
            group.arrived = True
            return
        compute = torch.cuda.current_stream(group.device)
        _, to_device = _streams(group.device)
        # the buffers come from the compute stream's pool: their memory may still be read by
        # work queued there, so the copies wait for it
        to_device.wait_stream(compute)
        if group.sent is not None:
            to_device.wait_event(group.sent)
        for saved in group.saved.values():
            saved.back = torch.empty_strided(saved.shape, saved.stride, dtype=saved.dtype, device=group.device)
        with torch.cuda.stream(to_device):
            for saved in group.saved.values():
                saved.back.copy_(saved.host, non_blocking=True)
        group.arrived = to_device.record_event()

    def _backward_begins(self, grad):
        if self.pending:
            self._fetch(self.pending[-1])

    def _next_below(self, group: _LayerActivations) -> None:
        """A layer's backward begins: the offloaded layer below it starts coming back, beside
        the backward of this layer and of the recomputed ones between."""
        position = next((i for i, other in enumerate(self.pending) if other is group), 0)
        if position > 0:
            self._fetch(self.pending[position - 1])

    def _unpack(self, group: _LayerActivations, saved):
        if not isinstance(saved, _Saved):
            return saved
        if group.arrived is None:
            self.in_line_fetches += 1
            self._fetch(group)
        if not group.waited:
            if group.device.type == "cuda":
                torch.cuda.current_stream(group.device).wait_event(group.arrived)
            group.waited = True
            self._next_below(group)
        tensor = saved.back
        saved.uses -= 1
        if saved.uses == 0:  # the last unpack: the device copy goes with autograd's use of it
            saved.back = saved.host = None
        return tensor
