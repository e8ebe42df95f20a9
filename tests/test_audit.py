"""Manifests and the audit, on the real tiny run: every artifact has a manifest whose hashes
chain to the manifests upstream; `make audit` passes on the run and, on a copy with one
file tampered with, fails naming that file."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import audit
import tokenizer_audit
from conftest import PROJECT, TINY_CONFIG, read_json

NOT_ARTIFACTS = ("logs/", "checkpoints/")


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a results folder made of hard links (instant, no extra disk); break a link before editing."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (hard-linked) file's content without touching the original run's file."""
    path.unlink()
    path.write_bytes(data)


def make_audit(results: Path, config: Path = TINY_CONFIG) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "audit", f"RESULTS={results}", f"CONFIG={config}"]
    command.append(f"PYTHON_BIN={sys.executable}")
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)


def cells(results: Path) -> list[str]:
    return sorted(p.name for p in (results / "train").iterdir() if p.is_dir())


def test_every_artifact_has_a_manifest(pipeline_run, tiny_config):
    manifests = {p: read_json(p) for p in pipeline_run.rglob("*.provenance.json")}
    recorded = set()
    for path, manifest in manifests.items():
        for key in ("inputs", "outputs", "params", "code", "versions", "hardware", "seeds", "hub_revisions"):
            assert key in manifest, (path, key)
        assert manifest["started_utc"] <= manifest["finished_utc"]
        assert manifest["hardware"]["gpu_driver"] is None and manifest["hardware"]["gpu_name"] is None  # CPU run
        if manifest["rule"] not in ("fetch_data", "fetch_model"):  # those may run before the others fetched
            assert manifest["hub_revisions"]["data"]["train"]["sha256"] == tiny_config["data"]["mirror"][0]["sha256"]
            assert manifest["hub_revisions"]["model"]["gguf_sha256"]
        recorded |= set(manifest["outputs"])
    files = {
        p.relative_to(pipeline_run).as_posix()
        for p in pipeline_run.rglob("*")
        if p.is_file() and not p.name.endswith(".provenance.json") and p.name != ".snakemake_timestamp"
    }
    assert files - recorded == {f for f in files if f.startswith(NOT_ARTIFACTS)}
    # Folders are hashed file by file, and the hashes are the files' own.
    train = read_json(next((pipeline_run / "train").glob("*/train.provenance.json")))
    weights = [p for p in train["outputs"] if p.endswith("adapter/adapter_model.safetensors")]
    assert len(weights) == 1
    assert train["outputs"][weights[0]]["sha256"] == audit.sha256_file(pipeline_run / weights[0])
    assert train["seeds"] == {"cell.seed": 1}
    assert train["params"]["train"] == tiny_config["train"]
    assert (
        train["inputs"]["data/train.jsonl"]["sha256"]
        == read_json(pipeline_run / "data" / "prepare_data.provenance.json")["outputs"]["data/train.jsonl"]["sha256"]
    )
    assert read_json(pipeline_run / "data" / "prepare_data.provenance.json")["seeds"]["data.subset_seed"] == 0


