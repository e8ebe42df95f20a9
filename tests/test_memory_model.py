"""The memory model: its predictions against the peaks measured on an H200, and its choice."""

import json

import pytest

from conftest import PROJECT
from memory_model import predict_peak
from memory_plan import checkpoint_candidates, choose_checkpointing
from model_shape import ModelShape, lora_parameters

GIB = 1024**3
BENCH = PROJECT / "bench" / "results"
LLAMA2_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def bench_rows():
    """Every measured 7B-shape row (card, recipe, shape, checkpointing, measured peak)."""
    rows = []
    for path in sorted(BENCH.glob("gpu_recipes_h200_*.json")):
        report = json.loads(path.read_text())
        if report.get("superseded"):
            continue
        rows += [dict(row, source=path.name) for row in report["rows"]]
    return rows


def test_bench_results_exist_and_cover_the_goal_rows():
    rows = bench_rows()
    assert {(r["recipe"], r["targets"], r["checkpointing"]) for r in rows} >= {
        ("tutorial", "qv", "on"),
        ("pipeline", "qv", "on"),
        ("pipeline", "qv", "auto:40"),
        ("tutorial", "all_linear", "on"),
        ("pipeline", "all_linear", "on"),
        ("pipeline", "all_linear", "auto:80"),
    }


@pytest.mark.parametrize(
    "row",
    bench_rows(),
    ids=lambda r: (
        f"{r['source']}:{r['recipe']}-{r['method']}-{r['targets']}-{r['seq']}x{r['batch']}-{r['checkpointing']}-{r['repeat']}"
    ),
)
def test_prediction_within_ten_percent_of_the_measured_peak(row):
    from gpu_recipes import prediction_recipe

    predicted = predict_peak(
        LLAMA2_7B, checkpoint_every=row["checkpoint_every"], **prediction_recipe(row, row["kernels"])
    )
    measured = row["peak_allocated_gib"] * GIB
    assert abs(predicted["total"] - measured) <= 0.10 * measured, (predicted["total"] / GIB, row["peak_allocated_gib"])


def test_auto_checkpointing_takes_the_fastest_setting_that_fits():
    recipe = dict(method="qlora", rank=64, targets="qv", seq=2048, batch=4, kernels="liger")
    assert choose_checkpointing(LLAMA2_7B, 40 * GIB, **recipe)[0] == 0  # everything fits: no recomputation
    assert choose_checkpointing(LLAMA2_7B, 8 * GIB, **recipe)[0] == 1  # only every layer fits
    every, prediction = choose_checkpointing(LLAMA2_7B, 22 * GIB, **recipe)
    assert every == 2 and prediction["total"] <= 22 * GIB  # half the layers: 21.0 GiB predicted
    # ... and it is the least recomputation that fits: one more kept layer would not.
    lighter = [k for k in checkpoint_candidates(32) if 0 < k and k > every] + [0]
    assert predict_peak(LLAMA2_7B, checkpoint_every=lighter[0], **recipe)["total"] > 22 * GIB


def test_a_recomputed_layer_lives_beside_the_whole_layers_below_it_only():
    """The backward frees each layer's activations once past it: a recomputed layer's
    activations coexist with the whole layers below it, not with those above (revision 2)."""
    from memory_model import layer_activation_bytes

    shape = dict(method="qlora", rank=64, targets="qv", seq=2048, batch=4, kernels="liger", recompute_dropout=True)
    tokens, a_layer = 8192, layer_activation_bytes(LLAMA2_7B, 64, "qv", "pipeline", "liger", recompute_dropout=True)
    assert round(tokens * a_layer / GIB, 2) == 0.78  # one layer's activations at 2,048 x 4 (the 7B config's)

    def activations(layers, **kwargs):
        return predict_peak(LLAMA2_7B, checkpoint_every=0, checkpointed_layers=layers, **shape, **kwargs)["activations"]

    # the lowest 30 recomputed: the two whole layers above are freed before the first recomputation
    assert (
        activations(30)
        == activations(tuple(range(30)))
        == activations(30, recompute_beside_whole=True) - tokens * a_layer
    )
    # the top layer recomputed first, beside the 31 whole layers below it
    assert activations((31,)) - activations((0,)) == tokens * a_layer
    # layers 0, 2, ..., 30: layer 30 recomputes beside the 15 whole layers below; 16 whole at the start
    every_other = predict_peak(LLAMA2_7B, **dict(shape, checkpoint_every=2))["activations"]
    assert (
        every_other
        == activations(tuple(range(0, 32, 2)))
        == activations(tuple(range(0, 32, 2)), recompute_beside_whole=True) - tokens * a_layer
    )
    # every layer recomputed, or none: the two revisions agree
    for layers in (0, 32):
        assert activations(layers) == activations(layers, recompute_beside_whole=True)


