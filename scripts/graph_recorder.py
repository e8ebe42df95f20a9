"""Recording ahead (``train.cuda_graphs_capture: ahead``): a thread that records the CUDA graphs
of the batch shapes an epoch will meet while the training loop replays the recorded ones.

Why a thread: a recording is ~0.5-0.9 s of host work at the 7B shape (the captured forward and
backward's Python and launches), and in the training loop the GPU waits for it. The training
loop cannot get ahead of the GPU to hide it: a replay holds the host in cudaGraphLaunch until
the previous launch of the same graph is done (steps 6-9 of a batch-4 epoch: 0.29 s per launch,
the step's GPU time; bench/results/epochs_h200_capture), so the host leads by a step at most.
While the loop waits there (without the GIL), this thread records. Not in cudaGraphLaunch, though:
it waits holding the driver, and the thread's captured launches stalled as long
(bench/results/profile_recorder_h200); while the thread runs, the loop waits for its previous
replay on an event instead (cuda_graphs.GraphedSteps.step).

The shapes come from the rows' lengths (``padded_shapes``), longest first (group_by_length puts
the longest batch first, and a long recording needs the most host time). One forward/backward
runs on the host at a time (GraphedSteps.lock); the thread takes no new shape while the loop
waits for the lock (``main_waiting``: the loop's eager steps and its own recordings, of a shape
the thread has not reached), but a capture under way finishes first. The thread starts after
the loop's first recording (the first batch's shape), warms up beside the replays and records;
the loop's later recordings wait for the warm-up to end. With ``train.cuda_graphs_loop_ahead``
the loop first records the next shapes itself, one after each of its first replays, while the
GPU runs it (``Recorder.after_replay``), and the thread starts on the rest. A failed warm-up or
background capture stops the thread (``failure``, in the graph summary); the loop records the
remaining shapes itself.

What a background capture needs that the loop's does not (each found on an H200,
bench/results/epochs_h200_recorder_1 and epochs_h200_recorder):
- The thread's first CUDA work outside any capture (``warm_up_libraries``): its first capture
  failed at once otherwise, most likely on the per-thread cuBLAS/cuDNN handles its first matmul
  creates.
  A failed capture leaves the default generator in capture mode, and every later random draw
  raises "Offset increment outside graph capture encountered unexpectedly" (the error an earlier
  sitting took for the cause, bench/results/epochs_h200_ahead).
- Saved tensors kept through identity hooks (cuda_graphs.GraphedSteps._record): the main
  thread's optimizer updates the adapters in place between a capture's forward and backward.
- A generator state of its own per recording (``own_random_state``; the loop's recordings too
  when recording ahead, so that a shape's masks do not depend on which thread won the race):
  torch 2.11's generator keeps one capture state, and every capture puts the default
  generator's in capture mode; a replay of another graph drawing from that state on the main
  thread would then fail (torch's CUDAGeneratorState::increase). The replays of other graphs
  advance their own states, never the capturing one. The dropout masks come from those Philox
  streams (seeded from the run's seed and the shape), not from the default generator's
  sequence: the same distribution, other draws, so a run recorded ahead is reproducible (the
  dropout test's last step 4.8e-6 apart in 2 of 4 sittings, cause not separated) but not
  bit-equal to one recorded in the loop (without dropout it is: tests/test_graph_recorder.py on a GPU).
  Those states are not in a checkpoint: a resumed run starts each shape's stream afresh.

Measured on one H200 at batch 4, multiples of 128, after a warm-up: 42.1-44.9 s against
44.4-45.7 s recorded in the loop (2.70-2.85x the tutorial's; bench/results/epochs_h200_recorder_event,
epochs_h200_ahead_warm_b4, epochs_h200_launch_queues*); at batch 1 nothing consistent
(epochs_h200_ahead_warm_b1, epochs_h200_recorder_split_b1, epochs_h200_launch_queues_b1): off by
default. The thread lags at the first new shapes (its recordings 0.66-1.89 s, the loop's own
0.48-0.74 s; the loop waited 2.2-3.0 s). Not for CUDA's launch queues: under the profiler the
loop's launches sat in full queues and the thread stood still until each returned (torch's replay
releases the GIL: a lock in the driver; profile_recorder_queues_h200_*,
trace_stalls_recorder_backward_h200), but in the epochs a replay's launch beside the thread took
2 ms (``launch_seconds_median``), and 4x queues set before CUDA started changed neither the lag
nor the epoch (epochs_h200_launch_queues_env_b4). Nor Python's collector (with the heap frozen
the thread lagged as much, epochs_h200_gc_b4), nor the GIL's switch interval (0.5 ms instead of
5 ms while the thread ran, removed: epochs_h200_switch_b4). About half of each capture is its
backward (``captured_backward_seconds``, 43-55 %). Its
captures take more CPU time on its thread than the loop's (0.19-0.75 s against 0.15-0.22 s,
``captured_cpu_seconds``) and wait longer besides; the cause is not separated. Replaying a longer
recorded shape instead of waiting for the thread cost more than the wait (epochs_h200_padded_b4),
and again, up to the batch's coarse shape only (``cuda_graphs_pad_up``, removed): no gain with
the loop's recordings ahead, slower at multiples of 32 (epochs_h200_pad_up).
"""