def test_make_audit_passes_on_the_tiny_run(pipeline_run):
    started = time.time()
    result = make_audit(pipeline_run)
    print(f"make audit on the tiny run: {time.time() - started:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"AUDIT PASSED: {pipeline_run}" in out
    for rule in ("report", "figure", "tables", "train", "merge", "init_adapter", "fetch_model", "fetch_data"):
        assert f"{rule} ×" in out, rule
    assert "tokenizer_audit ×1" in out  # outside the report's lineage, verified too
    assert "train: mirror mlabonne/guanaco-llama2-1k @ fddeae968b81" in out  # the source, by its sha256
    # The audit states which tables the figures and the report came from.
    drawn = out.split("drawn from these tables alone:")[1]
    for table in ("runs.csv", "loss_curves.csv", "pairs.csv", "perplexity.csv", "samples.csv", "environment.json"):
        assert f"tables/{table} (sha256 " in drawn, table
    assert "make report-from-tables" in drawn


@pytest.mark.parametrize(
    "target",
    [
        "tables/runs.csv",
        "eval/adapter/{cell}.csv",
        "train/{cell}/adapter/adapter_model.safetensors",
        "data/train.jsonl",
    ],
    ids=["tables-csv", "eval-csv", "adapter-weight", "training-data"],
)
def test_audit_names_the_tampered_file(pipeline_run, tmp_path, target):
    results = linked_copy(pipeline_run, tmp_path / "results")
    path = results / target.format(cell=cells(results)[-1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, mid-file
    rewrite(path, bytes(data))
    result = make_audit(results)
    assert result.returncode != 0
    relative = path.relative_to(results).as_posix()
    assert f"AUDIT FAILED: {relative}: sha256" in result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_audit_names_an_input_replaced_between_jobs(pipeline_run, tmp_path):
    """A stage rerun after its consumers ran (its manifest updated, theirs not) breaks the chain."""
    results = linked_copy(pipeline_run, tmp_path / "results")
    manifest_path = results / "data" / "prepare_data.provenance.json"
    manifest = json.loads(manifest_path.read_text())
    train = results / "data" / "train.jsonl"
    rewrite(train, train.read_bytes() + b"\n")
    manifest["outputs"]["data/train.jsonl"]["sha256"] = audit.sha256_file(train)
    rewrite(manifest_path, json.dumps(manifest).encode())
    with pytest.raises(audit.AuditError) as raised:
        audit.main(results, TINY_CONFIG)
    assert raised.value.artifact == "data/train.jsonl"
    assert "replaced between the two jobs" in str(raised.value)


def test_audit_names_config_keys_that_differ(pipeline_run, tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["evaluate"]["max_new_tokens"] += 1
    config["results_dir"] = "elsewhere"  # where results live is not part of the study
    config["resources"]["threads"] += 1
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config))
    result = make_audit(pipeline_run, path)
    assert result.returncode != 0
    assert "AUDIT FAILED: report/report.html: made with another config" in result.stderr
    assert "evaluate.max_new_tokens" in result.stderr and "resources" not in result.stderr


def test_audit_checks_the_code_version(pipeline_run, tmp_path):
    results = linked_copy(pipeline_run, tmp_path / "results")
    manifest_path = next((results / "eval" / "merged").glob("*.provenance.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["code"]["git_commit"] = "0" * 40
    rewrite(manifest_path, json.dumps(manifest).encode())
    with pytest.raises(audit.AuditError, match="made by code 000000000000"):
        audit.main(results, TINY_CONFIG, code="report")


def test_tokenizer_audit_artifact(pipeline_run, base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    record = read_json(pipeline_run / "model" / "tokenizer_audit.json")
    assert record["chat_template_sha256"] == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    assert (record["eos_token_id"], record["pad_token_id"], record["bos_token_id"]) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
    )
    assert record["pad_differs_from_eos"] and record["eos_check"]["eos_in_labels"]
    assert record["eos_check"]["last_label_id"] == tokenizer.eos_token_id


def test_tokenizer_audit_fails_when_padding_is_eos(pipeline_run, base_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # the classic mistake: EOS masked as padding
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(tokenizer_audit.TokenizerAuditError, match="EOS"):
        tokenizer_audit.main(
            tmp_path / "tokenizer", pipeline_run / "data" / "train.jsonl", 64, tmp_path / "a.json", tmp_path / "p.json"
        )


def test_a_published_study_audits_without_its_weights_and_fails_on_an_altered_table(pipeline_run, tmp_path):
    import publish_study

    study = tmp_path / "studies" / "tiny"
    copied = publish_study.main(pipeline_run, TINY_CONFIG, study)
    names = {p.relative_to(study).as_posix() for p in copied}
    assert "tables/runs.csv" in names and "data/stats.json" in names and "model/tokenizer_audit.json" in names
    assert not any(n.endswith((".safetensors", ".jsonl")) and not n.startswith("samples/") for n in names)
    assert not (study / "data" / "train.jsonl").exists()  # no data in a published study
    walk = audit.main(study, study / "config.yaml", code="report", published=True)
    assert any(p.endswith("model.safetensors") for p in walk["unpublished"])
    assert not any(p.startswith("tables/") for p in walk["unpublished"])
    with pytest.raises(audit.AuditError, match="missing"):  # a full audit wants the weights
        audit.main(study, study / "config.yaml", code="report")
    runs = study / "tables" / "runs.csv"
    runs.write_text(runs.read_text().replace("qlora", "QLoRA", 1))
    with pytest.raises(audit.AuditError, match="tables/runs.csv: sha256 .* does not match"):
        audit.main(study, study / "config.yaml", code="report", published=True)


def test_merged_weights_may_be_dropped_once_evaluated(pipeline_run, tmp_path):
    """Deleting merged weights after evaluate_merged read them (disk on a cluster) keeps the
    audit: the sha256 merge recorded and the one evaluate_merged read still have to agree."""
    results = linked_copy(pipeline_run, tmp_path / "results")
    weights = sorted(results.glob("merged/*/model/*.safetensors"))
    assert len(weights) == 4
    for path in weights:
        path.unlink()
    outcome = audit.main(results, TINY_CONFIG)
    assert outcome["dropped"] == [path.relative_to(results).as_posix() for path in weights]
    # Any other missing file still fails, naming it.
    adapter = next(results.glob("train/*/adapter/adapter_model.safetensors"))
    adapter.unlink()
    with pytest.raises(audit.AuditError) as raised:
        audit.main(results, TINY_CONFIG)
    assert raised.value.artifact == adapter.relative_to(results).as_posix()
