"""Cluster-site pieces without a cluster: the cell lock, the warning-signal callback, the
start-up checks and the per-attempt requests (tests/test_slurm.py runs them through Slurm)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

import cell_lock
import job_resources
import preemption
import site_check
from conftest import PROJECT, TINY_CONFIG


def test_a_live_owner_refuses_a_duplicate_and_a_dead_one_does_not(tmp_path):
    checkpoints = tmp_path / "checkpoints" / "cell"
    lock = cell_lock.CellLock(checkpoints).acquire()
    record = json.loads(cell_lock.lock_path(checkpoints).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    # Another process on this node: the flock refuses it, naming the owner.
    other = subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / "cell_lock.py"), str(checkpoints)], capture_output=True, text=True
    )
    assert other.returncode == 1
    assert f"{checkpoints} belongs to a live training job, pid {os.getpid()}" in other.stderr
    assert cell_lock.live_owners(tmp_path / "checkpoints") == [("cell", record)]
    lock.release()
    assert not cell_lock.lock_path(checkpoints).exists()
    assert cell_lock.live_owners(tmp_path / "checkpoints") == []

    # Leftovers of a killed job: its pid is gone, so the cell is free.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {**cell_lock.own_record(), "pid": int(dead.stdout), "slurm_job_id": None}
    cell_lock.lock_path(checkpoints).write_text(json.dumps(stale))
    assert cell_lock.live_owners(tmp_path / "checkpoints") == []
    cell_lock.CellLock(checkpoints).acquire().release()


def test_owner_liveness_across_nodes_and_requeues(monkeypatch):
    elsewhere = {**cell_lock.own_record(), "host": "node-17", "slurm_job_id": None}
    assert cell_lock.owner_alive(elsewhere)  # fresh heartbeat on another node
    elsewhere["heartbeat"] = time.time() - cell_lock.STALE_SECONDS - 1
    assert not cell_lock.owner_alive(elsewhere)
    # A requeued job runs again under its own id: its earlier run's record is no owner.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert not cell_lock.owner_alive({**cell_lock.own_record(), "pid": os.getppid()})


def test_the_warning_signal_saves_at_the_next_step():
    import logging

    from transformers import TrainerControl, TrainerState

    preemption.listen()
    callback = preemption.save_on_warning(logging.getLogger("test"))
    state, control = TrainerState(global_step=5), TrainerControl()
    assert not callback.on_step_end(None, state, control).should_save
    preemption.exit_if_stopped()  # not warned: returns
    os.kill(os.getpid(), preemption.WARNING_SIGNAL)
    control = callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop
    try:
        with pytest.raises(SystemExit, match="stopped at step 5 by Slurm's time-limit warning after saving"):
            preemption.exit_if_stopped()
    finally:
        preemption._stopped_at.clear()  # this process trains more cells in other tests
    control = TrainerControl()  # once per warning
    assert not callback.on_step_end(None, state, control).should_save
    assert signal.getsignal(signal.SIGURG) is not signal.SIG_DFL
    assert preemption.sbatch_options(1) == "--signal=URG@30 --requeue --open-mode=append"
    assert preemption.warning_seconds(240) == 300


def test_liger_recipe_needs_liger_where_the_jobs_run():
    config = yaml.safe_load((PROJECT / "config" / "llama2-7b.yaml").read_text())
    problem = site_check.kernels_problem(config, use_conda=False, python="/env/bin/python")
    if site_check.importlib.util.find_spec("liger_kernel") is None:  # the CPU venv has no liger
        assert problem.startswith("config key 'train.kernels' is liger, but liger-kernel is not installed in")
        assert "/env/bin/python" in problem
    assert site_check.conda_env(config) == "envs/pipeline-gpu.yaml"
    assert site_check.kernels_problem(config, use_conda=True, python="-") is None
    cpu = dict(config, resources=dict(config["resources"], gpu=0))  # Liger is skipped on a CPU
    assert site_check.kernels_problem(cpu, use_conda=False, python="-") is None
    assert site_check.conda_env(cpu) == "envs/pipeline.yaml"


def test_squeue_polling_is_refused_where_finished_jobs_vanish_before_the_next_poll():
    assert "MinJobAge=120 s" in site_check.polling_problem("squeue", 5, 120)
    assert site_check.polling_problem("squeue", 5, 300) is None  # Slurm's default
    assert site_check.polling_problem("squeue", 40, 100) is None  # the plugin switches to sacct
    assert site_check.polling_problem("sacct", 5, 120) is None


def test_cancelling_preemption_is_pointed_out():
    assert "PreemptMode=CANCEL" in site_check.preemption_note("CANCEL")
    assert site_check.preemption_note("REQUEUE") is None and site_check.preemption_note("OFF") is None


def test_disk_note_counts_the_merged_models(tmp_path):
    shape = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}
    shape |= {"num_attention_heads": 32, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(shape))
    note = site_check.disk_note(tmp_path / "config.json", 8, 2)
    assert note.startswith("disk: 8 merged models of 13.5 GB each, 107.8 GB in all")  # Llama-2-7B: 6.74B
    assert "known once fetch_model" in site_check.disk_note(tmp_path / "missing.json", 8, 2)


@pytest.mark.parametrize("attempt", [1, 2])
def test_train_time_limit_from_tokens_and_throughput(tmp_path, attempt):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"train": {"tokens_after_truncation": 455_248}}))
    assert job_resources.train_runtime_min(config, stats, attempt) == 60 * attempt  # no throughput given
    config["train"].update(max_steps=-1, epochs=1)
    config["resources"].update(train_runtime_min=20, train_tokens_per_second=1600)
    # 455,248 tokens at 1,600 tok/s = 4.7 min, x 2 margin = 9.5 -> 10 min.
    assert job_resources.train_runtime_min(config, stats, attempt) == 30 * attempt
    assert job_resources.train_runtime_min(config, tmp_path / "absent.json", attempt) == 20 * attempt
    config["train"].update(max_steps=10)  # 10 steps x 4 x 64 tokens at most
    assert job_resources.train_tokens(config, json.loads(stats.read_text())) == 2560