def test_the_plan_keeps_a_layer_more_whole_at_the_7b_configs_budget():
    """The 7B config's 2,048 x 4 blocks at its 8 GiB budget with offloaded inputs: revision 1
    recomputed 30 layers (measured 6.748 GiB, bench/results/epochs_h200_offload_8gib); the layer it
    over-counted (0.78 GiB) leaves room for one more whole layer."""
    from memory_plan import cell_recipe, planned_batch

    cell = dict(method="qlora", lora_r=64, target_modules="qv", double_quant=False)
    train = dict(optimizer="adamw_torch_fused", recompute_lora_dropout=True, offload_checkpoints=True)
    recipe = cell_recipe(cell, train, "liger")
    layers, prediction = planned_batch(LLAMA2_7B, 8 * GIB, recipe, 4, 2048)
    old, _ = planned_batch(LLAMA2_7B, 8 * GIB, dict(recipe, recompute_beside_whole=True), 4, 2048)
    assert (len(old), len(layers)) == (30, 29)
    assert 7.6 * GIB < prediction["total"] <= 8 * GIB


def test_an_offloaded_layer_keeps_no_input_and_its_plan_peaks_in_the_forward():
    """Revision 3 (train.offload_layers): a layer whose saved tensors wait in host memory keeps no
    input of its own on the device, and the plan peaks in the forward at the top layer's MLP, the
    last offloaded layer's tensors still there beside the whole layers (measured where the peak
    sits: bench/results/epochs_h200_offload_peak). Revision 2 counted it as a recomputed layer."""
    from memory_model import layer_activation_bytes

    shape = dict(method="qlora", rank=64, targets="qv", seq=2048, batch=4, kernels="liger", recompute_dropout=True)
    shape["paged_optimizer"] = False  # the 7B config's fused AdamW: its state inside the allocator
    tokens, a_layer = 8192, layer_activation_bytes(LLAMA2_7B, 64, "qv", "pipeline", "liger", recompute_dropout=True)
    input_and_masks = 2 * 4096 + 2 * 4096 // 8  # the layer's input in bf16 and the q, v dropout masks as bits

    def predict(layers, every, **kwargs):
        return predict_peak(
            LLAMA2_7B, checkpoint_every=0, checkpointed_layers=layers, offload_every=every, **shape, **kwargs
        )

    # the 7B config as it ships: 31 off the device, every 3rd of them offloaded (0, 3, ..., 30)
    shipped, counted = predict(31, 3), predict(31, 0)
    assert (shipped["offloaded_layers"], shipped["checkpointed_layers"]) == (11, 20)
    assert counted["activations"] - shipped["activations"] == 11 * tokens * input_and_masks
    # the top layer whole, the last offloaded layer (30) beside it, and the top MLP's transients
    passing = tokens * 2 * (11008 + 4096) + 11008 * 4096 * 2
    # revision 5 (bench/results/memory_h200_steps): the embedding output (layer 0 is offloaded), the
    # top MLP's input, each offloaded layer's two rstd (its lora_A outputs and SDPA's log-sum-exp,
    # 1 MiB each at 8,192 tokens, go to the host); no LoRA gradients yet in an eager forward
    extras = tokens * (2 * 4096 + 2 * 4096) + 11 * tokens * (4 + 4) - lora_parameters(LLAMA2_7B, 64, "qv") * 4
    assert (
        shipped["total"]
        == shipped["forward_peak"]
        == (
            shipped["weights"]
            + shipped["adapter"]
            + shipped["cublas_workspaces"]  # revision 4: the main thread's and autograd's, eager
            + shipped["activations"]
            + tokens * a_layer
            + passing
            + extras
        )
    )
    assert extras == predict(31, 3)["total"] - predict(31, 3, forward_extras=False)["total"]
    assert shipped["cublas_workspaces"] == 2 * 32 * 2**20
    # with the inputs in host memory, 29 off the device: three whole layers and layer 27 beside them
    offloaded = predict(29, 3, offload_checkpoints=True)
    assert offloaded["forward_peak"] == offloaded["total"] > predict(29, 0, offload_checkpoints=True)["total"]
    # measured (bench/results/epochs_h200_offload_peak): 7.766 and 8.077 GiB; revision 5 -0.4 % and +0.3 %
    # (revision 4 -0.5 % and +1.1 %)
    assert shipped["total"] / GIB == pytest.approx(7.766, rel=0.005)
    assert offloaded["total"] / GIB == pytest.approx(8.077, rel=0.005)
    # a recorded step offloads nothing; without offloaded layers the forward is never the peak
    assert predict(31, 3, recorded=True) == predict(31, 0, recorded=True)
    assert counted["forward_peak"] == 0


