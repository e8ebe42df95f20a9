"""The test Slurm cluster and the tiny grid through profiles/slurm (a pytest plugin, loaded by
conftest.py): fixtures for tests/test_slurm.py.

The grid runs in the background once the local tiny DAG is done (a two-core machine has no
core to spare while the DAG runs; after it, the tests leave one idle a third of the time), and
the requeue scenario (``requeue_run``) once the grid is done: most of their minutes are Slurm's
timers, the executor plugin's polls (5 s, then 10 s longer each round no job finished) and the
grid's one-job stretches, which the other tests fill. tests/test_slurm.py runs last and waits
for them.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import BIN, PIPELINE_DONE, PROJECT, TINY_CONFIG
from grid import grid_table

CLUSTER_SCRIPT = PROJECT / "tests" / "slurm" / "cluster.sh"
PROFILE = PROJECT / "profiles" / "slurm" / "config.yaml"
WORKFLOW_PROFILE = PROJECT / "profiles" / "default" / "config.yaml"  # Snakemake 9 reads it by itself
# The test cluster's partition names and the account sacctmgr gives root.
CPU_PARTITION, GPU_PARTITION, ACCOUNT = "cpu", "gpu", "root"
# One cell of the tiny grid, its QLoRA arm at one learning rate: both bases (a qlora cell's
# merge needs the 16-bit one), train, merge and every evaluation go through sbatch, so every rule
# kind of the tiny grid does. Which arm a cell trains changes none of what Slurm is asked; the
# local run (conftest's pipeline_run) covers both arms and the other cells.
SLURM_GRID = {"method": ["qlora"], "learning_rate": [2e-4]}


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


@dataclass
class BackgroundRun:
    """A controller run by a background thread (``start``): its folder, its exit status once
    ``done``, and ``error`` if the thread stopped on one."""

    folder: Path
    log_name: str = "snakemake.log"
    started: float = 0.0
    seconds: float = 0.0  # from the controller's start to the thread's end
    returncode: int | None = None
    error: BaseException | None = None
    controller: subprocess.Popen | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def results(self) -> Path:
        return self.folder / "results"

    @property
    def log(self) -> Path:
        return self.folder / self.log_name

    def start(self, target, name: str) -> None:
        def body():
            try:
                target()
            except BaseException as error:  # kept for the test, which raises it
                self.error = error
            finally:
                self.seconds = time.monotonic() - self.started if self.started else 0.0
                self.done.set()

        threading.Thread(target=body, name=name, daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        self.done.wait(timeout)
        return self.returncode

    def stop(self) -> None:
        """Kills the controller if it still runs (a session cut short, a failed wait)."""
        if self.controller is not None and self.controller.poll() is None:
            os.killpg(self.controller.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_grid(request, cluster, profile_dir, tmp_path_factory):
    """SLURM_GRID through the profile from a background thread, once the local DAG is done where
    this session runs it: beside the DAG both compete for the cores and the DAG's chain sets the
    session's pace, after it the grid's polls and one-job stretches leave room for the tests
    that follow. Killed in the teardown if still running (a session cut short)."""
    run = BackgroundRun(tmp_path_factory.mktemp("slurm_grid"))
    config = slurm_config(run.folder / "config.yaml", run.results, grid=SLURM_GRID)
    # A hang guard, not a budget: the whole tiny grid (4 cells) took 470-490 s on this machine
    # under load 3-4 and 896 s under load 8-9 (issue 17).
    command = profile_command(profile_dir, config, limit=1800)
    local_dag = any("pipeline_run" in item.fixturenames for item in request.session.items)

    def grid():
        if local_dag:  # bounded: a skipped test may never set the DAG up (then only the load differs)
            PIPELINE_DONE.wait(timeout=1800)
        run.started = time.monotonic()
        with run.log.open("w") as handle:
            run.controller = subprocess.Popen(
                command,
                cwd=PROJECT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **PROFILE_ENV},
                start_new_session=True,
            )
        run.returncode = run.controller.wait()

    run.start(grid, "slurm grid")
    yield run
    run.stop()


@pytest.fixture(scope="session")
def slurm_run(slurm_grid):
    """The grid's results folder and snakemake's output, once it has finished."""
    returncode = slurm_grid.wait()
    if slurm_grid.error is not None:
        raise slurm_grid.error
    output = slurm_grid.log.read_text()
    assert returncode == 0, f"snakemake through Slurm failed:\n{output[-6000:]}"
    print(f"\ngrid through Slurm: {time.monotonic() - slurm_grid.started:.1f} s from its start")
    return slurm_grid.results, output


def pytest_collection_modifyitems(items):
    """tests/test_slurm.py last: its tests wait for the grid and the requeue scenario, which run
    in the background meanwhile."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_slurm.py"))


@pytest.fixture(scope="session", autouse=True)
def slurm_grid_from_the_start(request, conversion_cache):
    """Sets up the grid's thread with the session when a selected test needs it (after the
    session's conversion cache is set: the controller's fetch_model inherits it), and the
    requeue scenario's, which waits for the grid."""
    needed = {name for item in request.session.items for name in item.fixturenames}  # with their fixtures' own
    for fixture in ("slurm_grid", "requeue_thread"):
        if fixture in needed:
            try:
                request.getfixturevalue(fixture)
            except Exception:  # no Slurm here: pytest keeps the error for the tests that need it
                pass


