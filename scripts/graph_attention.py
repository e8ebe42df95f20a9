"""How a recorded step attends and scores (scripts/cuda_graphs.py): the kernel a recording runs,
SDPA's causal flag instead of a mask tensor while a graph records, and TRL's LM head over every
position (fixed shapes). Each keeps the numbers of the eager step."""

import contextlib

import torch


@contextlib.contextmanager
def scoring_every_position():
    """TRL's fused LM head without its compaction to the labelled positions (its path for
    devices without Triton): fixed shapes, the same per-token values after masking."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        trl_utils._use_triton = original


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
def causal_flag_while_recording():
    """SDPA's causal flag instead of a causal mask tensor while a graph records (no padding mask).

    transformers up to 5.17 counts a CUDA stream capture as tracing and then builds the causal
    mask as a tensor, even with no padding mask to read (5.24 checks only a mask it would read),
    and flash attention takes no mask. Without a padding mask there is nothing to read, and the
    decision is the untraced one (the same values: pads sit after every real token). Alone it
    changed little on an H200 (2,048 x 4 blocks: 9,279 against 9,023 tok/s); the kernel that
    mattered is attention_backends' (bench/results/epochs_h200_recorded)."""
    import transformers.masking_utils as masking

    original = masking._ignore_causal_mask_sdpa

    def capturing() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def ignore_causal_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is None and not torch.is_tensor(q_offset) and capturing():
            if local_attention_size is not None and kv_length >= local_attention_size:
                return False
            return q_length == 1 or kv_length == q_length or q_offset == 0
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    masking._ignore_causal_mask_sdpa = ignore_causal_mask
    try:
        yield
    finally:
        masking._ignore_causal_mask_sdpa = original
