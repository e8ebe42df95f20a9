"""The test Slurm cluster and the tiny grid through profiles/slurm (a pytest plugin, loaded by
conftest.py): fixtures for tests/test_slurm.py.

The grid runs in the background from the session's start, beside the local tiny DAG and the
other tests, and its tests wait for it: a two-core machine otherwise idles through most of
its status polls (the executor plugin waits 5 s, then 10 s longer each round no job finished)
and through the one-job stretches of its DAG.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, PROJECT, TINY_CONFIG

CLUSTER_SCRIPT = PROJECT / "tests" / "slurm" / "cluster.sh"
PROFILE = PROJECT / "profiles" / "slurm" / "config.yaml"
WORKFLOW_PROFILE = PROJECT / "profiles" / "default" / "config.yaml"  # Snakemake 9 reads it by itself
# The test cluster's partition names and the account sacctmgr gives root.
CPU_PARTITION, GPU_PARTITION, ACCOUNT = "cpu", "gpu", "root"
# The tiny grid at one of its learning rates: both arms, so every rule kind of the tiny grid
# (both bases, train, merge, every evaluation) goes through sbatch, at half the jobs. The
# local run (conftest's pipeline_run) covers the tiny grid's other cells.
SLURM_GRID = {"learning_rate": [2e-4]}


@pytest.fixture(scope="session")
def cluster():
    """A running cluster for the session; stopped in the teardown even when a test fails."""
    # Not under pytest's mode-700 folder: munged runs as user munge and must reach its socket.
    state = Path(tempfile.mkdtemp(prefix="qlora-slurm-", dir="/tmp"))
    started = time.monotonic()
    try:
        subprocess.run([str(CLUSTER_SCRIPT), "start", str(state)], check=True, timeout=600)
        print(f"\ncluster start: {time.monotonic() - started:.1f} s")
        yield state
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(state)], timeout=300)
        shutil.rmtree(state / "mariadb", ignore_errors=True)  # ~100 MB; configs and logs stay


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory) -> Path:
    """profiles/slurm as shipped, with only the site keys set for the test cluster (its GPU
    partition is the workflow profile's `gpu`)."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"].update(slurm_partition=CPU_PARTITION, slurm_account=ACCOUNT)
    folder = tmp_path_factory.mktemp("profile")
    profile["slurm-logdir"] = str(folder / "slurm_logs")  # keeps the project's .snakemake/ clean
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def slurm_config(path: Path, results: Path, **changes) -> Path:
    """The tiny CI config asking one GPU per model job and one thread, so two jobs share the node."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["results_dir"] = str(results)
    config["resources"].update(gpu=1, threads=1)
    config["evaluate"]["lm_eval"]["enabled"] = False  # lm-eval has its own tests; this one is about Slurm
    for key, value in changes.items():
        config[key] = value if not isinstance(value, dict) else {**config[key], **value}
    path.write_text(yaml.safe_dump(config))
    return path


def profile_command(profile: Path, config: Path, *args: str, limit: int) -> list[str]:
    # timeout's SIGTERM alone does not stop snakemake: -k follows it with SIGKILL.
    command = ["timeout", "-k", "30", str(limit), str(BIN / "snakemake"), *args, "--profile", str(profile)]
    return command + ["--configfile", str(config)]  # last: it takes every path that follows


PROFILE_ENV = {"HF_HUB_DISABLE_TELEMETRY": "1"}  # over the test's environment


def run_profile(profile: Path, config: Path, *args: str, limit: int = 900) -> subprocess.CompletedProcess:
    command = profile_command(profile, config, *args, limit=limit)
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, env={**os.environ, **PROFILE_ENV})


@pytest.fixture(scope="session")
def slurm_grid(cluster, profile_dir, tmp_path_factory):
    """SLURM_GRID through the profile, started and not waited for: (controller, results folder,
    its output file, when it started). Killed in the teardown if still running (a session cut short)."""
    folder = tmp_path_factory.mktemp("slurm_grid")
    config = slurm_config(folder / "config.yaml", folder / "results", grid=SLURM_GRID)
    # A hang guard, not a budget: the whole tiny grid (4 cells) took 470-490 s on this machine
    # under load 3-4 and 896 s under load 8-9 (issue 17).
    command = profile_command(profile_dir, config, limit=1800)
    log, started = folder / "snakemake.log", time.monotonic()
    with log.open("w") as handle:
        controller = subprocess.Popen(
            command,
            cwd=PROJECT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **PROFILE_ENV},
            start_new_session=True,
        )
    try:
        yield controller, folder / "results", log, started
    finally:
        if controller.poll() is None:
            os.killpg(controller.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_run(slurm_grid):
    """The grid's results folder and snakemake's output, once it has finished."""
    controller, results, log, started = slurm_grid
    controller.wait()
    output = log.read_text()
    assert controller.returncode == 0, f"snakemake through Slurm failed:\n{output[-6000:]}"
    print(f"\ngrid through Slurm: {time.monotonic() - started:.1f} s from its start")
    return results, output


@pytest.fixture(scope="session", autouse=True)
def slurm_grid_from_the_start(request, conversion_cache):
    """Starts the grid with the session when a selected test needs it (and after the session's
    conversion cache is set: the controller's fetch_model inherits it)."""
    if any("slurm_run" in item.fixturenames for item in request.session.items):
        try:
            request.getfixturevalue("slurm_grid")
        except Exception:  # no Slurm here: pytest keeps the error for the tests that need the grid
            pass