def test_the_plan_leaves_room_for_the_offloaded_layer_at_the_7b_configs_budget():
    """The 7B config's 2,048 x 4 blocks at 8 GiB, every 3rd layer off the device offloaded: with
    the inputs in host memory too, revision 2 planned 29 layers off the device and reached 8.077
    GiB (bench/results/epochs_h200_offload_layers_2); revision 3 plans 30 (7.300 GiB measured,
    bench/results/epochs_h200_revision3). With the inputs on the device (as the config ships) the
    plan stays at 31."""
    from memory_plan import cell_recipe, planned_batch

    cell = dict(method="qlora", lora_r=64, target_modules="qv", double_quant=False)
    for offload_inputs, revision_2, revision_3 in ((True, 29, 30), (False, 31, 31)):
        train = dict(optimizer="adamw_torch_fused", recompute_lora_dropout=True, offload_layers=3)
        train.update(gradient_checkpointing="auto", offload_checkpoints=offload_inputs)
        recipe = cell_recipe(cell, train, "liger")
        assert cell_recipe(cell, dict(train, gradient_checkpointing=True), "liger")["offload_every"] == 0
        layers, prediction = planned_batch(LLAMA2_7B, 8 * GIB, recipe, 4, 2048)
        old, _ = planned_batch(LLAMA2_7B, 8 * GIB, dict(recipe, offload_every=0), 4, 2048)
        assert (len(old), len(layers)) == (revision_2, revision_3)
        assert prediction["total"] <= 8 * GIB


def test_memory_grows_with_tokens_rank_and_targets():
    base = dict(method="qlora", rank=64, targets="qv", seq=1024, batch=1, checkpoint_every=1)
    total = predict_peak(LLAMA2_7B, **base)["total"]
    assert predict_peak(LLAMA2_7B, **dict(base, batch=4))["total"] > total
    assert predict_peak(LLAMA2_7B, **dict(base, rank=128))["total"] > total
    assert predict_peak(LLAMA2_7B, **dict(base, targets="all_linear"))["total"] > total
    assert predict_peak(LLAMA2_7B, **dict(base, method="lora"))["total"] > 2 * total  # 16-bit weights
    assert lora_parameters(LLAMA2_7B, 64, "qv") == 32 * 2 * 64 * (4096 + 4096)


