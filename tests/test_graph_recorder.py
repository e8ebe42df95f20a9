"""Recording ahead (train.cuda_graphs_capture: ahead, scripts/graph_recorder.py) and the coarse
shapes (train.cuda_graphs_coarse_multiple) on the tiny random Llama with a real 4-bit base: the
same numbers as the loop's own recordings and as TRL's eager step, failures left to the loop, the
thread's start and stop; the device-only tests (a real graph) run where CUDA is."""

import logging
import math

import pytest
import torch

import recipe
from memory_model import CUBLAS_WORKSPACE_BYTES, predict_peak
from memory_plan import GRAPH_PEAK_FACTOR
from model_shape import ModelShape
from test_recipe import LENGTHS, build_tiny_model, train_tiny


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU the recorder's graphs draw their dropout from states of their own: "
    "test_recording_ahead_records_what_the_training_loop_records compares them without dropout",
)
def test_recording_ahead_trains_like_the_eager_step(tmp_path, monkeypatch):
    """train.cuda_graphs_capture ahead: a thread records every shape the rows make, longest first,
    while the steps replay; the numbers stay those of the eager steps, and each shape keeps its
    plan's layers (its recording sets them): the same as recording each shape at its first batch."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    model_dir = build_tiny_model(tmp_path / "model", layers=3)
    shape = ModelShape.from_config(model_dir)
    recipe_args = dict(method="qlora", rank=8, targets="qv", kernels="none", double_quant=False, paged_optimizer=False)
    recipe_args.update(graph_capture="ahead")  # the recorded-ahead run's count of cuBLAS workspaces
    short = predict_peak(shape, checkpoint_every=0, seq=64, batch=2, **recipe_args)["total"]
    two = predict_peak(shape, checkpoint_every=0, checkpointed_layers=2, seq=320, batch=2, **recipe_args)["total"]
    budget_gib = (max(short, two) * GRAPH_PEAK_FACTOR + 1) / 1024**3  # a recording's headroom too
    settings = dict(pad_to_multiple_of=16, logging_steps=1, gradient_checkpointing="auto", memory_budget_gib=budget_gib)
    settings.update(recompute_lora_dropout=True, cuda_graphs=True)
    ahead, plan, trainer = train_tiny(model_dir, tmp_path / "a", LENGTHS, cuda_graphs_capture="ahead", **settings)
    # without the recorder thread's two cuBLAS workspaces (memory_model.CUBLAS_WORKSPACES): the same room
    fewer_workspaces = dict(
        settings, memory_budget_gib=budget_gib - 2 * CUBLAS_WORKSPACE_BYTES * GRAPH_PEAK_FACTOR / 1024**3
    )
    at_first_batch, plan_at_first_batch, _ = train_tiny(model_dir, tmp_path / "b", LENGTHS, **fewer_workspaces)
    eager, _, _ = train_tiny(model_dir, tmp_path / "c", LENGTHS, **dict(settings, cuda_graphs=False))
    summary = trainer.graphs.summary()
    recorder = trainer.graphs.recorder
    assert recorder.shapes == [(2, 320), (2, 304), (2, 288), (2, 64), (2, 48), (2, 32)]
    assert recorder.stopping and not recorder.thread.is_alive()  # stopped with the training
    assert summary["recorder_failure"] is None
    # the first step eager, every other batch's shape recorded by one of the two threads
    assert summary["eager_reasons"] == {"first step": 1} and summary["replayed_steps"] == 5
    assert sorted(summary["shapes_recorded"]) == [[2, 32], [2, 48], [2, 64], [2, 288], [2, 304], [2, 320]]
    assert summary["recorded_ahead"] and set(map(tuple, summary["recorded_ahead"])) <= set(recorder.shapes)
    assert [2, 320] not in summary["recorded_ahead"]  # the loop's first recording, before the thread starts
    assert plan.summary() == plan_at_first_batch.summary() == {"0": 3, "2": 3}  # long batches recompute 2 layers
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert len(ahead) == len(at_first_batch) == len(eager) == 6
    for ours, first, theirs in zip(ahead, at_first_batch, eager, strict=True):
        assert {k: ours[k] for k in keys} == {k: first[k] for k in keys} == {k: theirs[k] for k in keys}


# the recorder tests' settings on the CPU (GraphedSteps.replay_on_cpu)
CPU_GRAPHS = dict(pad_to_multiple_of=16, logging_steps=1, recompute_lora_dropout=True, cuda_graphs=True)


def recorded_ahead_and_eager(tiny_model, tmp_path) -> tuple[dict, list[dict], list[dict]]:
    """The tiny run recorded ahead on the CPU and trained eagerly: the graph summary of the first,
    and each run's logged values per step."""
    ahead, _, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, cuda_graphs_capture="ahead", **CPU_GRAPHS)
    eager, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **dict(CPU_GRAPHS, cuda_graphs=False))
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    values = [[{k: h[k] for k in keys} for h in history] for history in (ahead, eager)]
    return trainer.graphs.summary(), *values


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's recordings (a failure made up on the CPU)")
def test_a_failed_background_recording_leaves_the_shapes_to_the_loop(tiny_model, tmp_path, monkeypatch):
    """A background capture that fails stops the recorder thread, says why in the graph summary,
    and leaves the graphs on: the loop records the remaining shapes itself, the same numbers."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    record = cuda_graphs.GraphedSteps._record

    def failing(self, inputs, num_items, loss_fn, background, synchronized):
        if background:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return record(self, inputs, num_items, loss_fn, background, synchronized)

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "_record", failing)
    summary, ahead, eager = recorded_ahead_and_eager(tiny_model, tmp_path)
    assert summary["recorder_failure"].startswith("recording failed at batch shape (2, ")  # the first it tried
    assert "operation failed due to a previous error during capture" in summary["recorder_failure"]
    assert summary["off_reason"] is None and summary["recorded_ahead"] == []
    assert summary["eager_reasons"] == {"first step": 1} and summary["replayed_steps"] == 5  # the loop's recordings
    assert ahead == eager


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's recordings")
def test_coarse_shapes_serve_the_first_batches_with_the_same_numbers(tmp_path, monkeypatch):
    """train.cuda_graphs_coarse_multiple 32 over the collator's 16, for the first 4 batches: the
    2 x 304 batch replays the 2 x 320 recording padded further (no 304 recorded), the 2 x 48 one
    after them its own; without dropout the values of the eager steps. Recording ahead, the
    thread takes the coarse shapes first."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    model_dir = build_tiny_model(tmp_path / "model", dropout=0.0)
    settings = dict(CPU_GRAPHS, cuda_graphs_coarse_multiple=32, cuda_graphs_coarse_steps=4)
    coarse, _, trainer = train_tiny(model_dir, tmp_path / "a", LENGTHS, **settings)
    eager, _, _ = train_tiny(model_dir, tmp_path / "b", LENGTHS, **dict(CPU_GRAPHS, cuda_graphs=False))
    summary = trainer.graphs.summary()
    # batches 48 (eager), 320, 64, 304 -> 320 (coarse), then 48, 320 as they are
    assert summary["shapes_recorded"] == [[2, 320], [2, 64], [2, 48]]
    assert summary["coarse_replays"] == 3 and summary["replayed_steps"] == 5
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert len(coarse) == 6
    # The positions added are masked out of every value: bit for bit, but for the loss, a sum over the
    # longer padded row in another order: one float32 ulp apart at the padded step on an AVX-512 CPU
    # (6.9e-8 relative; equal bit for bit on the CPU this was first run on)
    assert [{k: h[k] for k in keys if k != "loss"} for h in coarse] == [
        {k: h[k] for k in keys if k != "loss"} for h in eager
    ]
    assert [h["loss"] for h in coarse] == pytest.approx([h["loss"] for h in eager], rel=2e-7, abs=0)
    _, _, ahead = train_tiny(model_dir, tmp_path / "c", LENGTHS, **dict(settings, cuda_graphs_capture="ahead"))
    assert ahead.graphs.recorder.shapes == [(2, 320), (2, 288), (2, 64), (2, 32), (2, 304), (2, 48)]


