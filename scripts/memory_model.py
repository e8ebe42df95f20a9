"""Peak GPU memory of one training step, predicted from the model's shape and the recipe.

Predicts ``torch.cuda.max_memory_allocated()`` of a LoRA/QLoRA step (what the bench
measures). Paged optimizer states live in CUDA managed memory, outside that counter;
they are reported apart (``paged_optimizer``) and added for a SLURM memory request.

    peak = weights + adapter (weights, grads, unpaged optimizer state) + cuBLAS workspaces
         + tokens x [ live_layers x a_layer + checkpointed_layers x a_input ]
         + max(loss head + its logits tile, tokens x one layer's backward working set)

    live_layers = max(full_layers, 1 + full layers below the top checkpointed one)

The backward frees each layer's activations once it has passed it, so a recomputed layer's
activations live beside the whole layers below it only: with the lowest n checkpointed (the
per-batch plan) the whole layers above are gone by then, and the peak is at the first
backward step (revision 2; revision 1 counted one recomputed layer beside every whole layer,
13.8 % over the peak measured with two whole layers, bench/results/epochs_h200_offload_8gib).
The loss head is summed with the activations either way, though its peak lives beside a whole
top layer and not beside a recomputed one: keeping the top layer whole measured 0.10 GiB more
than recomputing it where this says 0.07 less (bench/results/epochs_h200_revision2_blocks).
Revision 4: TRL's fused LM head (TRL >= 1.16, under every SFT run) scores the logits one
[min(tokens, 4,096), 32,768] tile at a time in the forward and again in the backward, beside
every layer's activations, and frees it before the top layer's backward, whose working set
takes its place; cuBLAS keeps a 32 MiB workspace per thread and stream, 2 in an eager run and
4-6 with CUDA graphs. Both were inside the graph headroom at the 7B shape, and 0.40 GiB over
revision 3 at SmolLM2-135M's (bench/results/memory_h200_head, torch's allocation history at
the peak). The head terms of the recipes without Liger predate the fused head and are kept as
calibrated then (they over-predict under TRL 1.16).

With layers kept whole in host memory (``offload_every``, scripts/layer_offload.py; revision 3) an
offloaded layer keeps no input on the device, and the plan also peaks in the forward, at the top
layer's MLP: the whole layers, the last offloaded one beside them (its tensors wait there for
their copy to the host), the kept inputs and the MLP's transients; the total is the larger of
the two peaks (bench/results/epochs_h200_offload_peak, epochs_h200_revision3). Revision 5 adds
what torch's allocation history found beside them: the embedding output, the top MLP's input and
each offloaded layer's small saved tensors (bench/results/memory_h200_steps).

``a_layer`` counts the bytes per token that autograd keeps for one decoder layer, tensor by
tensor (see ``layer_activation_bytes``); frozen base weights keep nothing for their inputs
(PyTorch and bitsandbytes save an input only when a weight needs its gradient).
A checkpointed layer keeps only its input and recomputes the rest in the backward pass, one
layer at a time (which layers: every k-th with ``checkpoint_every``, or any number of them,
the lowest, where the per-batch plan chose ``checkpointed_layers``: memory_plan.checkpoint_layer_sets);
with ``offload_checkpoints`` (scripts/offload.py) those inputs wait in pinned host memory
(``host_offload``, outside the total, like the paged optimizer state), all but the one
coming back ahead of its recomputation.

The recipes:
- ``pipeline``: base in the compute dtype (bf16), autocast, fp32 LoRA weights;
  ``kernels: liger`` swaps in Liger's RMSNorm, SwiGLU and RoPE (TRL's fused LM head scores the
  logits in tiles: no logits tensor at all).
- ``tutorial``: the tutorial's QLoRA recipe: fp16 compute, ``prepare_model_for_kbit_training``
  (embeddings, norms and head upcast to fp32, so the residual stream is fp32), no autocast.
  Its LoRA counterpart (fp16 base, no upcast, no autocast) is ``pipeline`` with
  ``kernels="none", autocast=False``.

Checked against an H200 in bench/results/gpu_recipes_h200_*.md (tests/test_memory_model.py
recomputes every row).
"""

import argparse
import json
from pathlib import Path

from model_shape import INPUT_GROUPS, TARGETS, ModelShape, lora_parameters