def test_folded_dropout_keeps_each_input_once_and_masks_as_bits():
    """scripts/lora_dropout.py's layout, per token and layer in bf16 (the counted saved tensors
    of tests/test_lora_dropout.py): modules that read one input keep it once."""
    from memory_model import layer_activation_bytes

    h, i, r = 4096, 11008, 64
    stock, folded = (
        {
            t: layer_activation_bytes(LLAMA2_7B, r, t, "pipeline", "liger", recompute_dropout=f)
            for t in ("qv", "all_linear")
        }
        for f in (False, True)
    )
    assert stock["qv"] - folded["qv"] == 2 * (h * 3) - (2 * h + 2 * h // 8)  # 15,360 bytes
    # q, k, v read one input, gate and up another; o and down each their own
    inputs, masks = 2 * (h + h + h + i), (6 * h + i) // 8
    assert stock["all_linear"] - folded["all_linear"] == (6 * h + i) * 3 - inputs - masks
    shape = dict(method="qlora", rank=r, targets="qv", seq=1024, batch=1, kernels="liger")
    saved = predict_peak(LLAMA2_7B, checkpoint_every=0, **shape)["total"]
    saved -= predict_peak(LLAMA2_7B, checkpoint_every=0, recompute_dropout=True, **shape)["total"]
    assert round(saved / GIB, 2) == 0.47  # 1,024 tokens x 32 layers x 15,360 bytes
    # a checkpointed layer keeps its input and its adapters' 1-bit masks
    kept = predict_peak(LLAMA2_7B, checkpoint_every=1, recompute_dropout=True, **shape)["activations"]
    assert kept - predict_peak(LLAMA2_7B, checkpoint_every=1, **shape)[
        "activations"
    ] == 1024 * 32 * 2 * h // 8 + 1024 * (folded["qv"] - stock["qv"])


def test_shape_from_the_pipelines_base_model(base_model_dir):
    shape = ModelShape.from_config(base_model_dir)
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.vocab) == (576, 30, 3, 49152)
    assert shape.tied_embeddings


def test_train_jobs_request_the_predicted_gpu_memory(pipeline_run, tiny_config):
    """The train rule's gpu_mem_mb resource is the memory model's prediction for its cell."""
    import math
    import re

    from conftest import snakemake
    from grid import grid_table
    from memory_plan import plan_for_cell

    planned = snakemake("-n", "--forcerun", "train", results_dir=pipeline_run).stdout
    requested = [int(m) for m in re.findall(r"rule train:.*?gpu_mem_mb=(\d+)", planned, flags=re.S)]
    expected = []
    for _, row in grid_table(tiny_config["grid"]).iterrows():
        cell = {k: getattr(v, "item", lambda v=v: v)() for k, v in row.items()}
        _, prediction = plan_for_cell(
            pipeline_run / "model" / "base", cell, tiny_config["train"], tiny_config["data"]["max_length"], "none"
        )
        expected.append(math.ceil((prediction["total"] + prediction["paged_optimizer"]) / 1e6))
    assert len(requested) == 4 and sorted(requested) == sorted(expected)
    assert all(mb > 0 for mb in requested)


