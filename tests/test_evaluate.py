"""Merge and evaluation: verified merges, independent perplexity check, the perplexity table."""

import json
import math
import shutil

import pandas as pd
import pytest
import torch

import merge
import perplexity
from conftest import TINY_CONFIG, read_json

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
    total, scored = perplexity.sliding_window_nll(model, ids, context=len(ids), stride=7)
    assert scored == count == len(ids) - 1
    assert math.exp(total / scored) == pytest.approx(math.exp(reference / count), rel=1e-4)
    # A shorter window scores every token exactly once, with less context.
    _, scored_short = perplexity.sliding_window_nll(model, ids, context=8, stride=4)
    assert scored_short == len(ids) - 1


def test_batched_chat_perplexity_masks_padding(base):
    model, tokenizer = base
    turns = [[["Hi there", "Hello! How can I help?"]], [["Name a colour.", "Blue."], ["Another?", "Red."]]]
    from prepare_data import render

    examples = [{"text": render(t, "llama2", tokenizer), "turns": t} for t in turns]
    results = perplexity.chat_perplexity(model, tokenizer, examples, max_length=128, batch_size=2)
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
    spans = perplexity.assistant_spans(text, [("q", "answer one"), ("q2", "answer two")], "</s>")
    assert [text[s:e] for s, e in spans] == ["answer one </s>", "answer two </s>"]


def test_merge_checks_pass_and_merged_models_load(pipeline_run, tiny_config):
    from transformers import AutoModelForCausalLM

    checks = [read_json(p) for p in sorted((pipeline_run / "merged").glob("*/merge_check.json"))]
    assert len(checks) == 4
    for check in checks:
        assert check["passed"] and not check["failures"]
        assert check["max_abs_logit_diff"] <= check["tolerance"]["max_abs_logit_diff"]
        assert check["fold_error_share"] <= tiny_config["merge"]["max_fold_error_share"]
        assert check["adapter_effect_mean_abs_logit_diff"] > 0.01  # the adapters moved the model
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


@pytest.mark.parametrize("how, message", [("nan", "non-finite values"), ("renamed", "not loaded")])
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


def lora_cell_dir(results):
    return next(p for p in sorted((results / "train").iterdir()) if "method~lora" in p.name and "0.001" in p.name)


def run_merge(results, merge_config, out, adapter=None):
    cell = {"method": "lora", "quant_type": "none", "double_quant": False}
    return merge.main(
        results / "model" / "base",
        adapter or lora_cell_dir(results) / "adapter",
        results / "data" / "eval_chat.jsonl",
        cell,
        merge_config,
        64,
        out / "merged",
        out / "check.json",
    )


def test_a_bf16_merge_passes_on_the_cpu_against_its_precision_floor(pipeline_run, tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    check = run_merge(pipeline_run, dict(tiny_config["merge"], dtype="bfloat16"), tmp_path)
    assert check["passed"] and check["dtype"] == "bfloat16"
    floor = check["precision_floor_max_abs_logit_diff"]
    assert floor > 1e-3  # bf16 really rounds: the check is not comparing float32 with itself
    assert check["max_abs_logit_diff"] <= tiny_config["merge"]["precision_floor_factor"] * floor
    assert check["fold_mean_abs_logit_diff"] < 1e-4  # the fold itself is float32
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}


def broken_fold(defect: str):
    """A merge with one planted defect, on the LoRA layer that moves the weights most."""
    from peft.tuners.lora import LoraLayer

    def fold(peft_model):
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        layer = max(layers, key=lambda m: float(m.get_delta_weight("default").norm()))
        name = next(n for n, m in peft_model.named_modules() if m is layer)
        delta = layer.get_delta_weight("default").detach().clone()
        if defect == "no-op":
            return peft_model.unload()
        merged = peft_model.merge_and_unload()
        weight = merged.get_submodule(name.removeprefix("base_model.model.")).weight
        with torch.no_grad():
            if defect == "doubled":
                weight += delta  # that layer's LoRA product counted twice
            elif defect == "missing":
                weight -= delta  # that layer left out of the merge
            elif defect == "nan":
                weight[0, 0] = float("nan")
        return merged

    return fold