GIB = 1024**3
# The model's revision, recorded with every measured row: a row of an earlier revision was
# planned by it (its layers are replayed with ``recompute_beside_whole``). 2: live_layers above.
# 3: layers offloaded to host memory (train.offload_layers) keep no input on the device, and their
# plans peak in the forward with the last one beside the whole layers (bench/results/epochs_h200_offload_peak);
# revision 2 counted them as recomputed (replayed with ``offload_every=0``).
# 4: TRL's fused LM head scores the logits in one [tokens, 32,768] tile at a time, beside every layer's
# activations, and cuBLAS keeps a 32 MiB workspace per thread and stream (2 eager, 4-6 with CUDA
# graphs): 0.40 GiB that SmolLM2-135M's recorded steps measured over revision 3 at a 1 GiB budget
# (bench/results/memory_h200_head); at the 7B shape the graph headroom had been holding it.
# 5: the forward's peak with offloaded layers also holds the embedding output (LlamaModel's forward
# keeps it to its end), the top MLP's input, and each offloaded layer's saved tensors under
# MIN_OFFLOAD_BYTES: 0.067 GiB of the 0.10 that eager offloading steps beside recorded graphs measured
# over revision 4 (bench/results/memory_h200_steps; the rest, autocast's cached lora_A casts, is gone).
REVISION = 5
# trl.kernels.chunked_logprob (TRL 1.16): TOKEN_CHUNK_SIZE rows of _CHUNKED_LOGPROB_CHUNK_SIZE logits
# (trl.trainer.utils) per tile, in the compute dtype; tests/test_memory_model.py reads TRL's values.
HEAD_TILE_TOKENS = 4096
HEAD_TILE_VOCAB = 32768
# torch's cuBLAS workspace per (thread, stream) on Hopper when CUBLAS_WORKSPACE_CONFIG is unset (":4096:8").
# How many a run keeps, from torch's allocation history at the peak (memory_h200_head): the main
# thread's and autograd's on the loop's stream; the recordings add both on the capture stream, and
# recording ahead the recorder thread's (6 at the 7B shape; 4 at SmolLM2's, its thread's not yet made).
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
CUBLAS_WORKSPACES = {None: 2, "synchronized": 4, "ahead": 6}  # by train.cuda_graphs_capture (None: graphs off)
# Saved tensors under this stay on the device when their layer goes to host memory
# (scripts/layer_offload.py): lora_A's outputs, SDPA's log-sum-exp, the norms' statistics.
MIN_OFFLOAD_BYTES = 1 << 20
QLORA_BLOCK = 64  # bitsandbytes 4-bit block size: one fp32 absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantisation: absmax in 8 bit, one fp32 per 256 of them


def every_kth_layer(layers: int, checkpoint_every: int) -> tuple[int, ...]:
    """The indices checkpoint_every k checkpoints: layers 0, k, 2k, ...; 0 = none."""
    return tuple(range(0, layers, checkpoint_every)) if checkpoint_every else ()


def offloaded_layers(recomputed: tuple[int, ...], every: int, layer_count: int) -> tuple[int, ...]:
    """Of the layers a plan takes off the device (``recomputed``), those kept whole with their
    activations in host memory instead (``train.offload_layers``, scripts/layer_offload.py): every
    ``every``-th from the lowest, none directly below another, and none in the top layer (its
    backward comes first: nothing would overlap its copy back). 0: none."""
    if every <= 0:
        return ()
    candidates = sorted(index for index in recomputed if index < layer_count - 1)
    return tuple(candidates[:: max(every, 2)])


def checkpointed_layer_count(layers: int, checkpoint_every: int) -> int:
    return len(every_kth_layer(layers, checkpoint_every))


def lora_value_bytes(recipe: str, autocast: bool) -> int:
    """Bytes of one value of a LoRA path's activations: the compute dtype under autocast; without
    it PEFT casts a LoRA input to its fp32 weights (fp32 dropout and matmuls)."""
    return 2 if autocast and recipe != "tutorial" else 4


