"""Downstream tasks (evaluate.lm_eval) with lm-evaluation-harness: the offline WikiText task on
every model of the tiny run, the cross-check against the pipeline's own evaluator, the tables
and the report section, and the one-sentence failures for a bad task name or missing data."""

import math
import re

import pandas as pd
import pytest
import torch
import yaml

import downstream
import lm_eval_tasks
from config_check import ConfigError
from conftest import TINY_CONFIG, read_json, snakemake

METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def test_offline_task_runs_on_base_adapter_and_merged_models(pipeline_run, tiny_config):
    tables = {
        kind: sorted((pipeline_run / "downstream" / kind).glob("*.csv")) for kind in ("base", "adapter", "merged")
    }
    assert [len(tables[k]) for k in ("base", "adapter", "merged")] == [2, 4, 4]
    scores = pd.read_csv(pipeline_run / "tables" / "downstream.csv")
    assert len(scores) == 10 * len(METRICS) and set(scores.metric) == METRICS
    assert (scores.task == "wikitext_pipeline").all() and (scores.n_samples == 1).all()
    assert (scores.num_fewshot == 0).all() and (scores.fewshot_seed == 1234).all()
    word = scores[scores.metric == "word_perplexity"].set_index("model")
    assert word.value.between(1, 1e5).all()
    # Real scores: 4-bit quantisation moves the base's number, training moves the adapters'.
    assert word.loc["base-4bit-nf4-dq0", "value"] != pytest.approx(word.loc["base-16bit", "value"], rel=1e-4)
    assert word[word.model_kind == "adapter"].value.nunique() == 4
    # Every job has its manifest and lm-eval's own record of configs, versions and seeds.
    for path in tables["adapter"]:
        manifest = read_json(path.with_suffix(".provenance.json"))
        assert manifest["rule"] == "downstream_adapter" and manifest["max_length"] == 64
        assert any(key.endswith("data/wikitext.txt") for key in manifest["inputs"])
        record = read_json(path.with_suffix(".json"))["wikitext_pipeline"]
        assert record["config"]["fewshot_seed"] == 1234 and "lm_eval_version" in record


def test_lora_minus_qlora_table_figure_and_report(pipeline_run):
    diff = pd.read_csv(pipeline_run / "tables" / "downstream_diff.csv")
    # 2 learning rates x adapter/merged x 3 metrics, one seed each (no interval).
    assert len(diff) == 2 * 2 * len(METRICS) and (diff.seeds == 1).all() and diff.diff_ci95.isna().all()
    scores = pd.read_csv(pipeline_run / "tables" / "downstream.csv")
    row = diff[(diff.model_kind == "merged") & (diff.metric == "word_perplexity")].iloc[0]
    pick = scores[(scores.model_kind == "merged") & (scores.metric == "word_perplexity")]
    pick = pick[pick.learning_rate == row.learning_rate].set_index("method").value
    assert row.diff_mean == pytest.approx(pick["lora"] - pick["qlora"])
    assert (pipeline_run / "figures" / "downstream.png").stat().st_size > 5000
    page = (pipeline_run / "report" / "report.html").read_text()
    assert "id='downstream'" in page and 'id="downstream-diff"' in page and 'id="figure-downstream"' in page


def test_lm_eval_and_the_pipeline_evaluator_agree(pipeline_run, tiny_config):
    """Same text, same windows: the log-likelihood lm-eval computed in the base-16bit job (its
    word perplexity over the text's words) = the pipeline's own evaluator's total NLL."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = pipeline_run / "model" / "base"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_length = tiny_config["evaluate"]["lm_eval"]["max_length"]
    text = (pipeline_run / "data" / "wikitext.txt").read_text()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length)  # its tokens and prefix, no scoring
    ids = lm.tok_encode(text)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids  # the pipeline's tokenisation
    assert len(ids) > 4 * max_length and len(ids) % max_length  # several windows and a partial last one

    scores = pd.read_csv(pipeline_run / "downstream" / "base" / "base-16bit.csv").set_index("metric")
    words = len(re.split(r"\s+", text))  # lm-eval's word count of the document
    loglikelihood = -math.log(scores.loc["word_perplexity", "value"]) * words
    total, scored = downstream.pipeline_nll_on_lm_eval_windows(model, ids, max_length, lm.prefix_token_id)
    assert scored == len(ids)
    assert total == pytest.approx(-loglikelihood, rel=1e-4)
    print(
        f"\nlm-eval total NLL {-loglikelihood:.6f}, pipeline {total:.6f}, rel {abs(total + loglikelihood) / total:.2e}"
    )


def _config_with(tmp_path, **lm_eval) -> tuple:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["evaluate"]["lm_eval"] = {**config["evaluate"]["lm_eval"], **lm_eval}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, path


def test_a_bad_task_name_stops_the_run_before_any_job(tmp_path):
    _, path = _config_with(tmp_path, tasks=[{"name": "wikitext_pipline"}])
    result = snakemake("-n", config=path, results_dir=tmp_path / "results", check=False)
    assert result.returncode != 0
    message = (
        "Invalid configuration: config key 'evaluate.lm_eval.tasks[0].name': lm-eval has no task "
        "'wikitext_pipline' (neither in tasks/ nor among lm-eval's own tasks)"
    )
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_a_task_without_data_stops_with_one_sentence(tmp_path):
    """At config check (the Hub is forbidden, no mirror) and at the start of a job, before the model."""
    config, _ = _config_with(tmp_path, tasks=[{"name": "arc_challenge", "num_fewshot": 0, "limit": 2}])
    config["data"]["hub_access"] = "mirror"
    with pytest.raises(ConfigError) as stopped:
        lm_eval_tasks.check_config(config)
    assert str(stopped.value) == (
        "config key 'evaluate.lm_eval.tasks[0].name': lm-eval task 'arc_challenge': data set allenai/ai2_arc "
        "has no data.mirror entry and data.hub_access is mirror (add a mirror entry or allow the Hub)"
    )
    # A mirror entry whose file is gone: the job stops before it looks at the (absent) model.
    config["data"]["mirror"].append(
        {"hub_id": "allenai/ai2_arc", "path": str(tmp_path / "arc.parquet"), "sha256": "0" * 64}
    )
    with pytest.raises(SystemExit) as job:
        downstream.cli_main(config, tmp_path / "no-model", tmp_path / "no-data", tmp_path / "out")
    assert (
        str(job.value)
        == f"lm-eval task 'arc_challenge': the data.mirror copy {tmp_path / 'arc.parquet'} of data set allenai/ai2_arc does not exist"
    )
    assert not (tmp_path / "out").exists()


def test_a_mirrored_hub_task_reads_the_local_copy(tiny_config):
    """data.mirror stands in for a task's Hub data set: the builder of the file, its sha256 checked."""
    wikitext_mirror = next(e for e in tiny_config["data"]["mirror"] if e["hub_id"] == "Salesforce/wikitext")
    task = {"task": "wikitext_hub", "dataset_path": "Salesforce/wikitext", "test_split": "test"}
    patched = lm_eval_tasks._with_mirror(task, wikitext_mirror)
    assert patched["dataset_path"] == "text" and patched["dataset_kwargs"]["sample_by"] == "document"
    assert patched["dataset_kwargs"]["data_files"]["test"].endswith("wiki.test.raw")
    with pytest.raises(lm_eval_tasks.TaskDataError, match="sha256"):
        lm_eval_tasks._with_mirror(task, {**wikitext_mirror, "sha256": "0" * 64})