import contextlib
import threading
import time

import torch


def padded_shapes(lengths, batch: int, multiple: int | None, max_length: int | None) -> list[tuple[int, int]]:
    """Every batch shape the collator can make of rows of these lengths, longest first: a batch
    is as long as its longest row, truncated at ``max_length``, padded up to ``multiple``."""
    multiple = multiple or 1
    seqs = {-(-min(n, max_length or n) // multiple) * multiple for n in lengths}
    return [(batch, seq) for seq in sorted(seqs, reverse=True)]


@contextlib.contextmanager
def own_random_state(device: torch.device, shape: tuple[int, ...]):
    """The default CUDA generator draws from a fresh state while this thread captures: the graph
    registers that state (capture_begin registers the default generator's), and its replays
    advance it alone. Seeded from the default generator's seed and the batch ``shape``: the same
    draws in every run, whichever thread records the shape."""
    default = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    own = torch.Generator(device=device)
    offset = 1 + sum(size * 65_537**place for place, size in enumerate(shape))
    own.manual_seed((default.initial_seed() + offset) % 2**63)
    saved = default.graphsafe_get_state()
    default.graphsafe_set_state(own)
    try:
        yield
    finally:
        default.graphsafe_set_state(saved)


class Recorder:
    """Records ``shapes`` for ``graphs`` (a cuda_graphs.GraphedSteps) on a thread of its own, with
    placeholder batches (a recording holds buffers, not values)."""

    def __init__(self, graphs, shapes: list[tuple[int, int]], loop_ahead: int = 0):
        self.graphs = graphs
        self.shapes = list(shapes)
        self.loop_ahead = loop_ahead  # shapes the loop records itself before the thread starts
        self.recorded_in_loop: list[list[int]] = []  # of those, the ones it recorded
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the main thread raises it at its next step
        self.stopping = False
        self.failure: str | None = None  # a capture that failed: the thread stopped there
        self.recorded: list[list[int]] = []  # shapes this thread recorded
        self.warmed = threading.Event()  # the thread's handles exist (or it ended)
        self.recording_args: tuple | None = None  # (num_items dtype, loss_fn), set by start()

    def start(self, num_items_dtype, device, loss_fn) -> None:
        """After the loop's first replay (of the first batch's shape, recorded by the loop) and its
        recordings ahead (``after_replay``): the thread starts, warms up beside the replays and
        records the other shapes. Once. Nothing runs beside the run's first step or the loop's
        first recording: with the warm-up beside the first (eager) step, that recording failed at
        once on the 7B shape (bench/results/epochs_h200_ahead_b4)."""
        if self.thread is not None:
            return
        self.recording_args = (num_items_dtype, loss_fn)
        self.thread = threading.Thread(target=self._run, args=(device,), name="cuda-graph-recorder", daemon=True)
        self.thread.start()

    def after_replay(self, num_items_dtype, device, loss_fn) -> None:
        """The loop's replay is launched; called after each one until the thread starts. With
        ``loop_ahead``, the loop first records the next shapes itself, one after each replay, while
        the GPU runs that replay (a capture launches nothing), then starts the thread on the rest.
        Why: the thread records a shape in 1.0-1.6 s (its first in 1.5-1.95 s) where the loop takes
        0.3-0.5 s, and the first megabatch needs the next shape after 3-8 replays: without a head
        start the loop waited for it at each of its first shapes (1.5-2.4 s an epoch at batch 4,
        bench/results/epochs_h200_shipped). With 2 on one H200 it never waited, but each recording
        (0.5 s of host work beside a 0.29 s replay) cost most of what it saved: the epoch 0.3 s
        shorter (bench/results/epochs_h200_loop_ahead)."""
        graphs = self.graphs
        if len(self.recorded_in_loop) < self.loop_ahead and graphs.checkpointed_eager_reason is None:
            shape = self.next_shape(num_items_dtype)
            if shape is not None:
                inputs, num_items = placeholder_batch(*shape, num_items_dtype, device)
                with graphs.exclusive():
                    key = (shape, num_items_dtype)
                    if graphs.record(key, inputs, num_items, loss_fn, synchronized=False) is not None:
                        self.recorded_in_loop.append(list(shape))
                if len(self.recorded_in_loop) < self.loop_ahead and not graphs.off_reason:
                    return  # the next one after the next replay
        self.start(num_items_dtype, device, loss_fn)

    def next_shape(self, num_items_dtype) -> tuple[int, int] | None:
        """The first of ``shapes`` not recorded yet that a recording serves (within max_tokens)."""
        graphs = self.graphs
        for batch, seq in self.shapes:
            if graphs.serves(batch, seq) and ((batch, seq), num_items_dtype) not in graphs.recordings:
                return batch, seq
        return None

    def wait_warm(self) -> None:
        """The loop's later captures never run beside the thread's warm-up (its libraries' set-up)."""
        if self.thread is not None:
            self.warmed.wait()

    @property
    def running(self) -> bool:
        """The thread has started and not ended (warming up or recording)."""
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        """End of training: the thread finishes the capture under way and records no more."""
        self.stopping = True
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:  # raised after the last step: no step left to raise it
            self.graphs.logger.warning("The CUDA graph recorder thread failed: %r", self.error)

    def _run(self, device) -> None:
        graphs = self.graphs
        try:
            try:
                warm_up_libraries(device, graphs.attention)
            except RuntimeError as error:  # the loop records every shape itself, as after a failed capture
                self.failure = f"warm-up failed: {str(error).splitlines()[0][:300]}"
                graphs.logger.warning("Recording ahead stopped: %s", self.failure)
                return
            self.warmed.set()
            num_items_dtype, loss_fn = self.recording_args
            for batch, seq in self.shapes:
                if not graphs.serves(batch, seq):
                    continue
                while graphs.main_waiting and not self.stopping:
                    time.sleep(0.001)
                key = ((batch, seq), num_items_dtype)
                with graphs.lock:
                    if self.stopping or graphs.off_reason or self.failure:
                        return
                    if key in graphs.recordings:
                        continue
                    inputs, num_items = placeholder_batch(batch, seq, num_items_dtype, device)
                    if graphs.record(key, inputs, num_items, loss_fn, background=True):
                        self.recorded.append([batch, seq])
        except BaseException as error:
            self.error = error
        finally:
            self.warmed.set()


def warm_up_libraries(device, attention: str) -> None:
    """This thread's first calls into cuBLAS, cuBLASLt and cuDNN, outside any capture: each creates
    its per-thread handle (device allocations a capture cannot hold) at a thread's first call;
    without a warm-up the recorder's first capture failed at once on the H200
    (bench/results/epochs_h200_recorder_1). Small operands, no model, no random numbers: it runs
    beside the loop's replays without the lock. (The sittings up to
    bench/results/epochs_h200_recorder_event warmed up with a forward of the model under the lock:
    the thread then lagged the loop at the first new shapes. Run beside the first, eager step
    instead, the loop's first recording then failed, bench/results/epochs_h200_ahead_b4.)"""
    from graph_attention import attention_backends

    if device.type != "cuda":
        return
    torch.cuda.set_device(device)  # a new thread's current device is the first one
    square = torch.ones(128, 128, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        square @ square  # cuBLAS
        torch.addmm(square[0], square, square)  # cuBLASLt (a bias epilogue)
        square.float() @ square.float()
        heads = square.view(1, 1, 128, 128)
        with attention_backends(attention):
            torch.nn.functional.scaled_dot_product_attention(heads, heads, heads, is_causal=True)  # cuDNN
    torch.cuda.synchronize(device)


def placeholder_batch(batch: int, seq: int, num_items_dtype, device) -> tuple[dict, torch.Tensor | None]:
    """A batch of this shape for a recording, which holds buffers, not values."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    num_items = None if num_items_dtype is None else torch.ones((), dtype=num_items_dtype, device=device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids), num_items
