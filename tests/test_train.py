"""Training stage: the tiny grid on CPU, fair arms, vanilla-PEFT adapters, resume, determinism."""

import csv
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml
from snakemake.utils import Paramspace

import resume
import train
from conftest import BIN, PROJECT, read_json, snakemake
from grid import grid_table

QLORA_CELL = {
    "method": "qlora",
    "lora_r": 64,
    "lora_alpha": 16.0,
    "lora_dropout": 0.1,
    "target_modules": "qv",
    "learning_rate": 1e-3,
    "quant_type": "nf4",
    "double_quant": False,
    "seed": 1,
}


def train_qlora_cell(results, max_length: int, settings: dict, out, **options) -> dict:
    """train.main on the tiny run's model, data and seed-1 initial adapter, outside Snakemake."""
    return train.main(
        results / "model" / "base",
        results / "data" / "train.jsonl",
        next((results / "init_adapter").glob("r64*_s1")),
        QLORA_CELL,
        settings,
        max_length,
        out / "adapter",
        out / "metrics.json",
        out / "loss.csv",
        out / "tb",
        out / "ckpt",
        threads=2,
        **options,
    )


def cells(results):
    return sorted((results / "train").iterdir())


def test_tiny_grid_trains_both_arms(pipeline_run, tiny_config):
    expected = grid_table(tiny_config["grid"])
    trained = [read_json(cell / "metrics.json") for cell in cells(pipeline_run)]
    assert len(trained) == len(expected) == 4
    for metrics in trained:
        assert metrics["global_steps"] == tiny_config["train"]["max_steps"]
        assert metrics["tokens_per_second"] > 0 and metrics["steady_tokens_per_second"] > 0
        # CPU memory: the training phase's own peak, below the process peak that loading set.
        assert 0 < metrics["rss_at_train_start_bytes"] <= metrics["train_peak_rss_bytes"]
        assert metrics["train_peak_rss_bytes"] <= metrics["process_peak_rss_bytes"]
        # AdamW: two fp32 moments per trainable weight (plus a step counter per tensor).
        assert metrics["optimizer_state_bytes"] == pytest.approx(2 * 4 * metrics["trainable_parameters"], rel=1e-3)
        assert metrics["final_loss_steps"] >= 1 and math.isfinite(metrics["final_train_loss"])
        assert metrics["optimizer"] == "adamw_torch" and metrics["optimizer_requested"] == "paged_adamw_32bit"
        # TRL casts a quantised model's adapters to bf16; the stage keeps both arms in fp32.
        assert metrics["adapter_dtypes"] == ["float32"]
        assert metrics["cuda_allocator"] == "torch's default" and metrics["cublas_workspace"] == "torch's default"
        # Python's collector: not frozen (train.gc_freeze off), its collections timed
        assert (
            metrics["python_gc"]["frozen_objects"] is None and metrics["python_gc"]["by_generation"]["0"]["count"] > 0
        )
    by_key = {(m["method"], m["learning_rate"]): m for m in trained}
    for lr in tiny_config["grid"]["learning_rate"]:
        lora, qlora = by_key[("lora", lr)], by_key[("qlora", lr)]
        assert qlora["model_footprint_bytes"] < 0.5 * lora["model_footprint_bytes"]
        # Fair arms: one initial adapter per seed, shared by both methods.
        assert qlora["init_adapter_sha256"] == lora["init_adapter_sha256"]


def test_outputs_per_cell(pipeline_run, tiny_config):
    for cell in cells(pipeline_run):
        with (cell / "loss_curve.csv").open() as handle:
            curve = list(csv.DictReader(handle))
        assert [int(row["step"]) for row in curve] == list(range(1, tiny_config["train"]["max_steps"] + 1))
        assert all(float(row["loss"]) > 0 for row in curve)
        # one log line per step here: the per-step losses kept on the device are the logged ones
        losses = read_json(cell / "metrics.json")["micro_batch_losses_this_run"]
        assert losses == pytest.approx([float(row["loss"]) for row in curve], abs=1e-6)
        assert any(p.name.startswith("events.out.tfevents") for p in (cell / "tensorboard").iterdir())
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (cell / "adapter").iterdir()}
    assert not (pipeline_run / "checkpoints").exists() or not any((pipeline_run / "checkpoints").iterdir())