def test_the_recorder_runs_until_it_is_stopped():
    """``Recorder.running`` (the loop waits for its previous replay on an event while it is true)
    holds from start() until the thread ends: here the thread cannot record while the loop holds
    the lock, and stop(), called meanwhile, ends it once the lock is free, before it records
    anything."""
    import threading

    import cuda_graphs
    import graph_recorder

    graphs = cuda_graphs.GraphedSteps([], None, logging.getLogger("test"), None, capture="ahead")
    recorder = graph_recorder.Recorder(graphs, [(2, 16)])
    assert not recorder.running
    with graphs.lock:  # the loop's own recording under way
        recorder.start(None, torch.device("cpu"), loss_fn=None)
        recorder.warmed.wait()
        assert recorder.running  # nothing to end it: not stopped, and the shape needs the lock
        stopper = threading.Thread(target=recorder.stop, daemon=True)
        stopper.start()  # stop() joins the thread, whether it reached the lock or not
    stopper.join(30)
    assert not stopper.is_alive() and not recorder.running
    assert recorder.recorded == [] and recorder.error is None


def thread_starts(monkeypatch) -> list:
    """Each start of a recorder thread, as (eager steps, replayed steps, shapes recorded) then."""
    import graph_recorder

    begun, run = [], graph_recorder.Recorder._run

    def observed(self, device):
        graphs = self.graphs
        begun.append((graphs.eager_steps, graphs.replayed_steps, [key[0] for key in graphs.recordings]))
        return run(self, device)

    monkeypatch.setattr(graph_recorder.Recorder, "_run", observed)
    return begun


