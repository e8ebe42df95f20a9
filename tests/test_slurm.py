"""SLURM: the tiny grid through profiles/slurm on a real one-node cluster, and scancel-and-resume.

tests/slurm/cluster.sh starts munge, MariaDB, slurmdbd, slurmctld and slurmd (two fake GPUs,
partitions cpu and gpu) for this module and always stops them afterwards.
"""

import csv
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from snakemake.utils import Paramspace

from conftest import BIN, PROJECT, TINY_CONFIG, read_json
from grid import grid_table

CLUSTER_SCRIPT = PROJECT / "tests" / "slurm" / "cluster.sh"
PROFILE = PROJECT / "profiles" / "slurm" / "config.yaml"
GPU_RULES = {"train", "merge", "evaluate_base", "evaluate_adapter", "evaluate_merged"}
# The test cluster's partition names and the account sacctmgr gives root.
CPU_PARTITION, GPU_PARTITION, ACCOUNT = "cpu", "gpu", "root"
SACCT_FIELDS = ["JobID", "JobName", "Partition", "Account", "State", "Comment", "ReqTRES", "AllocTRES"]


@pytest.fixture(scope="module")
def cluster():
    """A running cluster for this module; stopped in the teardown even when a test fails."""
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


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    """profiles/slurm as shipped, with only the site keys set for the test cluster."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"].update(slurm_partition=CPU_PARTITION, slurm_account=ACCOUNT)
    for rule in profile["set-resources"]:
        profile["set-resources"][rule]["slurm_partition"] = GPU_PARTITION
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


def run_profile(profile: Path, config: Path, *args: str, limit: int = 900) -> subprocess.CompletedProcess:
    # timeout's SIGTERM alone does not stop snakemake: -k follows it with SIGKILL.
    command = ["timeout", "-k", "30", str(limit), str(BIN / "snakemake"), *args, "--profile", str(profile)]
    command += ["--configfile", str(config)]  # last: it takes every path that follows
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, env=env)


def run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, f"no SLURM run ID in the output:\n{output[-4000:]}"
    return match.group(1)


def sacct(*selection: str) -> list[dict]:
    """One row per job allocation (no steps) from Slurm's accounting database."""
    command = ["sacct", "-X", "-n", "-P", "-S", "2020-01-01", "-o", ",".join(SACCT_FIELDS), *selection]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    return [dict(zip(SACCT_FIELDS, line.split("|"), strict=True)) for line in lines]