def test_adapters_load_in_vanilla_peft_and_have_learnt(pipeline_run, base_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for cell in cells(pipeline_run):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), cell / "adapter")
        assert model.peft_config["default"].r == 64
        weights = load_file(cell / "adapter" / "adapter_model.safetensors")
        lora_b = [w for name, w in weights.items() if "lora_B" in name]
        assert lora_b and all(torch.count_nonzero(w) > 0 for w in lora_b)  # B starts at zero


def test_qlora_gradients_survive_an_eval_forward(pipeline_run, base_model_dir):
    """Regression: bitsandbytes 0.50.2 on CPU gave zero gradients after an eval-mode forward."""
    from peft import PeftModel

    from modeling import load_base_model

    init = next((pipeline_run / "init_adapter").glob("r64*_s1"))
    model = PeftModel.from_pretrained(load_base_model(base_model_dir, "qlora", torch.float32), init, is_trainable=True)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    model(ids, labels=ids).loss.backward()
    # lora_B gets the first gradients (lora_A's are zero while B is still zero).
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def _copy_upstream(src, dst):
    for part in ("model", "data", "init_adapter"):
        shutil.copytree(src / part, dst / part, copy_function=shutil.copy2)


def test_killed_training_resumes_from_its_checkpoint(pipeline_run, tiny_config, tmp_path):
    config = dict(
        tiny_config,
        train=dict(tiny_config["train"], max_steps=8, save_steps=2),
        grid=dict(tiny_config["grid"], method=["qlora"], learning_rate=[2e-4]),
        resources=dict(tiny_config["resources"], threads=2),  # the only job: both cores
    )
    config_path = tmp_path / "resume.yaml"
    config_path.write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    _copy_upstream(pipeline_run, results)
    (target,) = Paramspace(grid_table(config["grid"]), filename_params="*").instance_patterns
    metrics_file = results / "train" / target / "metrics.json"
    command = [
        str(BIN / "snakemake"),
        "--configfile",
        str(config_path),
        "--config",
        f"results_dir={results}",
        "--cores",
        "2",
        str(metrics_file),
    ]
    job = subprocess.Popen(
        command, cwd=PROJECT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = results / "checkpoints" / target
    deadline = time.time() + 600
    while not (checkpoints / "checkpoint-4" / "trainer_state.json").is_file() and time.time() < deadline:
        assert job.poll() is None, "training ended before it could be killed"
        time.sleep(0.5)
    os.killpg(job.pid, signal.SIGKILL)  # as a SLURM time limit's final kill would
    job.wait()
    assert not metrics_file.exists()
    saved = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert 4 <= saved < 8

    snakemake("--unlock", config=config_path, results_dir=results)
    snakemake("--cores", "2", "--rerun-incomplete", str(metrics_file), config=config_path, results_dir=results)
    metrics = read_json(metrics_file)
    assert metrics["resumed_from_step"] >= 4
    assert metrics["global_steps"] == 8
    log = (results / "logs" / "train" / f"{target}.log").read_text()
    assert "resuming from" in log
    with (results / "train" / target / "loss_curve.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 9))


def test_same_cell_same_seed_gives_identical_loss_curve(pipeline_run, tiny_config, tmp_path):
    settings = dict(tiny_config["train"], max_steps=3)
    curves = []
    for run in ("a", "b"):
        out = tmp_path / run
        train_qlora_cell(pipeline_run, tiny_config["data"]["max_length"], settings, out)
        with (out / "loss.csv").open() as handle:  # step timings differ between runs, the curve must not
            curves.append([(r["step"], r["loss"], r["learning_rate"], r["grad_norm"]) for r in csv.DictReader(handle)])
    assert curves[0] == curves[1]
    assert len(curves[0]) == 3


def test_layerwise_checkpointing_and_padding_free_keep_the_loss_curve(pipeline_run, tiny_config, tmp_path):
    """Checkpointing every 2nd layer and the padding-free collator change memory and speed,
    not the maths: same tokens, same losses (float32 on the CPU) within 1e-3 relative."""
    runs = {}
    for name, every, padding_free in (("reference", 1, False), ("optimised", 2, True)):
        settings = dict(tiny_config["train"], max_steps=3, checkpoint_every=every, padding_free=padding_free)
        out = tmp_path / name
        runs[name] = train_qlora_cell(pipeline_run, tiny_config["data"]["max_length"], settings, out)
        with (out / "loss.csv").open() as handle:
            runs[name]["curve"] = [
                (int(r["step"]), float(r["loss"]), int(r["step_tokens"])) for r in csv.DictReader(handle)
            ]
    reference, optimised = runs["reference"], runs["optimised"]
    assert (reference["checkpointed_layers"], optimised["checkpointed_layers"]) == (30, 15)  # SmolLM2: 30 layers
    assert optimised["padding_free"] and not reference["padding_free"]
    assert [s for s, _, _ in reference["curve"]] == [s for s, _, _ in optimised["curve"]] == [1, 2, 3]
    for (_, loss_a, tokens_a), (_, loss_b, tokens_b) in zip(reference["curve"], optimised["curve"], strict=True):
        assert tokens_a == tokens_b  # the same examples, no padding counted
        assert abs(loss_a - loss_b) <= 1e-3 * loss_a
    # The memory model predicted more memory for fewer checkpointed layers.
    assert optimised["predicted_peak_bytes"] > reference["predicted_peak_bytes"]


def test_partial_checkpoint_is_discarded(tmp_path):
    """A job killed while saving leaves a checkpoint without trainer_state.json: never resume from it."""
    import logging

    signature = {"cell": "x"}
    checkpoints = tmp_path / "ckpt"
    resume.prepare_checkpoints(checkpoints, signature, logging.getLogger("test"))
    (checkpoints / "checkpoint-2").mkdir()
    (checkpoints / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (checkpoints / "checkpoint-4").mkdir()  # killed mid-save
    (checkpoints / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"partial")
    resumed = resume.prepare_checkpoints(checkpoints, signature, logging.getLogger("test"))
    assert resumed and resumed.endswith("checkpoint-2")
    assert resume.progress_at(resumed) == (0, 2) and resume.progress_at(None) == (0, 0)  # (tokens, step)
    assert not (checkpoints / "checkpoint-4").exists()
    # Checkpoints made under other settings are discarded, never resumed.
    assert resume.prepare_checkpoints(checkpoints, {"cell": "y"}, logging.getLogger("test")) is None


def test_a_reader_never_sees_a_partial_run_signature(tmp_path):
    """prepare_checkpoints replaces the run signature whole: a process reading it meanwhile (another
    rank of a data-parallel job; CI once caught rank 1 reading an empty one) sees the old or the
    new settings, never a truncated file."""
    import json
    import logging
    import threading

    checkpoints = tmp_path / "ckpt"
    signature = {"cell": "x", "train": {f"key_{i}": i for i in range(2000)}}
    resume.prepare_checkpoints(checkpoints, signature, logging.getLogger("test"))
    path = checkpoints / resume.SIGNATURE_FILE
    partial, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                json.loads(path.read_text())
            except (ValueError, FileNotFoundError):  # a truncated file, or none between two writes
                partial.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(300):
            resume.prepare_checkpoints(checkpoints, signature, logging.getLogger("test"))
    finally:
        done.set()
        reader.join()
    assert not partial, f"{len(partial)} reads of a partial run signature"
    assert sorted(p.name for p in checkpoints.iterdir()) == [resume.SIGNATURE_FILE]  # no temporary left


def test_launch_command_runs_one_process_per_gpu(tmp_path):
    command = train.launch_command(4, tmp_path / "arguments.json")
    assert command[:3] == [train.sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-3:] == [str(PROJECT / "scripts" / "train.py"), "--arguments-json", str(tmp_path / "arguments.json")]


def test_accumulation_is_shared_among_processes():
    assert train.per_process_accumulation({"gradient_accumulation_steps": 8}, 2) == 4
    assert train.per_process_accumulation({"gradient_accumulation_steps": 3}, 1) == 3
    try:
        train.per_process_accumulation({"gradient_accumulation_steps": 3}, 2)
    except ValueError as error:
        assert "'train.gradient_accumulation_steps' (3)" in str(error) and "'resources.gpus_per_job' (2)" in str(error)
    else:
        raise AssertionError("an indivisible accumulation was accepted")


def test_two_processes_train_on_the_same_examples_as_one_with_accumulation(pipeline_run, tiny_config, tmp_path):
    """Data-parallel launch for real (torchrun, gloo on the CPU): 2 processes x 1 micro-batch
    see, step by step, the examples of 1 process x 2 micro-batches, with the same losses."""
    settings = dict(tiny_config["train"], max_steps=3, batch_size=2, gradient_accumulation_steps=2)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        runs[processes] = train_qlora_cell(
            pipeline_run,
            tiny_config["data"]["max_length"],
            settings,
            out,
            log_path=out / "train.log",
            processes=processes,
        )
        with (out / "loss.csv").open() as handle:
            runs[processes]["curve"] = [(int(r["step_tokens"]), float(r["loss"])) for r in csv.DictReader(handle)]
    one, two = runs[1], runs[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["gradient_accumulation_steps_per_process"], two["gradient_accumulation_steps_per_process"]) == (2, 1)
    assert len(two["per_process_memory"]) == 2
    assert two["train_tokens_seen"] == one["train_tokens_seen"] and two["global_steps"] == 3
    for (tokens_one, loss_one), (tokens_two, loss_two) in zip(one["curve"], two["curve"], strict=True):
        assert tokens_one == tokens_two  # the same examples in each optimizer step
        assert abs(loss_one - loss_two) <= 1e-3 * loss_one
    assert '"processes": 2' in (tmp_path / "p2" / "train.log").read_text()  # the first process wrote the log


ALLOCATOR_PROBE = """
import sys, torch
sys.path.insert(0, "scripts")
from runtime import set_cuda_allocator
print(set_cuda_allocator(sys.argv[1] == "on"))
getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)  # absent in torch 2.11
print(getter() if getter else "(this torch does not say)")
"""


@pytest.mark.parametrize(
    "environment, expandable, said, in_force",
    [
        ({}, "on", "PYTORCH_ALLOC_CONF=expandable_segments:True", "expandable_segments:True"),
        ({}, "off", "torch's default", ""),
        # A user's setting, under either name, is left alone.
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}, "on", "(from the environment)", "max_split_size_mb:64"),
        (
            {"PYTORCH_ALLOC_CONF": "expandable_segments:False"},
            "on",
            "(from the environment)",
            "expandable_segments:False",
        ),
    ],
)
def test_allocator_settings_reach_torch_unless_the_user_set_them(environment, expandable, said, in_force):
    """train.expandable_segments: torch's allocator (imported first, as in the stage) ends up with the
    setting, in a fresh process as the stage's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    done = subprocess.run(
        [str(BIN / "python"), "-c", ALLOCATOR_PROBE, expandable],
        env=env | environment,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    )
    answer, settings = done.stdout.splitlines()
    if settings == "(this torch does not say)":
        pytest.skip(f"torch {torch.__version__} has no getter for its allocator's settings")
    assert said in answer and settings == in_force