@pytest.mark.parametrize(
    "defect, message",
    [
        ("no-op", "adapter's own effect"),
        ("doubled", "part of the adapter is missing, doubled or not merged"),
        ("missing", "part of the adapter is missing, doubled or not merged"),
        ("nan", "non-finite values"),
    ],
)
def test_planted_merge_defects_fail_and_are_named(pipeline_run, tiny_config, tmp_path, monkeypatch, defect, message):
    monkeypatch.setattr(merge, "fold_adapter", broken_fold(defect))
    with pytest.raises(merge.MergeCheckError, match=message):  # the fold is judged in float32 whatever the dtype
        run_merge(pipeline_run, tiny_config["merge"], tmp_path)
    check = read_json(tmp_path / "check.json")
    assert not check["passed"] and not (tmp_path / "merged").exists()


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


def whitespace_tokenizer(words: list[str]):
    """A tokenizer whose tokens carry no leading space (offsets start at the word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", *sorted(set(words))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


@pytest.mark.parametrize("leading_space", [True, False])
def test_the_first_answer_token_is_an_answer_token(base, leading_space):
    text = "[INST] Name a colour. [/INST] Blue sky </s>"
    spans = perplexity.assistant_spans(text, [("Name a colour.", "Blue sky")], "</s>")
    tokenizer = base[1] if leading_space else whitespace_tokenizer(text.split())
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    tokens = [text[s:e] for s, e in offsets]
    answer = [t for t, keep in zip(tokens, perplexity.answer_token_mask(offsets, spans), strict=True) if keep]
    first = " Blue" if leading_space else "Blue"
    assert first in tokens  # the two tokenizers really differ in where a word's token starts
    assert answer[0] == first and [t.strip() for t in answer[:2]] == ["Blue", "sky"]
    assert not any("INST" in t for t in answer)


def test_per_example_nll_adds_up_and_windows_batch(base):
    model, tokenizer = base
    from prepare_data import render

    turns = [[["Hi there", "Hello! How can I help?"]], [["Name a colour.", "Blue."], ["Another?", "Red."]]]
    examples = [{"text": render(t, "llama2", tokenizer), "turns": t} for t in turns]
    records: list = []
    totals = perplexity.chat_perplexity(model, tokenizer, examples, max_length=128, batch_size=1, records=records)
    for dataset, (total, count) in totals.items():
        mine = [r for r in records if r[0] == dataset]
        assert [r[1] for r in mine] == [0, 1]
        assert sum(r[2] for r in mine) == count and sum(r[3] for r in mine) == pytest.approx(total, rel=1e-6)
    ids = tokenizer(SHORT_TEXT * 3, add_special_tokens=False).input_ids
    one = perplexity.sliding_window_nll(model, ids, context=16, stride=8, batch_size=1)
    batched = perplexity.sliding_window_nll(model, ids, context=16, stride=8, batch_size=4)
    assert batched[1] == one[1] == len(ids) - 1
    assert batched[0] == pytest.approx(one[0], rel=1e-5)


def test_command_line_scores_the_base_as_its_job_did(pipeline_run, tmp_path, monkeypatch):
    """perplexity.py's command line: its three files in --out-dir (none beside it), and the same
    numbers as the tiny run's job on the same model and data."""
    import runpy
    import sys

    out = tmp_path / "out"
    argv = ["perplexity.py", "--config", str(TINY_CONFIG)]
    argv += ["--model-dir", str(pipeline_run / "model" / "base"), "--data-dir", str(pipeline_run / "data")]
    monkeypatch.setattr(sys, "argv", argv + ["--out-dir", str(out)])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(perplexity.__file__, run_name="__main__")
    assert sorted(path.name for path in tmp_path.rglob("*")) == sorted(
        ["out", "perplexity.csv", "perplexity.examples.csv", "samples.jsonl"]
    )
    columns = ["dataset", "tokens", "nll"]
    cli = pd.read_csv(out / "perplexity.csv")[columns]
    job = pd.read_csv(pipeline_run / "eval" / "base" / "base-16bit.csv")[columns]
    pd.testing.assert_frame_equal(cli, job, rtol=1e-6)