def test_the_recorder_thread_starts_after_the_first_step_and_the_loops_first_recording(
    tiny_model, tmp_path, monkeypatch
):
    """Nothing of the recorder runs beside the run's first (eager) step or the loop's first
    recording: with its warm-up beside the first step, that recording failed at once on the 7B
    shape on an H200 (bench/results/epochs_h200_ahead_b4). The thread begins with one eager step
    done and the first batch's shape recorded by the loop, and records the others."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    begun = thread_starts(monkeypatch)
    _, _, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, cuda_graphs_capture="ahead", **CPU_GRAPHS)
    assert begun == [(1, 0, [(2, 320)])]  # the eager step, the first replay launched (counted after it)
    summary = trainer.graphs.summary()
    assert summary["recorder_failure"] is None and summary["eager_reasons"] == {"first step": 1}
    # the others, by the thread unless the loop reached one first (on the CPU its replays race it)
    assert summary["recorded_ahead"] and [2, 320] not in summary["recorded_ahead"]
    assert summary["replayed_steps"] == 5


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the CPU's recordings: on a GPU the loop's recordings draw their own dropout masks when recording ahead",
)
def test_the_loop_records_the_next_shapes_before_the_thread_starts(tiny_model, tmp_path, monkeypatch):
    """train.cuda_graphs_loop_ahead 2: after its first replay and after its second, the loop records
    the next shape of the thread's list not yet recorded itself (2 x 304, then 2 x 288); the thread
    starts after them and records none of them; the numbers stay those of the eager steps."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    begun = thread_starts(monkeypatch)
    record, captures = cuda_graphs.GraphedSteps._record, []

    def kept(self, inputs, num_items, loss_fn, background, synchronized):
        captures.append((tuple(inputs["input_ids"].shape), background, synchronized))
        return record(self, inputs, num_items, loss_fn, background, synchronized)

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "_record", kept)
    settings = dict(CPU_GRAPHS, cuda_graphs_capture="ahead", cuda_graphs_loop_ahead=2)
    ahead, _, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, **settings)
    eager, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **dict(CPU_GRAPHS, cuda_graphs=False))
    # started during the second replayed step (counted after this hook): the loop recorded its two
    # batches' shapes (2 x 320, then 2 x 64) and after each replay the next of the list
    assert begun == [(1, 1, [(2, 320), (2, 304), (2, 64), (2, 288)])]
    summary = trainer.graphs.summary()
    assert summary["recorded_ahead_in_loop"] == [[2, 304], [2, 288]]
    assert not {(2, 304), (2, 288), (2, 320)} & set(map(tuple, summary["recorded_ahead"]))
    assert summary["recorder_failure"] is None and summary["replayed_steps"] == 5
    # the loop's recordings ahead begin without waiting for the GPU, its own batches' after it
    in_loop = [(shape, synchronized) for shape, background, synchronized in captures if not background]
    assert in_loop[:4] == [((2, 320), True), ((2, 304), False), ((2, 64), True), ((2, 288), False)]
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert [{k: h[k] for k in keys} for h in ahead] == [{k: h[k] for k in keys} for h in eager]


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the CPU's recordings: on a GPU the loop's recordings draw their own dropout masks when recording ahead",
)
def test_a_failed_warm_up_leaves_every_shape_to_the_loop(tiny_model, tmp_path, monkeypatch):
    """The recorder's warm-up failing (a library's set-up on its thread) stops recording ahead, says
    why, and the run trains on: the loop records every shape itself, the same numbers as eager."""
    import cuda_graphs
    import graph_recorder

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)

    def failing(device, attention):
        raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setattr(graph_recorder, "warm_up_libraries", failing)
    summary, ahead, eager = recorded_ahead_and_eager(tiny_model, tmp_path)
    assert summary["recorder_failure"] == "warm-up failed: CUDA error: out of memory"
    assert summary["off_reason"] is None and summary["recorded_ahead"] == [] and summary["replayed_steps"] == 5
    assert ahead == eager


