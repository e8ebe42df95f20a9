"""Gradient checkpointing layer by layer (``train.gradient_checkpointing``): which decoder layers
recompute their activations, set up once per model and, with ``auto``, re-planned per batch.

- ``enable_checkpointing``: layers 0, k, 2k, ... through torch's non-reentrant checkpoint;
  folded LoRA dropouts hand their masks to the recomputation (scripts/lora_dropout.py), and
  with ``train.offload_checkpoints`` the layers' inputs wait in host memory (scripts/offload.py).
- ``CheckpointPlan``: for ``auto``, the memory model's fastest setting that fits
  ``memory_budget_gib`` at each batch's (size, padded length), with headroom for a batch a
  CUDA graph records: the fewest layers that fit, the lowest ones (``checkpoint_plan: layers``),
  or layers 0, k, 2k, ... (``every``, the plan before).
"""

import logging
from pathlib import Path

import torch

from layer_offload import LayerOffload
from lora_dropout import checkpoint_context, recompute_needs_rng
from memory_model import GIB, every_kth_layer, offloaded_layers
from memory_plan import cell_recipe, checkpoint_layer_sets, graph_headroom, planned_batch
from model_shape import ModelShape
from offload import offload_checkpoints


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointing(layers: list, chosen) -> int:
    """Checkpoint the layers at the ``chosen`` indices, the others keep their activations; returns
    how many are checkpointed."""
    chosen = set(chosen)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    return len(chosen)