def squeue_ids() -> dict[str, str]:
    """Job id -> comment of every pending, running or completing job."""
    queue = subprocess.run(["squeue", "-h", "-o", "%A|%k"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in queue.splitlines())


def rule_of(comment: str, rules) -> str:
    """The executor plugin writes `rule_<rule>` or `rule_<rule>_wildcards_<...>` as the comment."""
    (rule,) = [r for r in rules if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_")]
    return rule


def job_stats(output: str) -> Counter:
    """Snakemake's planned 'Job stats' table: jobs per rule."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)})


def artifacts(results: Path) -> set[str]:
    """Every produced file, relative to results_dir; logs and time-stamped names normalised away."""
    found = set()
    for path in results.rglob("*"):
        relative = path.relative_to(results).as_posix()
        if path.is_dir() or relative.startswith(("logs/", ".snakemake/")):
            continue
        found.add(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", relative))
    return found


def test_profile_sends_every_gpu_rule_to_the_gpu_partition():
    """Every rule that declares `gpu` has its set-resources entry, and no other rule does."""
    declared = set()
    for smk in (PROJECT / "rules").glob("*.smk"):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.MULTILINE)[1:]:
            if re.search(r"^\s+gpu=", block, re.MULTILINE):
                declared.add(block.split(":", 1)[0])
    profile = yaml.safe_load(PROFILE.read_text())
    assert declared == GPU_RULES == set(profile["set-resources"])
    assert profile["executor"] == "slurm" and profile["rerun-incomplete"] is True


@pytest.fixture(scope="module")
def slurm_run(cluster, profile_dir, tmp_path_factory):
    """The whole tiny grid through the profile: its results folder and snakemake's output."""
    folder = tmp_path_factory.mktemp("slurm_grid")
    config = slurm_config(folder / "config.yaml", folder / "results")
    started = time.monotonic()
    result = run_profile(profile_dir, config)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"snakemake through Slurm failed:\n{output[-6000:]}"
    print(f"\ntiny grid through Slurm: {time.monotonic() - started:.1f} s")
    return folder / "results", output


def test_tiny_grid_runs_every_job_through_sbatch(slurm_run):
    results, output = slurm_run
    planned = job_stats(output)
    assert planned["train"] == 4 and planned["all"] == 1
    del planned["all"]  # the target rule runs no code: no job
    jobs = sacct("--name", run_id(output))
    submitted = Counter(rule_of(job["Comment"], planned) for job in jobs)
    assert submitted == planned
    for job in jobs:
        assert job["State"] == "COMPLETED", job
        assert job["Account"] == ACCOUNT, job
        if rule_of(job["Comment"], planned) in GPU_RULES:
            assert job["Partition"] == GPU_PARTITION, job
            assert "gres/gpu=1" in job["ReqTRES"] and "gres/gpu=1" in job["AllocTRES"], job
        else:
            assert job["Partition"] == CPU_PARTITION, job
            assert "gres/gpu" not in job["AllocTRES"], job
    assert (results / "report" / "report.html").is_file()


def test_slurm_artifacts_match_a_local_run(slurm_run, pipeline_run):
    results, _ = slurm_run
    produced, local = artifacts(results), artifacts(pipeline_run)
    assert produced == local
    assert sum(name.endswith("metrics.json") for name in produced) == 4
    # Same seeds and data: the first step's loss agrees (thread counts differ, so not bit for bit).
    for metrics in (results / "train").glob("*/loss_curve.csv"):
        with metrics.open() as a, (pipeline_run / metrics.relative_to(results)).open() as b:
            first = [float(next(csv.DictReader(handle))["loss"]) for handle in (a, b)]
        assert first[0] == pytest.approx(first[1], rel=1e-3)


def test_scancelled_training_resumes_from_its_checkpoint(cluster, profile_dir, slurm_run, tmp_path):
    upstream, _ = slurm_run
    results = tmp_path / "results"
    for part in ("model", "data", "init_adapter"):
        shutil.copytree(upstream / part, results / part, copy_function=shutil.copy2)
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    grid = {**tiny["grid"], "method": ["qlora"], "learning_rate": [2e-4]}
    config = slurm_config(tmp_path / "resume.yaml", results, train={"max_steps": 12, "save_steps": 2}, grid=grid)
    (cell,) = Paramspace(grid_table(grid), filename_params="*").instance_patterns
    metrics_file = results / "train" / cell / "metrics.json"
    checkpoints = results / "checkpoints" / cell

    # First run: no retries, so the cancelled job fails the run instead of being resubmitted.
    command = ["timeout", "-k", "30", "600", str(BIN / "snakemake"), str(metrics_file), "--retries", "0"]
    command += ["--profile", str(profile_dir), "--configfile", str(config)]
    with (tmp_path / "first_run.log").open("w") as log:
        first = subprocess.Popen(command, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 400
            while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
                assert first.poll() is None, (tmp_path / "first_run.log").read_text()[-4000:]
                time.sleep(0.5)
            assert list(checkpoints.glob("checkpoint-*/trainer_state.json")), "no checkpoint within 400 s"
            first_saved = min(
                int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json")
            )
            (job_id,) = [job for job, comment in squeue_ids().items() if comment.startswith("rule_train_")]
            # Slurm sends SIGTERM to the job's processes, then SIGKILL after KillWait (5 s here).
            subprocess.run(["scancel", job_id], check=True)
            first.wait(timeout=300)
            # The rerun must not overlap the dying job (KillWait): wait until Slurm has let it go.
            deadline = time.time() + 60
            while job_id in squeue_ids() and time.time() < deadline:
                time.sleep(0.5)
        finally:  # a failed assertion must not leave snakemake polling
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    first_output = (tmp_path / "first_run.log").read_text()
    assert first.returncode != 0, first_output[-4000:]
    assert not metrics_file.exists()
    assert sacct("-j", job_id)[0]["State"].startswith("CANCELLED")
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json"))
    assert first_saved <= saved < 12

    second = run_profile(profile_dir, config, str(metrics_file), limit=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    metrics = read_json(metrics_file)
    assert metrics["resumed_from_step"] >= first_saved
    assert metrics["global_steps"] == 12
    assert "resuming from" in (results / "logs" / "train" / f"{cell}.log").read_text()
    with (results / "train" / cell / "loss_curve.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, 13))
    (rerun,) = sacct("--name", run_id(second.stdout + second.stderr))
    assert rerun["State"] == "COMPLETED" and "gres/gpu=1" in rerun["AllocTRES"]