@pytest.mark.parametrize(("batch", "lean"), [(4, None), (4, "lean_4.84"), (1, "lean_4.2"), (4, "config/lean.yaml")])
def test_gpu_memory_request_covers_every_batch_the_plan_expects(tmp_path, batch, lean):
    """The train rule's gpu_mem_mb (memory_plan.expected_peak): with CUDA graphs, the largest peak the
    per-batch plan expects over every padded batch length of the run (a recorded batch planned
    within budget / headroom and expected at prediction x headroom); without, the prediction at
    the longest batch. Lean: the rows measured at unsloth's peak, whose plans expected what the
    request now asks (bench/results/epochs_h200_unsloth_peak)."""
    import yaml

    from checkpointing import CheckpointPlan
    from epoch_results import memory_overrides
    from gpu_recipes import LLAMA2_7B as CONFIG
    from gpu_recipes import bench_cell
    from memory_plan import expected_peak

    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(CONFIG))
    train = dict(yaml.safe_load((PROJECT / "config" / "llama2-7b.yaml").read_text())["train"], batch_size=batch)
    cell = bench_cell()
    if lean == "config/lean.yaml":  # the overlay: every batch recorded, so every one gets the headroom
        overlay = yaml.safe_load((PROJECT / lean).read_text())
        train.update(overlay["train"])
        cell.update(double_quant=overlay["grid"]["double_quant"][0])
    elif lean:
        train.update(offload_checkpoints=True, memory_budget_gib=float(lean.split("_")[1]))
        cell.update(double_quant=True)
        row = next(
            r for r in json.loads((BENCH / "epochs_h200_unsloth_peak.json").read_text())["rows"] if r["recipe"] == lean
        )
        ran = memory_overrides(row)  # the graph limit and optimizer as the row ran
        train.update(cuda_graphs_max_tokens=ran["cuda_graphs_max_tokens"], optimizer=ran["optimizer"])
    assert train["cuda_graphs"] and train["gradient_checkpointing"] == "auto"
    requested = expected_peak(model_config, cell, train, 1024, "liger", graphs=True)["expected"]
    plan = CheckpointPlan([], model_config, cell, train, "liger")
    for seq in range(64, 1025, train["pad_to_multiple_of"]):
        plan.layers_for(batch, seq)
    assert requested == plan.predicted_peak_bytes()
    eager = CheckpointPlan([], model_config, cell, train, "liger")
    eager.without_recordings()  # what the train stage sets where no recording will run
    for seq in range(64, 1025, train["pad_to_multiple_of"]):
        eager.layers_for(batch, seq)
    assert expected_peak(model_config, cell, train, 1024, "liger", graphs=False)["expected"] == (
        eager.predicted_peak_bytes()
    )
    if lean:  # nothing fits unsloth's peak: every layer checkpointed, the recorded batch's headroom on top
        measured_in, recipe = "epochs_h200_unsloth_peak.json", lean
        if lean == "config/lean.yaml":  # its keys, measured over a whole epoch
            measured_in, recipe = "epochs_h200_recorded.json", "lean_yaml"
        measured = json.loads((BENCH / measured_in).read_text())["table"]
        row = next(r for r in measured if r["recipe"] == recipe)
        # revision 4 (the headroom of the config as it ships) asks for what the row measured, within 10 %
        assert row["peak_allocated_gib"] <= requested / GIB <= row["peak_allocated_gib"] * 1.10
        assert requested >= eager.predicted_peak_bytes()  # the longest batch may be an eager one


