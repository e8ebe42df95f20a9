"""scripts/layer_offload.py (``train.offload_layers``): some of the layers the plan would recompute
keep their activations in host memory instead, on the tiny random Llama: which layers, the same
losses and gradients as recomputing them bit for bit, and every saved tensor sent and released."""

import pytest

import layer_offload
from memory_model import offloaded_layers, predict_peak
from model_shape import ModelShape
from test_recipe import LENGTHS, PROJECT, build_tiny_model, train_tiny


def test_offloaded_layers_are_spaced_from_the_lowest_and_never_the_top_one():
    assert offloaded_layers(tuple(range(29)), 3, 32) == tuple(range(0, 28, 3))  # 0, 3, ..., 27
    assert offloaded_layers(tuple(range(32)), 2, 32) == tuple(range(0, 31, 2))  # 30, not 31 (the top)
    assert offloaded_layers(tuple(range(32)), 1, 32) == tuple(range(0, 31, 2))  # never two adjacent
    assert offloaded_layers((0, 1), 2, 3) == (0,)
    assert offloaded_layers(tuple(range(10)), 0, 32) == () and offloaded_layers((), 2, 32) == ()


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("three_layers"), layers=3)


def long_batches_budget(model_dir) -> float:
    """A budget (GiB) at which the tiny rows' long batches recompute the lowest two of three layers."""
    shape = ModelShape.from_config(model_dir)
    recipe_args = dict(method="qlora", rank=8, targets="qv", kernels="none", double_quant=False, paged_optimizer=False)
    short = predict_peak(shape, checkpoint_every=0, seq=64, batch=2, **recipe_args)["total"]
    two = predict_peak(shape, checkpoint_every=0, checkpointed_layers=2, seq=320, batch=2, **recipe_args)["total"]
    return (max(short, two) + 1) / 1024**3


@pytest.mark.parametrize("folded", [True, False], ids=["folded_dropout", "peft_dropout"])
def test_offloaded_layers_train_to_the_recomputed_numbers_bit_for_bit(three_layers, tmp_path, monkeypatch, folded):
    """The long batches recompute layers 0 and 1; offload_layers keeps layer 0 whole with its
    saved tensors sent away and back: the recomputing run's losses, gradient norms and token
    metrics step by step, every saved tensor of the layer sent, none left after the backward."""
    monkeypatch.setattr(layer_offload, "MIN_OFFLOAD_BYTES", 1)  # the tiny model's tensors are small
    settings = dict(gradient_checkpointing="auto", memory_budget_gib=long_batches_budget(three_layers))
    settings.update(logging_steps=1, recompute_lora_dropout=folded)
    offloaded, plan, trainer = train_tiny(three_layers, tmp_path / "a", LENGTHS, offload_layers=2, **settings)
    recomputed, stock_plan, _ = train_tiny(three_layers, tmp_path / "b", LENGTHS, **settings)
    assert stock_plan.summary() == {"0": 3, "2": 3} and stock_plan.offload is None
    # the long batches: layer 0 offloaded, layer 1 recomputed, layer 2 whole
    assert plan.summary() == {"0": 3, "1": 3}
    summary = plan.offload_summary()
    assert summary["steps_by_offloaded"] == {"0": 3, "1": 3} and summary["in_line_fetches"] == 0
    # the last step is a short batch (nothing offloaded); the one before it a long one
    assert summary["bytes_last_step"] > 0
    assert all(
        saved.host is None and saved.back is None for group in plan.offload.pending for saved in group.saved.values()
    )
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert len(offloaded) == len(recomputed) == 6
    for ours, theirs in zip(offloaded, recomputed, strict=True):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


def test_offload_layers_with_compile_stops_at_config_check():
    """The 7B config ships offload_layers 3: with compile it is named before any job (without the
    per-batch plan it has no effect, as offload_checkpoints without checkpointing)."""
    import yaml

    from config_check import ConfigError, validate_config

    config = yaml.safe_load((PROJECT / "config" / "llama2-7b.yaml").read_text())
    assert config["train"]["offload_layers"] == 3
    validate_config(config)
    config["train"].update(compile=True, kernels="none", cuda_graphs=False)
    with pytest.raises(ConfigError, match="config key 'train.offload_layers': not with train.compile"):
        validate_config(config)
    config["train"]["offload_layers"] = 0
    validate_config(config)