def layer_activation_bytes(
    shape: ModelShape,
    rank: int,
    targets: str,
    recipe: str,
    kernels: str,
    autocast: bool = True,
    recompute_dropout: bool = False,
) -> int:
    """Bytes per token autograd keeps for one decoder layer (no checkpointing). Assumes
    lora_dropout > 0 (the tutorial's 0.1: each adapter keeps its own dropout output, or with
    ``recompute_dropout`` (scripts/lora_dropout.py) the shared input once and a 1-bit mask)
    and an SDPA kernel whose memory is linear in the sequence (flash or memory-efficient)."""
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    act = 4 if recipe == "tutorial" else 2  # the residual stream's dtype
    if recipe == "tutorial" or kernels == "none":
        norms = 2 * 4 * h  # HF RMSNorm keeps an fp32 copy of its input
        mlp = 3 * act * i  # SiLU keeps gate, the product keeps silu(gate) and up
    else:
        norms = 2 * act * h  # Liger RMSNorm keeps its input (and 4 bytes of rstd)
        mlp = 2 * act * i  # Liger SwiGLU keeps gate and up, recomputes the activation
    attention = act * (2 * h + 2 * kv)  # SDPA keeps q, k, v (after RoPE) and its output
    lora_act = lora_value_bytes(recipe, autocast)
    adapters, inputs_kept = 0, set()
    for module in TARGETS[targets]:
        features_in, _ = shape.linear_shape(module)
        if recompute_dropout:  # the input once per group reading it + a 1-bit mask + lora_A output
            adapters += 0 if INPUT_GROUPS[module] in inputs_kept else lora_act * features_in
            adapters += features_in // 8 + lora_act * rank
            inputs_kept.add(INPUT_GROUPS[module])
        else:  # dropout mask (1 byte) + dropout output (lora_A's saved input) + lora_A output
            adapters += features_in * (1 + lora_act) + lora_act * rank
    return norms + attention + mlp + adapters


def offloaded_layer_residue(
    shape: ModelShape, tokens: int, rank: int, targets: str, kernels: str, lora_act: int = 2
) -> int:
    """Bytes an offloaded layer keeps on the device (revision 5): its saved tensors under
    MIN_OFFLOAD_BYTES (scripts/layer_offload.py), of lora_A's outputs (``lora_act`` bytes a value:
    bf16 under autocast), SDPA's log-sum-exp (fp32 per head) and, with Liger's RMSNorm, the two
    norms' rstd (fp32)."""
    per_token = [lora_act * rank] * len(TARGETS[targets]) + [4 * shape.heads] + ([4, 4] if kernels == "liger" else [])
    return sum(tokens * size for size in per_token if tokens * size < MIN_OFFLOAD_BYTES)


def loss_head_bytes(
    shape: ModelShape, recipe: str, kernels: str, autocast: bool = True, fused_head: bool = True
) -> int:
    """Bytes per token for the logits and cross-entropy at the step's peak. ``fused_head`` False:
    revisions 1-3's count of the liger pipeline's head (the hidden's gradient only)."""
    if recipe != "tutorial" and kernels == "liger":
        if not fused_head:
            return 4 * shape.hidden
        # TRL's fused LM head (TRL >= 1.16 replaces Liger's fused linear cross-entropy with it): its
        # own copy of the hidden states, their gradient in fp32 and its bf16 copy at the backward's
        # end, each measured there (bench/results/memory_h200_head); its tile: head_tile_bytes
        return (2 + 4 + 2) * shape.hidden
    if recipe == "tutorial" or not autocast:
        # fp32 head without autocast: the log-softmax output; calibrated on an H200
        # (bench/results/gpu_recipes_h200_qv_all.json), where 8 bytes over-predicted by 1 GiB.
        return shape.vocab * 4
    # At the peak: the fp32 copy of the bf16 logits and the log-softmax output
    return shape.vocab * (4 + 4)


def head_tile_bytes(tokens: int, recipe: str, kernels: str) -> int:
    """The fused LM head's logits tile (revision 4; the liger pipeline's head, as measured)."""
    if recipe == "tutorial" or kernels != "liger":
        return 0  # their head terms predate the fused head and stay as calibrated
    return min(tokens, HEAD_TILE_TOKENS) * HEAD_TILE_VOCAB * 2


def cublas_workspace_bytes(config: str | None) -> int:
    """One cuBLAS workspace: CUBLAS_WORKSPACE_CONFIG's ":SIZE_KIB:COUNT" pairs, or torch's default."""
    if not config:
        return CUBLAS_WORKSPACE_BYTES
    numbers = [int(n) for n in config.strip(":").split(":")]
    return sum(size * 1024 * count for size, count in zip(numbers[::2], numbers[1::2], strict=True))


