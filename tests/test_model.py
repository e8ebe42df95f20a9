"""Base-model stage: the converted SmolLM2 folder is a plain model with the GGUF's logits, and
the conversion cache hands later runs the same files."""

import logging
import shutil

import pytest
import torch

import fetch_model
from conftest import read_json

LOGGER = logging.getLogger("test_model")


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
    # the session's cache (conftest.conversion_cache): stored by the session's first conversion
    assert provenance["conversion_cache"]["status"] in ("stored", "hit")


def test_a_cached_conversion_gives_the_converted_files(pipeline_run, tmp_path, conversion_cache):
    converted = read_json(pipeline_run / "model" / "base.provenance.json")
    fetch_model.main("offline_smollm2", tmp_path / "out", tmp_path / "p.json")
    copied = read_json(tmp_path / "p.json")
    assert copied["conversion_cache"] == {"status": "hit", "entry": converted["conversion_cache"]["entry"]}
    assert copied["conversion_cache"]["entry"].startswith(str(conversion_cache))
    assert copied["files"] == converted["files"]  # the same bytes, the pad-token fix included
    assert copied["gguf_sha256"] == converted["gguf_sha256"] and copied["weights_note"] == converted["weights_note"]


def test_a_damaged_cache_entry_is_named_and_not_used(pipeline_run, tmp_path, monkeypatch, caplog):
    entry = tmp_path / "cache" / "offline_smollm2" / "damaged"
    shutil.copytree(read_json(pipeline_run / "model" / "base.provenance.json")["conversion_cache"]["entry"], entry)
    assert fetch_model.cache_entry_intact(entry) is None
    config = (entry / "config.json").read_bytes()
    (entry / "config.json").write_bytes(config.replace(b"576", b"577"))
    assert fetch_model.cache_entry_intact(entry) == "config.json does not match its recorded sha256"
    (entry / "config.json").write_bytes(config)
    (entry / "tokenizer.json").unlink()
    problem = fetch_model.cache_entry_intact(entry)
    assert problem.startswith("it holds [") and "where" in problem and "'tokenizer.json'" in problem

    # convert_gguf_cached converts again instead of copying it (stopped where the conversion starts)
    def conversion(*args):
        raise RuntimeError("converting")

    monkeypatch.setattr(fetch_model, "conversion_key", lambda digest: "damaged")
    monkeypatch.setattr(fetch_model, "convert_gguf", conversion)
    with pytest.raises(RuntimeError, match="converting"):
        fetch_model.convert_gguf_cached(fetch_model.smollm2_gguf_path(), tmp_path / "out", LOGGER, tmp_path / "cache")
    assert not entry.exists() and not (tmp_path / "out").exists()
    assert f"conversion cache entry {entry} is damaged (it holds" in caplog.text
    monkeypatch.setenv("QLORA_SNAKEMAKE_CACHE", "off")
    assert fetch_model.conversion_cache_root() is None
    monkeypatch.setenv("QLORA_SNAKEMAKE_CACHE", str(tmp_path / "cache"))
    assert fetch_model.conversion_cache_root() == tmp_path / "cache"


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


def test_a_run_beside_a_conversion_waits_for_its_entry(tmp_path, monkeypatch, caplog):
    """While another run holds an entry's lock (converting), a second run waits, then copies the
    entry that run stored instead of converting it again."""
    import fcntl
    import threading

    entry = tmp_path / "cache" / "offline_smollm2" / "shared"
    monkeypatch.setattr(fetch_model, "conversion_key", lambda digest: "shared")
    monkeypatch.setattr(fetch_model, "convert_gguf", lambda *args: pytest.fail("converted a second time"))
    entry.parent.mkdir(parents=True)
    (tmp_path / "out").mkdir()  # fetch_model.main makes the stage's folder first
    results = []
    with open(entry.parent / "shared.lock", "w") as converting:
        fcntl.flock(converting, fcntl.LOCK_EX)  # the first run, mid-conversion
        beside = threading.Thread(
            target=lambda: results.append(
                fetch_model.convert_gguf_cached(
                    fetch_model.smollm2_gguf_path(), tmp_path / "out", LOGGER, tmp_path / "cache"
                )
            )
        )
        with caplog.at_level("INFO"):
            beside.start()
            beside.join(timeout=3)
            assert beside.is_alive() and not results  # waiting, not converting
            # the first run stores its entry (a stand-in folder: the cache copies files) and lets go
            converted = tmp_path / "converted"
            converted.mkdir()
            (converted / "config.json").write_text('{"model_type": "llama"}')
            fetch_model.store_in_cache(converted, entry, {"source": "the first run"})
            fcntl.flock(converting, fcntl.LOCK_UN)
            beside.join(timeout=60)
    assert results and results[0] == {
        "source": "the first run",
        "conversion_cache": {"status": "hit", "entry": str(entry)},
    }
    assert f"another run is converting into the cache: waiting for its entry {entry}" in caplog.text
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "llama"}'
