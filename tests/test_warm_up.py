"""train.warm_up_beside_load (scripts/warm_up.py): the GPU libraries' first calls on a thread while
the model loads. On a GPU every library the run uses is called before training, and a run with it
trains to the numbers of one without (it draws no random numbers). On a CPU it does nothing and
says so."""

import pytest
import torch

import recipe
import warm_up
from test_recipe import CELL, LENGTHS, LOGGER, TRAIN, train_tiny

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the libraries' first calls need a CUDA GPU")
LIGER = dict(kernels="liger", dequantize="triton", optimizer="adamw_torch_fused", compute_dtype="bfloat16")


def keep_llama_module(monkeypatch) -> None:
    """Liger patches transformers' Llama module itself: put it back after the test."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_without_a_gpu_the_model_is_prepared_without_it_and_the_details_say_why(tiny_model):
    train = dict(TRAIN, warm_up_beside_load=True)
    _, details = recipe.prepare_model(tiny_model, CELL, train, tiny_model / "adapter", 64, LOGGER)
    assert details["warm_up"] == {"ran": False, "reason": "no CUDA device"}
    _, details = recipe.prepare_model(tiny_model, CELL, dict(TRAIN), tiny_model / "adapter", 64, LOGGER)
    assert details["warm_up"] is None  # off by default


@on_gpu
def test_every_library_the_run_uses_is_called_before_training(tiny_model, monkeypatch):
    keep_llama_module(monkeypatch)
    train = dict(TRAIN, warm_up_beside_load=True, **LIGER)
    _, details = recipe.prepare_model(tiny_model, CELL, train, tiny_model / "adapter", 64, LOGGER)
    summary = details["warm_up"]
    assert summary["ran"] and summary["error"] is None
    assert list(summary["seconds"]) == ["cublas", "attention", "nf4_dequantize", "liger", "adamw_fused"]
    plain = warm_up.LibraryWarmUp(tiny_model, "none", False, False, (2, 64), torch.bfloat16).start().join()
    assert list(plain["seconds"]) == ["cublas", "attention"]  # only what that run uses


@on_gpu
def test_a_run_with_the_warm_up_trains_as_one_without(tiny_model, tmp_path, monkeypatch):
    """The same losses bit for bit over 6 steps with dropout: the thread draws no random numbers."""
    keep_llama_module(monkeypatch)
    warmed, _, _ = train_tiny(tiny_model, tmp_path / "on", LENGTHS, warm_up_beside_load=True, **LIGER)
    cold, _, _ = train_tiny(tiny_model, tmp_path / "off", LENGTHS, warm_up_beside_load=False, **LIGER)
    assert [h["loss"] for h in warmed] == [h["loss"] for h in cold]
    assert [h["grad_norm"] for h in warmed] == [h["grad_norm"] for h in cold]