def complete_checkpoints(folder: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("checkpoint-*/trainer_state.json"))


def wait_until(condition, seconds: float, what: str, controller: subprocess.Popen, log: Path):
    deadline = time.time() + seconds
    while not condition():
        assert controller.poll() is None, f"snakemake ended while waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no {what} within {seconds} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def squeue_ids() -> dict[str, str]:
    """Job id -> comment of every pending, running or completing job."""
    queue = subprocess.run(["squeue", "-h", "-o", "%A|%k"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in queue.splitlines())


# A two-GPU training job (two gloo processes on the fake GPUs).
RESUME_STEPS, RESUME_SAVE_STEPS, RESUME_RUNTIME_MIN = 6, 2, 5


@dataclass
class RequeueRun(BackgroundRun):
    """The requeue scenario's record for tests/test_slurm.py: its train job, what the duplicate
    job and the second controller said, how the controller ended."""

    log_name: str = "controller.log"
    cell: str = ""
    job_id: str = ""
    before_requeue: int = 0
    duplicate: subprocess.CompletedProcess | None = None
    second: subprocess.CompletedProcess | None = None

    @property
    def duplicate_log(self) -> Path:
        return self.folder / "duplicate.log"


def drive_requeue(run: RequeueRun, upstream: Path, profile: Path) -> None:
    """One train job of a qlora cell, two processes on two GPUs: `scontrol requeue` after its
    first checkpoint, then a 2-minute limit for the next run (less than the warning's lead time,
    a site's short --time); while Slurm holds the requeued job, a duplicate job on the cell and a
    second controller are started (both must be refused); then the controller runs to its end."""
    results = run.results
    for part in ("model", "data", "init_adapter"):
        shutil.copytree(upstream / part, results / part, copy_function=shutil.copy2)
    grid = {**yaml.safe_load(TINY_CONFIG.read_text())["grid"], **SLURM_GRID}  # the grid's own cell
    train = {"max_steps": RESUME_STEPS, "save_steps": RESUME_SAVE_STEPS, "batch_size": 2}
    train["gradient_accumulation_steps"] = 2  # one micro-batch per process and step
    resources = {"gpus_per_job": 2, "train_runtime_min": RESUME_RUNTIME_MIN}
    config = slurm_config(run.folder / "resume.yaml", results, train=train, grid=grid, resources=resources)
    # imported here: the plugin loads in every session, the GPU host's CUDA tests included, which has no snakemake
    from snakemake.utils import Paramspace

    (run.cell,) = Paramspace(grid_table(grid), filename_params="*").instance_patterns
    metrics_file = results / "train" / run.cell / "metrics.json"
    checkpoints = results / "checkpoints" / run.cell

    command = profile_command(profile, config, str(metrics_file), limit=900)
    run.started = time.monotonic()
    with run.log.open("w") as handle:
        controller = run.controller = subprocess.Popen(
            command, cwd=PROJECT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(lambda: complete_checkpoints(checkpoints), 400, "first checkpoint", controller, run.log)
        (run.job_id,) = [job for job, comment in squeue_ids().items() if comment.startswith("rule_train_")]
        run.before_requeue = max(complete_checkpoints(checkpoints))
        subprocess.run(["scontrol", "requeue", run.job_id], check=True)
        subprocess.run(["scontrol", "update", f"JobId={run.job_id}", "TimeLimit=2"], check=True)
        run.duplicate = subprocess.run(
            ["sbatch", "--parsable", "--wait", "-p", CPU_PARTITION, "-A", ACCOUNT, "-o", str(run.duplicate_log)]
            + ["--wrap", f"{BIN / 'python'} {PROJECT / 'scripts' / 'cell_lock.py'} {checkpoints}"],
            capture_output=True,
            text=True,
        )
        # --nolock stands for the `snakemake --unlock` a user runs after the first controller died
        run.second = run_profile(profile, config, str(metrics_file), "--nolock", limit=300)
        run.returncode = controller.wait(timeout=600)
    finally:  # nothing may leave snakemake polling
        run.stop()


@pytest.fixture(scope="session")
def requeue_thread(slurm_grid, profile_dir, tmp_path_factory):
    """Starts the requeue scenario in a thread that first waits for the grid (its model, data and
    initial adapter are the scenario's)."""
    run = RequeueRun(tmp_path_factory.mktemp("requeue"))

    def scenario():
        if slurm_grid.wait() != 0:  # which started once the local DAG was done
            raise RuntimeError("the Slurm grid failed: its model, data and initial adapter are missing")
        drive_requeue(run, slurm_grid.results, profile_dir)

    run.start(scenario, "requeue scenario")
    yield run
    run.stop()  # a session cut short


@pytest.fixture(scope="session")
def requeue_run(requeue_thread) -> RequeueRun:
    """The requeue scenario once it has ended."""
    run = requeue_thread
    run.wait(timeout=2400)
    assert run.done.is_set(), f"the requeue scenario is still running:\n{run.log.read_text()[-4000:]}"
    if run.error is not None:
        raise run.error
    return run