def enable_checkpointing(
    model,
    every: int,
    planned: bool = False,
    offload: bool = False,
    longest_tokens: int | None = None,
    offload_prefetch: bool = True,
) -> int:
    """Checkpoint decoder layers 0, k, 2k, ...; the others keep their activations. With
    planned=True the machinery is set up even for every=0 (a per-batch plan may switch it
    on); with offload=True checkpointed layers keep their inputs in host memory
    (scripts/offload.py), buffers reserved for ``longest_tokens``, each brought back ahead of
    its recomputation with ``offload_prefetch``. Returns the number of checkpointed layers."""
    if every == 0 and not planned:
        return 0
    kwargs = {"use_reentrant": False}
    if not recompute_needs_rng(model):  # folded dropouts hand their masks to the recomputation
        kwargs.update(context_fn=checkpoint_context, preserve_rng_state=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grad inputs
    if offload:
        hidden_dtype = model.get_input_embeddings().weight.dtype  # the residual stream's
        longest = (longest_tokens * model.config.hidden_size, hidden_dtype) if longest_tokens else None
        reserved = offload_checkpoints(decoder_layers(model), kwargs, longest, offload_prefetch)
        logging.getLogger("recipe").info("offload_checkpoints: %.2f GiB of pinned host memory reserved", reserved / GIB)
    layers = decoder_layers(model)
    return set_checkpointing(layers, every_kth_layer(len(layers), every))


class CheckpointPlan:
    """``gradient_checkpointing: auto`` per batch: the memory model's fastest setting that
    fits the budget at this batch's (batch size, padded length), cached per shape; a batch
    that ``train.cuda_graphs`` will record keeps ``train.cuda_graphs_headroom`` (GRAPH_PEAK_FACTOR).
    ``train.checkpoint_plan`` picks the candidate layer sets (memory_plan.checkpoint_layer_sets)."""

    def __init__(self, layers: list, model_config: Path, cell: dict, train: dict, kernels: str):
        self.layers = layers
        self.shape = ModelShape.from_config(model_config)
        self.budget = train["memory_budget_gib"] * GIB
        self.recipe = cell_recipe(cell, train, kernels)
        self.plan = train.get("checkpoint_plan", "layers")
        checkpoint_layer_sets(self.shape.layers, self.plan)  # an unknown plan fails here, not at a batch
        self.records = bool(train.get("cuda_graphs", False))
        self.graph_peak_factor = graph_headroom(train) if self.records else 1.0
        self.graph_max_tokens = train.get("cuda_graphs_max_tokens")
        self.chosen: dict[tuple[int, int], tuple[int, ...]] = {}
        self.predicted: dict[tuple[int, int], int] = {}
        self.steps_by_layers: dict[int, int] = {}
        self.applied: tuple | None = None  # the layers checkpointed now, and those offloaded
        # train.offload_layers: every k-th layer the plan recomputes keeps its activations in host
        # memory instead (scripts/layer_offload.py), at the batch shapes no recording holds
        self.offload_every = int(train.get("offload_layers", 0) or 0)
        self.offload = LayerOffload(layers) if self.offload_every and layers else None
        self.steps_by_offloaded: dict[int, int] = {}

    def without_recordings(self) -> None:
        """No recording will run (graphs off, or off for this run): every batch planned eager."""
        self.records, self.graph_peak_factor = False, 1.0

    def recorded(self, batch: int, seq: int) -> bool:
        """Whether the CUDA graphs will record a batch of this shape (planned with their headroom)."""
        return self.records and (self.graph_max_tokens is None or batch * seq <= self.graph_max_tokens)

    def layers_for(self, batch: int, seq: int) -> tuple[int, ...]:
        """The indices of the decoder layers this batch shape recomputes."""
        if (batch, seq) not in self.chosen:
            recorded = self.recorded(batch, seq)
            factor = self.graph_peak_factor if recorded else 1.0
            # the peak this batch is expected to reach: a recorded step's headroom included
            layers, prediction = planned_batch(
                self.shape, self.budget, self.recipe, batch, seq, factor, self.plan, recorded
            )
            self.chosen[(batch, seq)], self.predicted[(batch, seq)] = layers, prediction["expected"]
            if self.predicted[(batch, seq)] > self.budget:
                logging.getLogger("recipe").warning(
                    "memory_budget_gib %.2f: a batch of %d x %d tokens is predicted at %.2f GiB even with every "
                    "layer checkpointed%s; it trains so",
                    self.budget / GIB,
                    batch,
                    seq,
                    self.predicted[(batch, seq)] / GIB,
                    f" (x {factor} headroom for its CUDA graph)" if factor != 1.0 else "",
                )
        return self.chosen[(batch, seq)]

    def predicted_peak_bytes(self) -> int | None:
        """The expected peak over every batch shape planned so far (the memory model's, times
        the graphs' headroom for a batch they record)."""
        return max(self.predicted.values(), default=None)

    def offloaded_for(self, batch: int, seq: int) -> tuple[int, ...]:
        """The layers of this batch shape that keep their activations in host memory instead of
        recomputing them (none for a shape a CUDA graph records)."""
        if not self.offload_every or self.recorded(batch, seq):
            return ()
        return offloaded_layers(self.layers_for(batch, seq), self.offload_every, self.shape.layers)

    def select(self, batch: int, seq: int) -> int:
        """Sets the checkpointed (and offloaded) layers of a batch shape on the model (a step or a
        recording about to run); returns how many are recomputed."""
        offloaded = self.offloaded_for(batch, seq)
        layers = tuple(index for index in self.layers_for(batch, seq) if index not in offloaded)
        if (layers, offloaded) != self.applied:
            set_checkpointing(self.layers, layers)
            if self.offload is not None:
                self.offload.select(offloaded)
            self.applied = (layers, offloaded)
        return len(layers)

    def count(self, batch: int, seq: int) -> None:
        """One step trained at this shape (a replayed step too: its recording holds the layers)."""
        offloaded = len(self.offloaded_for(batch, seq))
        count = len(self.layers_for(batch, seq)) - offloaded
        self.steps_by_layers[count] = self.steps_by_layers.get(count, 0) + 1
        if self.offload_every:
            self.steps_by_offloaded[offloaded] = self.steps_by_offloaded.get(offloaded, 0) + 1

    def apply(self, input_ids: torch.Tensor) -> int:
        """Sets this batch's checkpointed layers and counts the step; returns how many."""
        batch, seq = input_ids.shape[0], input_ids.shape[-1]
        self.count(batch, seq)
        return self.select(batch, seq)

    def summary(self) -> dict:
        """Steps trained with each number of checkpointed layers (0 = none), for metrics.json."""
        return {str(count): steps for count, steps in sorted(self.steps_by_layers.items())}

    def offload_summary(self) -> dict | None:
        """train.offload_layers: steps by number of offloaded layers, the last step's bytes sent to
        the host, and how many layers came back in line (their copy not started ahead)."""
        if not self.offload_every:
            return None
        return {
            "every": self.offload_every,
            "steps_by_offloaded": {str(count): steps for count, steps in sorted(self.steps_by_offloaded.items())},
            "bytes_last_step": self.offload.bytes_last_step if self.offload else None,
            "in_line_fetches": self.offload.in_line_fetches if self.offload else None,
        }
