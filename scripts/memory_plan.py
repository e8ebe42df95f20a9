"""The plans the train stage and the train rule take from the memory model (scripts/memory_model.py):
which layers recompute for a batch within ``train.memory_budget_gib``, with the headroom a
recorded step keeps, and the request a train job makes for its cell.

- ``checkpoint_layer_sets``: the candidate layer sets, fastest first (``train.checkpoint_plan``);
- ``planned_batch``: the fastest set that fits one batch shape (scripts/checkpointing.py's
  CheckpointPlan, per batch);
- ``plan_for_cell``: one setting for a whole run (``gradient_checkpointing: auto`` without the
  per-batch plan, scripts/recipe.py);
- ``expected_peak``: the largest peak a cell's run is expected to reach over every batch length it
  can see, planned as the train stage plans it (the train rule's ``gpu_mem_mb``, rules/common.smk).

No torch here: the Snakefile imports it while it plans the DAG.
"""

from memory_model import (
    GIB,
    checkpointed_layer_count,
    cublas_workspace_bytes,
    every_kth_layer,
    predict_peak,
)
from model_shape import ModelShape

# A step recorded by train.cuda_graphs peaks above this model's prediction: revision 3 missed the
# fused head's tile and the recordings' cuBLAS workspaces (1.023-1.048 at the 7B shape, where 1.05-1.08
# held them; 1.35x at SmolLM2-135M's). Over revision 4, on one H200: 0.973-1.020 at the 7B shape
# (epochs_h200_shipped, _recorded, _recorder_split_b1, _unsloth_peak, _warm_up, memory_h200_head),
# 0.959-1.009 at SmolLM2's (memory_h200_head, epochs_h200_revision4_smollm2). A batch the graphs
# will record is planned within budget / this and expected at the prediction x this
# (scripts/checkpointing.py).
GRAPH_PEAK_FACTOR = 1.03  # the default of train.cuda_graphs_headroom


def checkpoint_candidates(layers: int) -> list[int]:
    """checkpoint_every values from fastest (none) to leanest (every layer)."""
    options = {0: 0}
    for k in range(layers, 0, -1):
        options.setdefault(checkpointed_layer_count(layers, k), k)
    return [options[count] for count in sorted(options)]


CHECKPOINT_PLANS = ("layers", "every")


def checkpoint_layer_sets(layers: int, plan: str) -> list[tuple[int, ...]]:
    """The per-batch plan's candidate sets of checkpointed layers, fastest (none) first.
    ``layers``: the lowest n layers, for every n (the backward reaches them last, once the layers
    above have freed their activations); ``every``: layers 0, k, 2k, ... (the plan before: between
    16 and 32 checkpointed layers it had nothing, and a batch that needed 17 recomputed all 32)."""
    if plan == "layers":
        return [tuple(range(count)) for count in range(layers + 1)]
    if plan == "every":
        return [every_kth_layer(layers, every) for every in checkpoint_candidates(layers)]
    raise ValueError(f"unknown checkpoint plan {plan!r}: one of {', '.join(CHECKPOINT_PLANS)}")


def choose_checkpointing(shape: ModelShape, budget_bytes: float, **recipe) -> tuple[int, dict]:
    """The fastest setting predicted to fit: the fewest checkpointed layers (each costs a
    recomputed forward). Every layer when nothing fits (the prediction says by how much)."""
    prediction = {}
    for every in checkpoint_candidates(shape.layers):
        prediction = predict_peak(shape, checkpoint_every=every, **recipe)
        if prediction["total"] <= budget_bytes:
            return every, prediction
    return 1, prediction


def cell_recipe(cell: dict, train: dict, kernels: str) -> dict:
    """predict_peak's recipe arguments for one grid cell under the config's train section."""
    return dict(
        method=cell["method"],
        rank=cell["lora_r"],
        targets=cell["target_modules"],
        kernels=kernels,
        double_quant=cell["double_quant"],
        paged_optimizer=train["optimizer"].startswith("paged"),
        recompute_dropout=bool(train.get("recompute_lora_dropout", False)) and cell.get("lora_dropout", 0.1) > 0,
        offload_checkpoints=bool(train.get("offload_checkpoints", False)),
        offload_prefetch=bool(train.get("offload_prefetch", True)),
        # layers offloaded only by the per-batch plan (scripts/checkpointing.py: CheckpointPlan)
        offload_every=int(train.get("offload_layers", 0) or 0) if train.get("gradient_checkpointing") == "auto" else 0,
        graph_capture=train.get("cuda_graphs_capture", "synchronized") if train.get("cuda_graphs") else None,
        cublas_workspace=cublas_workspace_bytes(train.get("cublas_workspace_config")),
    )