GPU_GRAPHS = dict(cuda_graphs=True, gradient_checkpointing=True, recompute_lora_dropout=True, logging_steps=1)
GPU_GRAPHS.update(pad_to_multiple_of=16, compute_dtype="bfloat16", optimizer="adamw_torch_fused")


def recorder_joined_at(step: int, monkeypatch):
    """A callback that waits at the end of ``step`` until the recorder thread has recorded every
    shape (recipe.make_trainer patched to keep the trainer it builds)."""
    from transformers import TrainerCallback

    built = []
    make_trainer = recipe.make_trainer
    monkeypatch.setattr(recipe, "make_trainer", lambda *a, **k: built.append(make_trainer(*a, **k)) or built[-1])

    class JoinRecorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                built[-1].graphs.recorder.thread.join()

    return JoinRecorder()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device graph needs CUDA")
@pytest.mark.parametrize(
    "loop_ahead, joined_at, in_loop, by_thread",
    [
        (0, 2, [], [[2, 304], [2, 288], [2, 64], [2, 48], [2, 32]]),
        # the loop records 2 x 304 after its first replay, its second batch's 2 x 64, then 2 x 288
        (2, 3, [[2, 304], [2, 288]], [[2, 48], [2, 32]]),
    ],
)
def test_recording_ahead_records_what_the_training_loop_records(
    tmp_path, monkeypatch, loop_ahead, joined_at, in_loop, by_thread
):
    """Without random numbers in the graphs (no dropout), the recorder's device graphs train
    exactly as those recorded at each shape's first batch: the recorder finishes every shape
    during step 2 (a callback waits for it), checkpointed layers included. With
    cuda_graphs_loop_ahead 2 the loop records the next two shapes itself, each captured while the
    GPU runs the replay it launched before (no device synchronisation), and the thread starts in
    step 3: the same values."""
    model_dir = build_tiny_model(tmp_path / "model", dropout=0.0)
    synced, _, _ = train_tiny(model_dir, tmp_path / "b", LENGTHS, **GPU_GRAPHS)
    settings = dict(GPU_GRAPHS, cuda_graphs_capture="ahead", cuda_graphs_loop_ahead=loop_ahead)
    join = recorder_joined_at(joined_at, monkeypatch)
    ahead, _, trainer = train_tiny(model_dir, tmp_path / "a", LENGTHS, callbacks=[join], **settings)
    summary = trainer.graphs.summary()
    assert summary["capture"] == "ahead" and summary["eager_reasons"] == {"first step": 1}
    # every shape the rows make, longest first; the loop records the first batch's (2 x 320) before
    # the thread starts (and with loop_ahead the next two), the thread every other one (the
    # callback waits for it)
    assert trainer.graphs.recorder.shapes == [(2, 320), (2, 304), (2, 288), (2, 64), (2, 48), (2, 32)]
    assert summary["recorded_ahead_in_loop"] == in_loop and summary["recorded_ahead"] == by_thread
    assert len(summary["shapes_recorded"]) == 6 and summary["replayed_steps"] == 5
    # each recording's capture timed on its own thread: its CPU time within its wall time
    pairs = list(zip(summary["captured_cpu_seconds"], summary["captured_seconds"], strict=True))
    assert len(pairs) == 6 and all(0 < cpu <= wall + 1e-3 for cpu, wall in pairs)
    # and its backward's share of the wall time
    backward = summary["captured_backward_seconds"]
    assert len(backward) == 6 and all(0 < b < wall for b, (_, wall) in zip(backward, pairs, strict=True))
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert [{k: h[k] for k in keys} for h in ahead] == [{k: h[k] for k in keys} for h in synced]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device graph needs CUDA")
def test_recorder_coarse_shapes_train_as_each_batchs_own(tmp_path):
    """Device graphs, no dropout: with cuda_graphs_coarse_multiple 32 for the first 4 batches (the
    2 x 304 batch replays the 2 x 320 graph padded further) the values of graphs recorded at each
    batch's own shape, bit for bit (a batch padded further on the card: 0.0 apart,
    bench/results/pytest_cuda_padded.txt)."""
    model_dir = build_tiny_model(tmp_path / "model", dropout=0.0)
    synced, _, _ = train_tiny(model_dir, tmp_path / "b", LENGTHS, **dict(GPU_GRAPHS, pad_to_multiple_of=16))
    settings = dict(GPU_GRAPHS, pad_to_multiple_of=16, cuda_graphs_coarse_multiple=32, cuda_graphs_coarse_steps=4)
    coarse, _, trainer = train_tiny(model_dir, tmp_path / "a", LENGTHS, **settings)
    summary = trainer.graphs.summary()
    assert summary["coarse_replays"] == 3 and summary["shapes_recorded"] == [[2, 320], [2, 64], [2, 48]]
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert [{k: h[k] for k in keys} for h in coarse] == [{k: h[k] for k in keys} for h in synced]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device graph needs CUDA")
def test_recording_ahead_with_dropout_replays_while_the_recorder_captures(tmp_path, monkeypatch):
    """With the folded LoRA dropout every graph draws random numbers; the main thread replays while
    the recorder captures, which torch 2.11's one capture state per generator refused
    (bench/results/epochs_h200_ahead) until each background recording drew from its own
    generator state (graph_recorder.own_random_state). The run trains through on its graphs; the
    recorder has recorded the two shapes no batch reaches (2 x 288, 2 x 32) by the last step. Each
    shape's state is seeded by the shape, whichever thread records it: a second run, with its own
    race between the threads, trains to the same losses: equal at every step but the last, which
    ended 4.8e-6 apart (6.9546919 against 6.9546967) in 2 of 4 sittings on an H200
    (bench/results/pytest_cuda_recorder_event_h200_1.txt, pytest_cuda_ahead_b1.txt; the cause is
    not separated), hence the bound there."""
    model_dir = build_tiny_model(tmp_path / "model")
    settings = dict(GPU_GRAPHS, cuda_graphs_capture="ahead", max_steps=24)
    join = recorder_joined_at(24, monkeypatch)
    history, _, trainer = train_tiny(model_dir, tmp_path / "a", LENGTHS * 4, callbacks=[join], **settings)
    again, _, _ = train_tiny(model_dir, tmp_path / "b", LENGTHS * 4, **settings)
    assert [h["loss"] for h in again][:-1] == [h["loss"] for h in history][:-1]
    assert again[-1]["loss"] == pytest.approx(history[-1]["loss"], abs=1e-5)
    summary = trainer.graphs.summary()
    assert summary["off_reason"] is None and summary["eager_reasons"] == {"first step": 1}
    assert summary["replayed_steps"] == 23 and len(summary["shapes_recorded"]) == 6
    assert {(2, 288), (2, 32)} <= set(map(tuple, summary["recorded_ahead"]))
    assert all(math.isfinite(h["loss"]) for h in history) and len(history) == 24