def test_revision_4_counts_the_fused_heads_tile_and_the_cublas_workspaces():
    """Revision 4 (measured at SmolLM2-135M's recorded peak, bench/results/memory_h200_head): TRL's
    fused LM head keeps one [min(tokens, 4096), 32768] bf16 tile of logits beside every layer's
    activations, instead of the top layer's backward working set; cuBLAS keeps a workspace per
    thread and stream. The constants are TRL's and torch's own."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    from memory_model import (
        CUBLAS_WORKSPACE_BYTES,
        HEAD_TILE_TOKENS,
        HEAD_TILE_VOCAB,
        cublas_workspace_bytes,
        head_tile_bytes,
    )

    assert (HEAD_TILE_TOKENS, HEAD_TILE_VOCAB) == (
        chunked_logprob.TOKEN_CHUNK_SIZE,
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE,
    )
    assert head_tile_bytes(4 * 1024, "pipeline", "liger") == 4096 * 32768 * 2  # 0.25 GiB
    assert head_tile_bytes(8192, "pipeline", "liger") == head_tile_bytes(4096, "pipeline", "liger")
    assert head_tile_bytes(1024, "tutorial", "none") == 0  # its head term predates the fused head
    assert cublas_workspace_bytes(None) == CUBLAS_WORKSPACE_BYTES == cublas_workspace_bytes(":4096:8")
    assert cublas_workspace_bytes(":4096:2:16:8") == 8 * 2**20 + 128 * 1024  # config/lean.yaml's
    smollm2 = ModelShape(
        hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied_embeddings=True
    )
    recipe = dict(method="qlora", rank=64, targets="qv", seq=1024, batch=4, kernels="liger", recompute_dropout=True)
    recipe.update(checkpoint_every=0, checkpointed_layers=17, recorded=True, paged_optimizer=False)
    ahead = predict_peak(smollm2, graph_capture="ahead", **recipe)
    eager = predict_peak(smollm2, **recipe)
    assert ahead["total"] - eager["total"] == ahead["cublas_workspaces"] - eager["cublas_workspaces"] == 4 * 2**25
    head = 4096 * (2 + 4 + 2) * 576 + 4096 * 32768 * 2
    assert ahead["loss_head"] == head > ahead["backward_working_set"]
    parts = ("weights", "adapter", "cublas_workspaces", "activations", "loss_head")
    assert ahead["total"] == sum(ahead[k] for k in parts)  # the working set comes after the head's buffers
    # revision 3's count of the same step, and what the history measured there: 1.295 GiB (12 steps)
    old = predict_peak(smollm2, graph_capture="ahead", fixed_buffers=False, **recipe)
    assert old["total"] / GIB < 0.95 < 1.25 < ahead["total"] / GIB
    assert ahead["total"] / GIB == pytest.approx(1.295, rel=0.05)


@pytest.mark.parametrize("run", ["dag_h200_revision4", "dag_h200_revision5"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_dags_training_jobs_peak_within_their_budget_as_planned(tmp_path, method, run):
    """The whole DAG on one H200 with the 7B configs' recipe over SmolLM2-135M at a 1 GiB budget
    (bench/dag_h200.sh), re-run under revision 4 (bench/results/dag_h200_revision4) and under
    revision 5 with the folded lora_A's own cast (dag_h200_revision5): the plan the train stage
    followed is the one the shipped configs give today, and each job peaked inside the budget
    and not below 0.95x the plan (the recorded bench rows: 0.959-1.020x; these jobs 0.985-0.986x).
    Under revision 3 the same jobs reached 1.354 and 1.339 GiB at a plan of 0.99 and 1.00
    (bench/results/dag_h200_gpu_recipe)."""
    import yaml
    from snakemake.utils import update_config

    from epoch_results import shape_configs
    from memory_plan import expected_peak

    config = yaml.safe_load((PROJECT / "config" / "config.yaml").read_text())
    for overlay in ("config/smollm2-gpu.yaml", "bench/configs/gpu-recipe-dag.yaml"):
        update_config(config, yaml.safe_load((PROJECT / overlay).read_text()))  # as Snakemake merges them
    model_config = shape_configs(tmp_path)["smollm2"]  # SmolLM2-135M-Instruct's shape
    metrics = json.loads((BENCH / run / f"train_metrics_{method}.json").read_text())
    assert metrics["device"] == "NVIDIA H200" and metrics["cuda_graphs"]["replayed_steps"] == 249
    cell = {k: metrics[k] for k in ("method", "lora_r", "lora_dropout", "target_modules", "double_quant")}
    train, max_length = config["train"], config["data"]["max_length"]
    planned = expected_peak(model_config, cell, train, max_length, "liger", graphs=True)["expected"]
    assert planned == metrics["plan_predicted_peak_bytes"]  # the train stage's plan, recomputed
    budget = train["memory_budget_gib"] * GIB
    assert planned <= budget
    assert metrics["checkpoint_steps_by_layers"]["0"] < 250  # the long batches recompute
    measured = metrics["train_peak_allocated_bytes"]
    assert 0.95 * planned <= measured <= budget