def plan_for_cell(model_config, cell: dict, train: dict, max_length: int, kernels: str) -> tuple[int, dict]:
    """checkpoint_every (0 = off, k = every k-th layer) and the prediction for one grid cell
    under the config's train section. ``gradient_checkpointing: auto`` takes the fastest
    setting that fits ``memory_budget_gib``. Used by the train stage and by the train rule's
    ``gpu_mem_mb`` resource."""
    shape = ModelShape.from_config(model_config)
    recipe = dict(cell_recipe(cell, train, kernels), seq=max_length, batch=train["batch_size"])
    setting = train["gradient_checkpointing"]
    if setting == "auto":
        return choose_checkpointing(shape, train["memory_budget_gib"] * GIB, **recipe)
    every = train["checkpoint_every"] if setting else 0
    return every, predict_peak(shape, checkpoint_every=every, **recipe)


def planned_batch(
    shape: ModelShape,
    budget_bytes: float,
    recipe: dict,
    batch: int,
    seq: int,
    factor: float = 1.0,
    plan: str = "layers",
    recorded: bool = False,
) -> tuple[tuple[int, ...], dict]:
    """``auto`` for one batch shape: the fastest of ``plan``'s layer sets within budget / ``factor``
    (a recorded step's headroom, 1 for an eager one), every layer when none fits, and its
    prediction, with the peak it is expected at (``expected``: the total x factor)."""
    for layers in checkpoint_layer_sets(shape.layers, plan):
        prediction = predict_peak(
            shape,
            checkpoint_every=0,
            checkpointed_layers=layers,
            seq=seq,
            batch=batch,
            recorded=recorded,
            **recipe,
        )
        if prediction["total"] <= budget_bytes / factor:
            break
    return layers, dict(prediction, expected=int(prediction["total"] * factor))


def graph_headroom(train: dict) -> float:
    """The factor a batch the CUDA graphs record is planned with (``train.cuda_graphs_headroom``)."""
    return float(train.get("cuda_graphs_headroom") or GRAPH_PEAK_FACTOR)


def expected_peak(model_config, cell: dict, train: dict, max_length: int, kernels: str, graphs: bool) -> dict:
    """The prediction of the batch with the largest peak a run of this cell is expected to
    reach (``expected``) over every padded batch length it can see, each planned as the train
    stage plans it (``auto``: per batch, within budget, scripts/checkpointing.py) and, where
    CUDA graphs will run (``graphs``) and record the batch, with their headroom (graph_headroom).
    The train rule's request (plus its ``paged_optimizer``)."""
    shape = ModelShape.from_config(model_config)
    recipe = cell_recipe(cell, train, kernels)
    batch, multiple = train["batch_size"], train.get("pad_to_multiple_of") or 1
    records, limit = graphs and train.get("cuda_graphs", False), train.get("cuda_graphs_max_tokens")
    step = multiple if multiple > 1 else 64  # unpadded lengths: every 64th, and the longest
    predictions, headroom = [], graph_headroom(train)
    for seq in sorted({*range(step, max_length + 1, step), max_length}):
        recorded = records and (limit is None or batch * seq <= limit)
        factor = headroom if recorded else 1.0
        if train["gradient_checkpointing"] == "auto":
            plan = train.get("checkpoint_plan", "layers")
            budget = train["memory_budget_gib"] * GIB
            _, prediction = planned_batch(shape, budget, recipe, batch, seq, factor, plan, recorded)
        else:
            every = train["checkpoint_every"] if train["gradient_checkpointing"] else 0
            prediction = predict_peak(shape, checkpoint_every=every, seq=seq, batch=batch, recorded=recorded, **recipe)
            prediction["expected"] = int(prediction["total"] * factor)
        predictions.append(prediction)
    return max(predictions, key=lambda prediction: prediction["expected"])
