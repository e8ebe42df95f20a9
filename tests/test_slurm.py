"""SLURM: a QLoRA cell through profiles/slurm on a real one-node cluster, every rule kind; a training job
that is requeued, then hits its time limit, resumes each time; duplicates are refused.

tests/slurm/cluster.sh starts munge, MariaDB, slurmdbd, slurmctld and slurmd (two fake GPUs,
partitions cpu and gpu) for the session and always stops them afterwards; the grid starts with
the session (tests/slurm_cluster.py).
"""

import csv
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from snakemake.utils import Paramspace

from conftest import PROJECT, TINY_CONFIG, read_json
from grid import grid_table
from slurm_cluster import (
    ACCOUNT,
    CPU_PARTITION,
    GPU_PARTITION,
    PROFILE,
    RESUME_RUNTIME_MIN,
    RESUME_STEPS,
    SLURM_GRID,
    WORKFLOW_PROFILE,
)

SACCT_FIELDS = ["JobID", "JobName", "Partition", "Account", "State", "Comment", "ReqTRES", "AllocTRES"]
GPU_RULES = {"train", "merge", "evaluate_base", "evaluate_adapter", "evaluate_merged"}
GPU_RULES |= {"downstream_base", "downstream_adapter", "downstream_merged"}
# Run by the controller itself (Snakefile, localrules): never an sbatch job.
LOCAL_RULES = {"fetch_model", "fetch_data", "push_to_hub", "tokenizer_audit", "perplexity_table", "tables", "figure"}
LOCAL_RULES |= {"report"}


def slurm_cells() -> set[str]:
    """The cells (train/<cell>/) of SLURM_GRID."""
    grid = {**yaml.safe_load(TINY_CONFIG.read_text())["grid"], **SLURM_GRID}
    return set(Paramspace(grid_table(grid), filename_params="*").instance_patterns)


def run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, f"no SLURM run ID in the output:\n{output[-4000:]}"
    return match.group(1)


def sacct(*selection: str, settle_s: float = 30) -> list[dict]:
    """One row per job allocation (no steps) from Slurm's accounting database, once no selected
    job reads as pending or running there: slurmdbd records a job's end a moment after
    slurmctld (a `sbatch --wait` that had returned read PENDING in sacct)."""
    command = ["sacct", "-X", "-n", "-P", "-S", "2020-01-01", "-o", ",".join(SACCT_FIELDS), *selection]
    deadline = time.monotonic() + settle_s
    while True:
        lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
        rows = [dict(zip(SACCT_FIELDS, line.split("|"), strict=True)) for line in lines]
        if not any(row["State"] in ("PENDING", "RUNNING", "COMPLETING") for row in rows):
            return rows
        if time.monotonic() > deadline:
            return rows  # the callers' state assertions name what is still unfinished
        time.sleep(0.5)


