"""Data stage: real files in, clear errors with row numbers for bad rows, EOS kept in labels."""

import json

import pandas as pd
import pytest

import fetch_data
import prepare_data
from conftest import SHARED_DATA, read_json

GOOD = "<s>[INST] What is 2+2? [/INST] 4. </s>"


def fetch(tmp_path, path, text_field="text", markup="llama2_inst"):
    source = {
        "hub_id": None,
        "revision": "main",
        "split": "train",
        "local_path": str(path),
        "text_field": text_field,
        "markup": markup,
    }
    out = tmp_path / "rows.jsonl"
    fetch_data.main("train", source, [], "mirror", out, tmp_path / "prov.json")
    return prepare_data.read_jsonl(out)


def parse(rows, markup="llama2_inst", on_invalid="fail"):
    import logging

    return prepare_data.parse_rows(rows, markup, on_invalid, "train", logging.getLogger("test"))


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"prompt": [GOOD]}).to_parquet(path)
    with pytest.raises(fetch_data.DataSourceError, match="no column 'text'.*columns: \\['prompt'\\]"):
        fetch(tmp_path, path)


def test_empty_and_missing_text_rows_are_listed(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": GOOD}, {"text": ""}, {"text": GOOD}, {"text": None}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(prepare_data.InvalidRowsError) as raised:
        parse(fetch(tmp_path, path))
    message = str(raised.value)
    assert "empty text: rows [1, 4]" in message
    assert "missing text: rows [3]" in message


def test_broken_markers_are_listed_by_row(tmp_path):
    path = tmp_path / "data.csv"
    texts = [
        GOOD,
        "<s>[INST] no closing marker, answer </s>",  # no [/INST]
        "<s>[INST] q [/INST] a </s><s>[INST] q2 [/INST] a2",  # second turn never closed
        "[INST] q [/INST] a </s>",  # no <s>
        "<s>[INST] q [INST] [/INST] a </s>",  # nested marker
        "<s>[INST]  [/INST] a </s>",  # empty user turn
    ]
    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    with pytest.raises(prepare_data.InvalidRowsError) as raised:
        parse(fetch(tmp_path, path))
    message = str(raised.value)
    assert "structure at character 0: rows [1, 3]" in message
    assert "rows [2]" in message and "(a marker inside a turn): rows [4]" in message
    assert "empty user or assistant turn: rows [5]" in message


def test_undecodable_text_is_reported_with_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(fetch_data.DataSourceError, match=r"undecodable .* rows \[1\]"):
        fetch(tmp_path, path)
    with pytest.raises(prepare_data.InvalidRowsError, match=r"undecodable text .*: rows \[0\]"):
        parse([{"row": 0, "text": "caf\ufffd"}])


def test_drop_mode_counts_what_it_drops():
    rows = [{"row": 0, "text": GOOD}, {"row": 1, "text": ""}, {"row": 2, "text": "<s>[INST] x </s>"}]
    kept, problems = parse(rows, on_invalid="drop")
    assert [r["row"] for r in kept] == [0]
    assert sum(problems.values()) == 2


def test_human_assistant_turns_and_unanswered_last_prompt():
    turns = prepare_data.parse_human_assistant("### Human: hi### Assistant: hello### Human: bye?")
    assert turns == [("hi", "hello")]
    with pytest.raises(prepare_data.RowProblem):
        prepare_data.parse_human_assistant("### Assistant: nobody asked")


def test_real_guanaco_multiturn_row_parses():
    table = pd.read_parquet(SHARED_DATA / "guanaco-llama2-1k-train.parquet")
    multi = table.text[table.text.str.count(r"\[INST\]") == 3].iloc[0]
    turns = prepare_data.parse_llama2_inst(multi)
    assert len(turns) == 3 and all(u and a for u, a in turns)


def test_mirror_with_wrong_sha256_stops(tmp_path):
    source = {
        "hub_id": "mlabonne/guanaco-llama2-1k",
        "revision": "main",
        "split": "train",
        "local_path": None,
        "text_field": "text",
        "markup": "llama2_inst",
    }
    mirror = [
        {
            "hub_id": "mlabonne/guanaco-llama2-1k",
            "path": str(SHARED_DATA / "guanaco-llama2-1k-train.parquet"),
            "sha256": "0" * 64,
        }
    ]
    with pytest.raises(fetch_data.DataSourceError, match="sha256 .* != expected 0000"):
        fetch_data.main("train", source, mirror, "mirror", tmp_path / "rows.jsonl", tmp_path / "prov.json")


def test_pipeline_data_stage_used_the_verified_mirror(pipeline_run, tiny_config):
    provenance = read_json(pipeline_run / "data" / "raw" / "train.provenance.json")
    assert provenance["origin"] == "mirror"
    assert provenance["sha256"] == tiny_config["data"]["mirror"][0]["sha256"]
    assert provenance["rows"] == 1000
    stats = read_json(pipeline_run / "data" / "stats.json")
    assert stats["train"]["rows"] == tiny_config["data"]["train"]["max_rows"]
    assert stats["train"]["invalid_rows"] == {"empty user or assistant turn": 3}  # rows 434, 510, 899
    assert stats["eval_chat"]["rows"] == tiny_config["data"]["eval_chat"]["max_rows"]
    assert 0 < stats["train"]["share_truncated"] <= 1
    assert stats["wikitext"]["tokens"] >= tiny_config["data"]["wikitext"]["max_tokens"]


def test_eos_survives_in_the_labels(pipeline_run, base_model_dir):
    """A formatted example, tokenised and collated exactly as SFTTrainer does, ends in a labelled EOS."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    short, long = sorted(prepare_data.read_jsonl(pipeline_run / "data" / "train.jsonl"), key=lambda r: len(r["text"]))[
        :2
    ]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"input_ids": tokenizer(r["text"]).input_ids} for r in (short, long)])
    labels = batch["labels"][0]
    last_label = labels[labels != -100][-1]
    assert last_label.item() == tokenizer.eos_token_id
    assert (batch["labels"][0] == -100).sum() > 0  # the shorter row was padded, and padding is not learnt


def test_chat_template_format_ends_with_eos(base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    text = prepare_data.render([("hi", "hello")], "chat_template", tokenizer)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith(tokenizer.eos_token)
    llama2 = prepare_data.render([("hi", "hello"), ("more", "sure")], "llama2", tokenizer)
    assert llama2.count("[INST]") == 2 and llama2.endswith(" " + tokenizer.eos_token)


def test_an_unparseable_json_line_is_named_in_one_sentence(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(fetch_data.DataSourceError, match=r"data.jsonl: line 3 is not valid JSON \(") as raised:
        fetch(tmp_path, path)
    assert "\n" not in str(raised.value)
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(fetch_data.DataSourceError, match="line 2 is not a JSON object"):
        fetch(tmp_path, path)


def test_p95_is_a_standard_percentile():
    # Two rows of 24 and 38 tokens: floor nearest rank gave 24, below the median.
    stats = prepare_data.length_stats([24, 38], None)
    assert stats["median"] == 31
    assert stats["p95"] == pytest.approx(37.3)
    assert prepare_data.length_stats(list(range(1, 101)), None)["p95"] == pytest.approx(95.05)
