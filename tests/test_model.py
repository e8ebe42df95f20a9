"""Base-model stage: the converted SmolLM2 folder is a plain model with the GGUF's logits."""

import torch

import fetch_model
from conftest import read_json


def test_converted_model_keeps_the_gguf_logits(base_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tokenizer = fetch_model.load_gguf_model(fetch_model.smollm2_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)  # vanilla loading, no gguf_file
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        expected = gguf_model(ids).logits
        got = model(ids).logits
    assert torch.equal(expected, got)
    assert (
        tokenizer.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :])
        .strip()
        .startswith("Paris")
    )


def test_provenance_says_dequantised_q4_1(pipeline_run):
    provenance = read_json(pipeline_run / "model" / "base.provenance.json")
    assert provenance["source"] == "offline_smollm2"
    assert "dequantised Q4_1" in provenance["weights_note"] and "NOT the original bf16" in provenance["weights_note"]
    assert len(provenance["gguf_sha256"]) == 64
    assert provenance["tokenizer"]["pad_token_id"] != provenance["tokenizer"]["eos_token_id"]
    assert "model.safetensors" in provenance["files"]


def test_local_source_copies_a_model_folder(tmp_path, base_model_dir):
    out = tmp_path / "copy"
    fetch_model.main("local", out, tmp_path / "p.json", local_path=base_model_dir)
    assert (out / "config.json").read_text() == (base_model_dir / "config.json").read_text()
    assert read_json(tmp_path / "p.json")["source"] == "local"


def test_local_source_without_config_fails_clearly(tmp_path):
    import pytest

    (tmp_path / "empty").mkdir()
    with pytest.raises(fetch_model.ModelSourceError, match="no config.json"):
        fetch_model.main("local", tmp_path / "out", tmp_path / "p.json", local_path=tmp_path / "empty")
