"""Concurrent local jobs each claim their own card(s) (scripts/gpu_assign.py), for real:
separate processes, real flock locks, cards named by CUDA_VISIBLE_DEVICES."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import gpu_assign
from conftest import PROJECT

JOB = """
import json, os, sys, time
sys.path.insert(0, {scripts!r})
import gpu_assign
gpus = gpu_assign.assign_gpus({count}, jobs_per_gpu={slots}, exclusive={exclusive})
print(json.dumps({{"gpus": gpus, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "at": time.time()}}), flush=True)
time.sleep({hold})
"""


def start_job(tmp_path, count=1, slots=1, hold=3.0, visible="0,1", exclusive=False, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env.update(QLORA_GPU_LOCK_DIR=str(tmp_path / "locks"), CUDA_VISIBLE_DEVICES=visible, **extra_env)
    code = JOB.format(scripts=str(PROJECT / "scripts"), count=count, slots=slots, hold=hold, exclusive=exclusive)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def claimed(job) -> dict:
    return json.loads(job.stdout.readline())


def test_concurrent_jobs_get_distinct_cards_and_a_third_waits(tmp_path):
    first, second = start_job(tmp_path, hold=4), start_job(tmp_path, hold=1)
    a, b = claimed(first), claimed(second)
    assert {a["visible"], b["visible"]} == {"0", "1"}  # each job sees only its own card
    third = start_job(tmp_path, hold=0)
    c = claimed(third)
    second.wait()
    # The third job got a card only once one was free: the one the finished job held.
    assert c["visible"] == b["visible"] and c["at"] >= b["at"] + 1
    for job in (first, third):
        job.wait()


def test_a_killed_job_leaves_its_card_free(tmp_path):
    holder = start_job(tmp_path, hold=60, visible="3")
    assert claimed(holder)["visible"] == "3"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.time()
    assert claimed(start_job(tmp_path, hold=0, visible="3"))["visible"] == "3"
    assert time.time() - started < 10


def test_multi_gpu_jobs_and_shared_slots(tmp_path):
    pair = start_job(tmp_path, count=2, hold=1, visible="0,1,2")
    assert sorted(claimed(pair)["gpus"]) in (["0", "1"], ["0", "2"], ["1", "2"])
    pair.wait()
    # Two slots per card: four jobs spread over two cards, two each.
    jobs = [start_job(tmp_path / "shared", slots=2, hold=2) for _ in range(4)]
    cards = sorted(claimed(job)["visible"] for job in jobs)
    assert cards == ["0", "0", "1", "1"]
    for job in jobs:
        job.wait()


def test_a_training_job_owns_its_card_while_evaluations_share(tmp_path):
    # Two slots per card, cards 0 and 1: an evaluation sits on one card...
    evaluation = start_job(tmp_path, slots=2, hold=3)
    busy = claimed(evaluation)["visible"]
    # ...so a training job (every slot) takes the other, and a second one waits for a whole card.
    trainer = start_job(tmp_path, slots=2, hold=1, exclusive=True)
    first = claimed(trainer)
    assert first["visible"] != busy
    waiting = start_job(tmp_path, slots=2, hold=0, exclusive=True)
    second = claimed(waiting)
    assert second["at"] >= first["at"] + 0.9
    for job in (evaluation, trainer, waiting):
        job.wait()


def test_slurm_jobs_and_cpu_jobs_are_left_alone(tmp_path):
    env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "2,3", "QLORA_GPU_LOCK_DIR": str(tmp_path)}
    assert gpu_assign.assign_gpus(2, environ=env) == ["2", "3"]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and not list(tmp_path.iterdir())
    assert gpu_assign.assign_gpus(0, environ={"CUDA_VISIBLE_DEVICES": "0"}) == []


def test_asking_for_more_cards_than_visible_is_one_sentence(tmp_path):
    with pytest.raises(gpu_assign.GpuAssignmentError, match=r"needs 2 GPU\(s\) but only 1 may be used here \(5\)"):
        gpu_assign.claim(2, ["5"], tmp_path)
    assert gpu_assign.candidate_gpus({"CUDA_VISIBLE_DEVICES": " 4, 6 "}) == ["4", "6"]
    assert gpu_assign.candidate_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