def predict_peak(
    shape: ModelShape,
    *,
    method: str,
    rank: int,
    targets: str,
    seq: int,
    batch: int,
    checkpoint_every: int,
    recipe: str = "pipeline",
    kernels: str = "none",
    double_quant: bool = False,
    paged_optimizer: bool = True,
    autocast: bool = True,
    recompute_dropout: bool = False,
    offload_checkpoints: bool = False,
    checkpointed_layers: int | tuple[int, ...] | None = None,
    recorded: bool = False,
    offload_prefetch: bool = True,
    recompute_beside_whole: bool = False,
    offload_every: int = 0,
    graph_capture: str | None = None,
    cublas_workspace: int = CUBLAS_WORKSPACE_BYTES,
    fixed_buffers: bool = True,
    forward_extras: bool = True,
) -> dict:
    """Predicted peak of torch-allocated bytes, term by term (``host_offload``: pinned host
    memory, outside the total). ``checkpointed_layers``: the layers that recompute, where a
    per-batch plan chose them (memory_plan.checkpoint_layer_sets) rather than ``checkpoint_every``: their
    indices, or a count n for the lowest n. ``recorded``: a step the CUDA graphs record
    (offloaded inputs come back in line, as they do without ``offload_prefetch``).
    ``recompute_beside_whole``: revision 1's count (a recomputed layer beside every whole one),
    to replay the plans of rows measured under it. ``offload_every``: of those layers, every k-th
    keeps its activations in host memory instead of recomputing them (offloaded_layers; none in a
    recorded step); 0, as revision 2 counted them, for none. ``graph_capture``: how the run records
    its steps (train.cuda_graphs_capture; None: graphs off), for the count of cuBLAS workspaces
    (``cublas_workspace`` bytes each). ``fixed_buffers`` False: without the head's tile and the
    workspaces, as revisions 1-3 counted, to replay the plans of rows measured under them.
    ``forward_extras`` False: the forward's peak with offloaded layers as revisions 3-4 counted it."""
    compute = 2  # bf16/fp16
    if method == "qlora":
        linear = shape.linear_parameters()
        absmax = linear / QLORA_BLOCK * (1 + 4 / DOUBLE_QUANT_BLOCK if double_quant else 4)
        weights = linear / 2 + absmax
    elif method == "lora":
        weights = shape.linear_parameters() * compute
    else:
        raise ValueError(f"unknown method {method!r}")
    upcast = 4 if recipe == "tutorial" else compute
    weights += shape.other_parameters() * upcast
    lora = lora_parameters(shape, rank, targets)
    adapter = lora * (4 + 4 + (0 if paged_optimizer else 8))  # fp32 weights + grads (+ Adam m, v)
    tokens = seq * batch
    a_layer = layer_activation_bytes(shape, rank, targets, recipe, kernels, autocast, recompute_dropout)
    # A checkpointed layer keeps its input and its folded dropouts' 1-bit masks; with
    # offload_checkpoints every input but the first layer's (the embedding output, a leaf
    # autograd keeps for its gradient) waits in host memory instead.
    input_bytes = (4 if recipe == "tutorial" else 2) * shape.hidden
    masks = sum(shape.linear_shape(m)[0] // 8 for m in TARGETS[targets]) if recompute_dropout else 0
    if checkpointed_layers is None:
        checkpointed = every_kth_layer(shape.layers, checkpoint_every)
    elif isinstance(checkpointed_layers, int):
        checkpointed = tuple(range(checkpointed_layers))
    else:
        checkpointed = tuple(sorted(checkpointed_layers))
    full = shape.layers - len(checkpointed)
    if not checkpointed:
        live = full
    elif recompute_beside_whole:
        live = full + 1
    else:  # the top recomputed layer beside the whole layers below it, or every whole layer at the start
        live = max(full, 1 + checkpointed[-1] - (len(checkpointed) - 1))
    # An offloaded layer keeps no input of its own on the device (its saved tensors, the input
    # among them, go to the host); in the backward it counts as a recomputed one (one at a time).
    in_host = offloaded_layers(checkpointed, offload_every, shape.layers) if not recorded else ()
    stored = len(checkpointed) - len(in_host)
    offloaded = max(stored - 1, 0) if offload_checkpoints else 0
    # while a layer recomputes eagerly, the input of the one below it is already coming back
    # (a recorded step copies in line): one input more on the device
    prefetched = 1 if offloaded > 1 and offload_prefetch and not recorded else 0
    kept = stored * (input_bytes + masks) - (offloaded - prefetched) * input_bytes
    activations = tokens * (live * a_layer + kept)
    head = tokens * loss_head_bytes(shape, recipe, kernels, autocast, fused_head=fixed_buffers)
    working = tokens * 2 * compute * (shape.intermediate + shape.hidden)  # one layer's backward grads
    tile = head_tile_bytes(tokens, recipe, kernels) if fixed_buffers else 0
    # captures removed since (queued, ahead_padded: bench rows) recorded on a thread too
    count = CUBLAS_WORKSPACES.get(graph_capture, CUBLAS_WORKSPACES["ahead"])
    workspaces = count * cublas_workspace if fixed_buffers else 0
    if tile:  # revision 4: the head's buffers are gone before the top layer's backward begins
        head += tile
        after_layers = max(head, working)
    else:  # revisions 1-3, and the recipes whose head predates the fused one: summed, as calibrated
        after_layers = head + working
    total = weights + adapter + workspaces + activations + after_layers
    forward = 0
    if in_host:  # revision 3: the forward's peak, at the top layer's MLP
        # The last offloaded layer's tensors stay on the device until the top layer's end (until
        # then the compute stream has not waited for their copies): one layer beside the whole ones,
        # with the top MLP's transients (SwiGLU's output, down_proj's output and its dequantised weight).
        dequantised = shape.intermediate * shape.hidden * compute if method == "qlora" else 0
        passing = tokens * compute * (shape.intermediate + shape.hidden) + dequantised
        forward = weights + adapter + workspaces + tokens * ((full + 1) * a_layer + kept) + passing
        if forward_extras:  # revision 5
            # the embedding output where layer 0 is offloaded (offload_checkpoints keeps it as an input
            # already), the top MLP's input, each offloaded layer's small saved tensors
            embedding = input_bytes if 0 in in_host and not offload_checkpoints else 0
            forward += tokens * (embedding + compute * shape.hidden)
            lora_act = lora_value_bytes(recipe, autocast)
            forward += len(in_host) * offloaded_layer_residue(shape, tokens, rank, targets, kernels, lora_act)
            if graph_capture is None:  # the LoRA gradients: none until the backward (zero_grad frees
                forward -= lora * 4  # them), where CUDA graphs bind buffers once a shape is recorded
        total = max(total, forward)
    return {
        "weights": int(weights),
        "adapter": int(adapter),
        "activations": int(activations),
        "loss_head": int(head),
        "cublas_workspaces": int(workspaces),
        "backward_working_set": int(working),
        "total": int(total),
        "paged_optimizer": int(lora * 8) if paged_optimizer else 0,
        "host_offload": tokens * offloaded * input_bytes,
        "checkpointed_layers": stored,
        "offloaded_layers": len(in_host),
        "forward_peak": int(forward),  # with offloaded layers (0 without): the total when larger
        "layer_activation_bytes_per_token": a_layer,
    }


def main(config: Path, **recipe) -> dict:
    shape = ModelShape.from_config(config)
    return predict_peak(shape, **recipe)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_config", type=Path, help="config.json or a model folder")
    parser.add_argument("--method", choices=["lora", "qlora"], default="qlora")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", choices=list(TARGETS), default="qv")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="0 = no checkpointing")
    parser.add_argument("--recipe", choices=["pipeline", "tutorial"], default="pipeline")
    parser.add_argument("--kernels", choices=["none", "liger"], default="none")
    parser.add_argument("--no-autocast", action="store_true", help="LoRA matmuls in fp32 (a plain loop)")
    parser.add_argument("--double-quant", action="store_true", help="absmax quantised to 8 bit (QLoRA)")
    parser.add_argument("--recompute-dropout", action="store_true", help="train.recompute_lora_dropout")
    parser.add_argument("--offload-checkpoints", action="store_true", help="train.offload_checkpoints")
    a = parser.parse_args()
    result = main(
        a.model_config,
        method=a.method,
        rank=a.rank,
        targets=a.targets,
        seq=a.seq,
        batch=a.batch,
        checkpoint_every=a.checkpoint_every,
        recipe=a.recipe,
        kernels=a.kernels,
        autocast=not a.no_autocast,
        double_quant=a.double_quant,
        recompute_dropout=a.recompute_dropout,
        offload_checkpoints=a.offload_checkpoints,
    )
    print(
        json.dumps(
            {
                k: round(v / GIB, 3) if k not in ("checkpointed_layers", "layer_activation_bytes_per_token") else v
                for k, v in result.items()
            }
        )
    )
