"""Merge and evaluation: verified merges, independent perplexity check, the perplexity table."""

import json
import math
import shutil

import pandas as pd
import pytest
import torch

import evaluate
import merge
from conftest import read_json

SHORT_TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day in the small town of Elm."


def plain_loop_nll(model, ids: list[int]) -> tuple[float, int]:
    """Independent reference: score each token from its full prefix, one forward per token."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            logits = model(torch.tensor([ids[:t]])).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, dim=-1)[ids[t]])
    return total, len(ids) - 1


@pytest.fixture(scope="module")
def base(base_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base_model_dir)


def test_sliding_window_agrees_with_a_plain_token_loop(base):
    model, tokenizer = base
    ids = tokenizer(SHORT_TEXT, add_special_tokens=False).input_ids
    reference, count = plain_loop_nll(model, ids)
    total, scored = evaluate.sliding_window_nll(model, ids, context=len(ids), stride=7)
    assert scored == count == len(ids) - 1
    assert math.exp(total / scored) == pytest.approx(math.exp(reference / count), rel=1e-4)
    # A shorter window scores every token exactly once, with less context.
    _, scored_short = evaluate.sliding_window_nll(model, ids, context=8, stride=4)
    assert scored_short == len(ids) - 1


def test_batched_chat_perplexity_masks_padding(base):
    model, tokenizer = base
    turns = [[["Hi there", "Hello! How can I help?"]], [["Name a colour.", "Blue."], ["Another?", "Red."]]]
    from prepare_data import render

    examples = [{"text": render(t, "llama2", tokenizer), "turns": t} for t in turns]
    results = evaluate.chat_perplexity(model, tokenizer, examples, max_length=128, batch_size=2)
    reference = [plain_loop_nll(model, tokenizer(e["text"]).input_ids) for e in examples]
    total, count = sum(r[0] for r in reference), sum(r[1] for r in reference)
    assert results["eval_chat"][1] == count
    assert math.exp(results["eval_chat"][0] / results["eval_chat"][1]) == pytest.approx(
        math.exp(total / count), rel=1e-4
    )
    assistant_total, assistant_count = results["eval_chat_assistant"]
    assert 0 < assistant_count < count


def test_assistant_spans_include_the_eos():
    text = "<s>[INST] q [/INST] answer one </s><s>[INST] q2 [/INST] answer two </s>"
    spans = evaluate.assistant_spans(text, [("q", "answer one"), ("q2", "answer two")], "</s>")
    assert [text[s:e] for s, e in spans] == ["answer one </s>", "answer two </s>"]


def test_merge_checks_pass_and_merged_models_load(pipeline_run, tiny_config):
    from transformers import AutoModelForCausalLM

    checks = [read_json(p) for p in sorted((pipeline_run / "merged").glob("*/merge_check.json"))]
    assert len(checks) == 4
    for check in checks:
        assert check["passed"] and check["max_abs_logit_diff"] <= tiny_config["merge"]["max_abs_logit_diff"]
        assert check["lora_tensors_verified"] > 0
        if check["method"] == "qlora":
            assert math.isfinite(check["adapter_on_4bit_ppl"]) and "merge_gap_rel_ppl" in check
    merged = next((pipeline_run / "merged").glob("*/model"))
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())


def _corrupt(adapter_src, tmp_path, how):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_src, adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    if how == "nan":
        key = next(k for k in weights if "lora_B" in k)
        weights[key] = torch.full_like(weights[key], float("nan"))
    else:  # keys PEFT does not recognise: the adapter would silently not be applied
        weights = {k.replace("lora_B", "lora_X"): v for k, v in weights.items()}
    save_file(weights, adapter / "adapter_model.safetensors")
    return adapter


@pytest.mark.parametrize("how, message", [("nan", "merge check failed"), ("renamed", "not loaded")])
def test_merge_fails_clearly_on_a_corrupted_adapter(pipeline_run, tiny_config, tmp_path, how, message):
    cell_dir = next(p for p in (pipeline_run / "train").iterdir() if "method~lora" in p.name)
    adapter = _corrupt(cell_dir / "adapter", tmp_path, how)
    cell = {"method": "lora", "quant_type": "none", "double_quant": False}
    with pytest.raises(merge.MergeCheckError, match=message):
        merge.main(
            pipeline_run / "model" / "base",
            adapter,
            pipeline_run / "data" / "eval_chat.jsonl",
            cell,
            tiny_config["merge"],
            64,
            tmp_path / "merged",
            tmp_path / "check.json",
        )
    assert not (tmp_path / "merged").exists()


def test_perplexity_table_covers_every_model(pipeline_run):
    table = pd.read_csv(pipeline_run / "tables" / "perplexity.csv")
    kinds = table.groupby("model_kind")["model"].nunique().to_dict()
    assert kinds == {"base": 2, "adapter": 4, "merged": 4}
    assert set(table.dataset) == {"eval_chat", "eval_chat_assistant", "wikitext"}
    assert len(table) == 10 * 3
    assert (table.tokens > 0).all() and table.perplexity.between(1, 1e5).all()
    assert set(table[table.model_kind != "base"].seed) == {1}
    base = table[(table.model_kind == "base") & (table.dataset == "wikitext")].set_index("precision").perplexity
    assert base["4bit"] != base["16bit"]  # re-quantising to NF4 changes the model


def test_samples_for_base_and_merged(pipeline_run, tiny_config):
    for path in [
        *(pipeline_run / "samples" / "base").glob("*.jsonl"),
        *(pipeline_run / "samples" / "merged").glob("*.jsonl"),
    ]:
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        assert [s["prompt"] for s in samples] == tiny_config["evaluate"]["sample_prompts"]
        assert all(isinstance(s["completion"], str) for s in samples)