def rule_of(comment: str, rules) -> str:
    """The executor plugin writes `rule_<rule>` or `rule_<rule>_wildcards_<...>` as the comment."""
    (rule,) = [r for r in rules if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_")]
    return rule


def job_stats(output: str) -> Counter:
    """Snakemake's planned 'Job stats' table: jobs per rule."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)})


def of_cells(name: str, cells: set[str]) -> bool:
    """Whether an artifact path belongs to one of these cells (train/<cell>/..., eval/adapter/<cell>.csv, ...)."""
    return any(part == cell or part.startswith(f"{cell}.") for part in name.split("/") for cell in cells)


def rules_run(results: Path) -> set[str]:
    """The rule of every job manifest in a results folder."""
    return {read_json(path)["rule"] for path in results.rglob("*.provenance.json")}


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
    """Every rule that declares `gpu` has its entry in the workflow profile, and no other rule
    does; the global profile names no rule (installing it leaks nothing into other workflows)."""
    declared = set()
    for smk in (PROJECT / "rules").glob("*.smk"):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.MULTILINE)[1:]:
            if re.search(r"^\s+gpu=", block, re.MULTILINE):
                declared.add(block.split(":", 1)[0])
    profile, workflow_profile = (yaml.safe_load(path.read_text()) for path in (PROFILE, WORKFLOW_PROFILE))
    assert declared == GPU_RULES == set(workflow_profile["set-resources"])
    assert "set-resources" not in profile and set(workflow_profile) == {"set-resources"}
    assert profile["executor"] == "slurm" and profile["rerun-incomplete"] is True and profile["keep-going"] is True


def test_tiny_grid_runs_every_job_through_sbatch(slurm_run):
    results, output = slurm_run
    planned = job_stats(output)
    assert planned["train"] == 1 and planned["evaluate_base"] == 2 and planned["all"] == 1  # both bases
    del planned["all"]  # the target rule runs no code: no job
    assert LOCAL_RULES - {"push_to_hub"} <= set(planned)  # the push is off in the tiny config
    jobs = sacct("--name", run_id(output))
    submitted = Counter(rule_of(job["Comment"], planned) for job in jobs)
    assert submitted == {rule: count for rule, count in planned.items() if rule not in LOCAL_RULES}
    assert submitted["train"] == 1 and submitted["evaluate_base"] == 2 and submitted["prepare_data"] == 1
    trained = {job["Comment"].split("_wildcards_", 1)[1] for job in jobs if rule_of(job["Comment"], planned) == "train"}
    assert trained == slurm_cells() and {cell.split("_")[0] for cell in trained} == {"method~qlora"}
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
    produced = artifacts(results)
    # The Slurm grid leaves evaluate.lm_eval off (tests/test_downstream.py covers it locally)
    # and runs one of the tiny grid's four cells: the local run's files less the other cells'.
    cells, local_cells = slurm_cells(), {path.name for path in (pipeline_run / "train").iterdir()}
    assert len(local_cells) == 4 and cells < local_cells
    local = artifacts(pipeline_run)
    local = {name for name in local if "downstream" not in name and not of_cells(name, local_cells - cells)}
    assert produced == local
    assert sum(name.endswith("metrics.json") for name in produced) == 1
    # Every rule kind the local run ran (lm-eval's aside) ran here too.
    assert rules_run(results) == {rule for rule in rules_run(pipeline_run) if not rule.startswith("downstream")}
    # Same seeds and data: the first step's loss agrees (to 1e-3: thread counts may differ).
    for metrics in (results / "train").glob("*/loss_curve.csv"):
        with metrics.open() as a, (pipeline_run / metrics.relative_to(results)).open() as b:
            first = [float(next(csv.DictReader(handle))["loss"]) for handle in (a, b)]
        assert first[0] == pytest.approx(first[1], rel=1e-3)


def job_runs(job_id: str) -> list[dict]:
    """Every run of one job, a requeued one's earlier runs included (sacct -D)."""
    fields = ["State", "Timelimit", "AllocTRES"]
    command = ["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(fields)]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    return [dict(zip(fields, line.split("|"), strict=True)) for line in lines]


def submit_line(job_id: str) -> str:
    command = ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "SubmitLine"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[0]


def test_requeued_then_time_limited_training_resumes_and_duplicates_are_refused(requeue_run, profile_dir):
    """One train job of a cell, two processes on two GPUs: `scontrol requeue` kills its first
    run after a checkpoint and Slurm starts it again with a 2-minute limit; that run resumes,
    takes Slurm's warning, saves and stops; Snakemake's retry asks twice the time and finishes
    from that checkpoint. Meanwhile a duplicate job and a second controller are refused
    (tests/slurm_cluster.py drives it in the background: ``drive_requeue``)."""
    scenario = requeue_run
    results, cell, job_id = scenario.results, scenario.cell, scenario.job_id
    metrics_file = results / "train" / cell / "metrics.json"
    checkpoints = results / "checkpoints" / cell
    print(f"\nrequeue, time limit and retry: {scenario.seconds:.0f} s")

    # While Slurm held the requeued job, a duplicate job on the cell was refused by its lock (the
    # record names a job Slurm still has) ...
    duplicate = scenario.duplicate
    assert duplicate.returncode == 1, duplicate.stdout + duplicate.stderr
    assert f"belongs to a live training job, Slurm job {job_id} on " in scenario.duplicate_log.read_text()
    assert sacct("-j", duplicate.stdout.strip().split(";")[0])[0]["State"] == "FAILED"
    # ... and so was a second controller, before it submitted anything.
    second_output = scenario.second.stdout + scenario.second.stderr
    assert scenario.second.returncode != 0, second_output[-4000:]
    assert f"Cannot start: live jobs still train cells of this run ({cell} by Slurm job {job_id} on" in second_output

    output = scenario.log.read_text()
    assert scenario.returncode == 0, output[-6000:]

    # Slurm's record: the job ran twice (requeued, then stopped on the warning), the retry finished.
    first_runs = job_runs(job_id)
    assert [run["State"] for run in first_runs] == ["REQUEUED", "FAILED"], first_runs
    jobs = {job["JobID"]: job for job in sacct("--name", run_id(output))}
    (retry_id,) = set(jobs) - {job_id}
    assert jobs[retry_id]["State"] == "COMPLETED"
    retry_runs = job_runs(retry_id)
    # sacct shows a job's current limit for all its runs; the submit lines below show the asked one.
    assert [run["Timelimit"] for run in first_runs + retry_runs] == ["00:02:00", "00:02:00", "00:10:00"]
    for run in first_runs + retry_runs:  # two GPUs, one CPU thread per process, one node
        assert "cpu=2," in run["AllocTRES"] and "gres/gpu=2" in run["AllocTRES"] and "node=1" in run["AllocTRES"]
    for job, minutes, memory in ((job_id, RESUME_RUNTIME_MIN, 4000), (retry_id, 2 * RESUME_RUNTIME_MIN, 8000)):
        line = submit_line(job)
        for flag in ("--gpus=2", "--cpus-per-task=2", "--nodes=1", f"-t {minutes}", f"--mem {memory}"):
            assert flag in line, (flag, line)
        assert f"--signal=URG@{min(300, minutes * 30)} --requeue --open-mode=append" in line, line

    # The job's log kept both runs (--open-mode=append): the restarted run resumed, was warned,
    # saved one step later and stopped. The rule's log is the retry's: it resumed there.
    (job_log,) = (profile_dir / "slurm_logs").rglob(f"{job_id}.log")
    job_text = job_log.read_text()
    assert "DUE TO JOB REQUEUE" in job_text, job_text[-3000:]
    restarted = [int(step) for step in re.findall(r"train.rank0: resuming from \S+checkpoint-(\d+)", job_text)]
    warning = r"train.rank0: Slurm's time-limit warning \(SIGURG\): saving a checkpoint at step (\d+) and stopping"
    warned = [int(step) for step in re.findall(warning, job_text)]
    assert len(restarted) == 1 and restarted[0] >= scenario.before_requeue, job_text[-3000:]
    assert warned == [restarted[0] + 1], job_text[-3000:]
    assert f"stopped at step {warned[0]} by Slurm's time-limit warning after saving a checkpoint" in job_text
    train_log = (results / "logs" / "train" / f"{cell}.log").read_text()
    assert re.findall(r"resuming from \S+checkpoint-(\d+)", train_log) == [str(warned[0])], train_log[-3000:]
    metrics = read_json(metrics_file)
    assert metrics["resumed_from_step"] == warned[0]
    assert metrics["global_steps"] == RESUME_STEPS and metrics["world_size"] == 2
    with (results / "train" / cell / "loss_curve.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, RESUME_STEPS + 1))
    # Every torchrun process kept its own log; the finished job released the cell.
    torchrun_logs = results / "logs" / "train" / f"{cell}.torchrun"
    for rank in ("0", "1"):  # three launches: first run, restarted run, retry
        assert len(list(torchrun_logs.glob(f"*/attempt_0/{rank}/stderr.log"))) == 3
    assert not checkpoints.with_name(cell + ".lock").exists() and not checkpoints.exists()
