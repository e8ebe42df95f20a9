"""How a recorded step attends and scores: the kernel a recording runs (scripts/cuda_graphs.py),
and ``forward_as_recorded`` (scripts/recipe.py: the recorded loss, and an eager step's with
``train.sync_free_forward``), SDPA's causal flag instead of a mask tensor for right-padded rows
and TRL's LM head over every position (fixed shapes, nothing read back from the card). Each
keeps the numbers of the eager step."""

import contextlib
import threading

import torch

_in_effect = threading.local()  # per thread: the recorder thread's capture beside the loop's steps


@contextlib.contextmanager
def _switched_on(name: str):
    setattr(_in_effect, name, getattr(_in_effect, name, 0) + 1)
    try:
        yield
    finally:
        setattr(_in_effect, name, getattr(_in_effect, name) - 1)


def _on(name: str) -> bool:
    return getattr(_in_effect, name, 0) > 0


def _wrap_once(module, attribute: str, wrapper) -> None:
    """``module.attribute`` replaced by ``wrapper(original)`` once per process: the wrapper defers
    to the original in every thread that has not switched it on (a context per thread, where
    swapping the attribute in and out would undo another thread's)."""
    original = getattr(module, attribute)
    if not getattr(original, "_pipeline_wrapper", False):
        wrapped = wrapper(original)
        wrapped._pipeline_wrapper = True
        setattr(module, attribute, wrapped)


@contextlib.contextmanager
def scoring_every_position():
    """TRL's fused LM head without its compaction to the labelled positions (its path for
    devices without Triton): fixed shapes, the same per-token values after masking."""
    import trl.trainer.utils as trl_utils

    def wrapper(original):
        return lambda device: False if _on("every_position") else original(device)

    _wrap_once(trl_utils, "_use_triton", wrapper)
    with _switched_on("every_position"):
        yield


RECORDED_ATTENTION = ("cudnn", "flash")  # train.cuda_graphs_attention: the kernel a recording tries first


def attention_backends(first: str = "cudnn"):
    """cuDNN's attention first (``first="cudnn"``), as eager steps run it on a Hopper GPU, then flash,
    memory-efficient and math: with cuDNN left out a recording ran PyTorch's memory-efficient kernel
    (a 4 x 1,024 step's attention 87 against 12 ms eager on an H200,
    bench/results/profile_step_h200_b4_1024.json; each kernel recorded: bench/attention_check.py).
    ``first="flash"`` puts flash attention first: no per-shape plan to build (cuDNN builds one for each
    new sequence length, forward and backward) at a slower kernel.
    A checkpointed layer's recomputation runs under the same list (the forward's kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if first not in RECORDED_ATTENTION:
        raise ValueError(f"train.cuda_graphs_attention must be one of {RECORDED_ATTENTION}, not {first!r}")
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    if first == "flash":
        order.reverse()
    # set_priority: the list's order is the order tried (without it the list only enables)
    return sdpa_kernel([*order, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)


@contextlib.contextmanager
def causal_rows():
    """SDPA's causal flag for a forward called without a padding mask or position ids on
    right-padded rows (a recorded step's; an eager step's with ``train.sync_free_forward``): one
    sequence a row, pads after every real token, so the flag gives every real token the values
    the padding mask would. The caller passes no position ids (the model's own arange).

    transformers decides whether it may use the flag by reading tensors: whether a padding mask
    masks anything and, in a training forward (no cache), whether the position ids pack several
    sequences into a row. Eager, each read is a host sync. Under a CUDA stream capture it counts
    as tracing and builds the causal mask as a tensor instead (the padding mask's read up to 5.17,
    the position ids' read in 5.17 and 5.24). With neither passed there is nothing to read: the
    decision is the untraced one. The mask tensor cost the recorded 2,048 x 4 step its causal
    kernel: cuDNN's attention ran every tile against the mask, 0.571 against 0.178 s over 4 steps
    eager (bench/results/profile_step_h200_block_idle.json)."""
    import transformers.masking_utils as masking

    def flag_decision(original):
        def ignore_causal_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
            if _on("causal_rows") and padding_mask is None and not torch.is_tensor(q_offset):
                if local_attention_size is not None and kv_length >= local_attention_size:
                    return False
                return q_length == 1 or kv_length == q_length or q_offset == 0
            return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

        return ignore_causal_mask

    def one_sequence_a_row(original):  # the model's own arange
        return lambda position_ids: None if _on("causal_rows") else original(position_ids)

    _wrap_once(masking, "_ignore_causal_mask_sdpa", flag_decision)
    _wrap_once(masking, "find_packed_sequence_indices", one_sequence_a_row)
    with _switched_on("causal_rows"):
        yield


@contextlib.contextmanager
def forward_as_recorded():
    """A forward of right-padded rows called without the padding mask, as a recorded step runs it
    (``train.sync_free_forward``): the causal flag (causal_rows) and TRL's LM head over every
    position. Eager, TRL's head otherwise selects the labelled positions (two host syncs, for the
    few pads a batch holds) and transformers reads the padding mask (one)."""
    with causal_rows(), scoring_every_position():
        yield
