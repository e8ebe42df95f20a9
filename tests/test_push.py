"""The opt-in Hub push: off by default; a dry run (through Snakemake, on a copy of the tiny
run) lists what would be uploaded and writes the model card; a real push without a token
stops clearly; a token in the environment never reaches a file or a log.

The Hub is unreachable here, so the upload itself (HfApi.create_repo + upload_folder) runs
only for users with the Hub."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_audit import linked_copy

from conftest import BIN, FAKE_TOKEN, PROJECT, TINY_CONFIG, read_json, snakemake
from runtime import sha256_file

SNAKEMAKE_LOGS = PROJECT / ".snakemake" / "log"
PUSH = {"enabled": True, "dry_run": True, "repo_id": "someone/tiny-qlora"}


def push_config(folder) -> Path:
    """The tiny config with the push enabled in dry-run mode (--config cannot set nested keys)."""
    config = {**yaml.safe_load(TINY_CONFIG.read_text()), "push": PUSH}
    path = folder / "push.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def no_token_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    (tmp_path / "hf_home").mkdir(exist_ok=True)
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def dry_run(pipeline_run, tmp_path_factory):
    """push_to_hub run for real by Snakemake (dry_run: true) on a linked copy, with a fake token set."""
    tmp = tmp_path_factory.mktemp("push")
    results = linked_copy(pipeline_run, tmp / "results")
    env = no_token_env(tmp, HF_TOKEN=FAKE_TOKEN)
    command = [str(BIN / "snakemake"), "--configfile", str(push_config(tmp)), "--cores", "1"]
    # The copy has no Snakemake metadata; mtimes (kept by the links) say it is complete.
    command += ["--rerun-triggers", "mtime", "--config", f"results_dir={results}"]
    logs_before = set(SNAKEMAKE_LOGS.glob("*.snakemake.log"))
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return results, result, sorted(set(SNAKEMAKE_LOGS.glob("*.snakemake.log")) - logs_before)


def front_matter_and_tables(card: str) -> tuple[dict, dict[str, list[list[str]]]]:
    _, front, body = card.split("---\n", 2)
    tables, heading = {}, None
    for line in body.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("| ") and heading:
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return yaml.safe_load(front), {name: rows[1:] for name, rows in tables.items()}  # drop header rows


def test_push_is_off_by_default(tmp_path):
    planned = snakemake("-n", results_dir=tmp_path)
    assert "push_to_hub" not in planned.stdout + planned.stderr
    enabled = snakemake("-n", results_dir=tmp_path, config=push_config(tmp_path))
    assert "rule push_to_hub:" in enabled.stdout + enabled.stderr


def test_dry_run_lists_every_file_with_size_and_hash(dry_run):
    results, result, _ = dry_run
    jobs = re.findall(r"^(?:local)?rule (\w+):", result.stderr + result.stdout, flags=re.M)
    assert [job for job in jobs if job != "all"] == ["push_to_hub"]  # nothing else of the copied run was redone
    plan = read_json(results / "hub" / "upload.json")
    assert plan["dry_run"] is True and plan["private"] is True and plan["commit"] is None
    assert plan["repo_id"] == "someone/tiny-qlora" and plan["what"] == "merged"
    model_dir = results / "merged" / plan["cell"] / "model"
    expected = {p.name for p in model_dir.iterdir() if p.name != ".snakemake_timestamp"} | {"README.md"}
    assert set(plan["files"]) == expected and "model.safetensors" in expected and "tokenizer.json" in expected
    for name, info in plan["files"].items():
        path = results / "hub" / "README.md" if name == "README.md" else model_dir / name
        assert info["sha256"] == sha256_file(path) and info["bytes"] == path.stat().st_size, name
    log = (results / "logs" / "push_to_hub.log").read_text()
    assert "would upload model.safetensors" in log and "Hub token: found" in log


def test_model_card_matches_the_metrics(dry_run, tiny_config):
    results, _, _ = dry_run
    plan = read_json(results / "hub" / "upload.json")
    front, tables = front_matter_and_tables((results / "hub" / "README.md").read_text())
    assert front["base_model"] == tiny_config["model"]["hub_id"]
    assert front["datasets"] == [tiny_config["data"]["train"]["hub_id"]]
    assert front["library_name"] == "transformers" and front["license"] == "apache-2.0"
    runs = pd.read_csv(results / "tables" / "runs.csv").set_index("cell")
    perplexity = pd.read_csv(results / "tables" / "perplexity.csv")
    row = runs.loc[plan["cell"]]
    assert row.method in front["tags"] and "qlora-snakemake" in front["tags"]
    assert len(front["tags"]) == len(set(front["tags"]))
    # best = the lowest held-out chat perplexity of a merged model
    merged = perplexity[(perplexity.model_kind == "merged") & (perplexity.dataset == "eval_chat")]
    assert plan["cell"] == merged.sort_values("perplexity").iloc[0]["model"]
    hyper = dict(tables["Hyperparameters"])
    assert (hyper["method"], hyper["target_modules"]) == (row.method, row.target_modules)
    for key in ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "seed"):
        assert float(hyper[key]) == pytest.approx(row[key]), key
    assert int(hyper["max_steps"]) == tiny_config["train"]["max_steps"]
    memory = dict(tables["Memory and speed"])
    for key in ("train_peak_gib", "weights_gib", "tokens_per_second"):
        assert float(memory[key]) == pytest.approx(row[key], rel=1e-5), key
    shown = {(m, p, d): float(v) for m, p, d, v in tables["Perplexity"]}
    mine = perplexity[(perplexity.model == plan["cell"]) | (perplexity.model_kind == "base")]
    assert len(shown) == len(mine)
    for r in mine.itertuples():
        assert math.isclose(shown[(r.model_kind, r.precision, r.dataset)], r.perplexity, rel_tol=1e-5)
    files = {name: (int(size), digest) for name, size, digest in tables["Provenance"]}
    assert files["model.safetensors"][1] == plan["files"]["model.safetensors"]["sha256"]
    assert "git commit" in (results / "hub" / "README.md").read_text()


def test_the_token_never_reaches_a_file_or_log(dry_run):
    results, result, _ = dry_run
    assert FAKE_TOKEN not in result.stdout + result.stderr
    leaks = [p for p in results.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks
    # The logs of the fixture's own run, not merely the newest in .snakemake/log (another run's, when runs overlap).
    _, _, snakemake_logs = dry_run
    assert snakemake_logs and not any(FAKE_TOKEN in log.read_text() for log in snakemake_logs)
    assert any("push_to_hub" in log.read_text() for log in snakemake_logs)


def run_push_cli(results, tmp_path, env, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT / "scripts" / "push_to_hub.py"), "--results", str(results)]
    command += ["--config", str(TINY_CONFIG), "--repo-id", "someone/tiny-qlora", "--out-dir", str(tmp_path / "hub")]
    return subprocess.run([*command, *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)


def test_push_without_a_token_fails_clearly(pipeline_run, tmp_path):
    result = run_push_cli(pipeline_run, tmp_path, no_token_env(tmp_path))
    assert result.returncode != 0
    assert "no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hub" / "upload.json").exists()


def test_adapter_dry_run_uploads_adapter_and_tokenizer(pipeline_run, tmp_path):
    result = run_push_cli(pipeline_run, tmp_path, no_token_env(tmp_path), "--what", "adapter", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = read_json(tmp_path / "hub" / "upload.json")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= set(plan["files"])
    assert "model.safetensors" not in plan["files"]
    front, _ = front_matter_and_tables((tmp_path / "hub" / "README.md").read_text())
    assert front["library_name"] == "peft"


def test_a_token_in_the_pipelines_environment_never_reaches_a_file(pipeline_run):
    """The tiny run itself ran with HF_TOKEN set (conftest): no artifact, manifest or log holds it."""
    leaks = [p for p in pipeline_run.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks
    assert (pipeline_run / "logs" / "fetch_data" / "train.log").is_file()


def test_logs_redact_a_token_passed_as_an_argument(tmp_path):
    import logging

    from runtime import setup_logging

    logger = setup_logging(tmp_path / "job.log", "redaction")
    logger.info("message %s", FAKE_TOKEN)
    logger.info(f"inline {FAKE_TOKEN}")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / "job.log").read_text()
    assert FAKE_TOKEN not in text and text.count("hf_***") == 2
