"""CUDA graphs for the small-batch training step (``train.cuda_graphs``).

At batch 1 the 7B QLoRA step is bound by kernel launches, not arithmetic: ~3,200 launches
of Python-driven work per step keep an H200 busy a quarter of the time
(bench/results/profile_step_h200_b1.json). A CUDA graph records a step's forward and backward
once per padded batch shape and replays it with one launch; ``pad_to_multiple_of`` keeps the
shapes few (16 at 1024 tokens, multiple 64).

What the graph step changes, and why the numbers stay the same:
- The padding mask is not passed to the model. The collator pads on the right and masks the
  pads' labels, so under causal attention no real token attends to a pad: the loss and every
  gradient are those of the masked batch (attention runs as plain causal, flash kernels).
  Each batch is checked for that layout; a batch without it trains eagerly.
- TRL's fused LM head scores every position and masks afterwards instead of gathering the
  labelled ones first (a data-dependent shape no graph can hold): the same per-token values.
- Gradients accumulate into fixed buffers (a graph writes to fixed addresses); the trainer's
  optimizer step, clipping and scheduler run as usual between replays.
Batches longer than ``train.cuda_graphs_max_tokens`` train eagerly: there the step is bound by
arithmetic, and recorded 2,048 x 4 blocks of the 7B shape trained at 11,534 tok/s against
12,732 eager on an H200 (bench/results/epochs_h200_cudnn, epochs_h200_recorded).
Checkpointed layers are recorded too where their recomputation draws no random numbers
(folded LoRA dropouts hand it their masks: scripts/lora_dropout.py); with PEFT's own dropout
the recomputation restores the RNG state on the host, and those batches train eagerly.
The first step of a run trains eagerly (lazy initialisation stays out of the recordings);
each new shape is recorded at its first batch, then replayed. All graphs share one memory
pool: only one step's activations are alive at a time, as in eager training.
``train.cuda_graphs_capture: ahead`` records the epoch's shapes on a thread of their own while
the GPU replays (scripts/graph_recorder.py says why); one forward/backward runs on the host at a
time (``exclusive``), and a background recording writes its gradients into the fixed buffers
itself (torch.autograd.grad), never into ``.grad``, which the trainer resets between steps.
``train.cuda_graphs_coarse_multiple``: the first ``cuda_graphs_coarse_steps`` batches replay their
shape padded further to that coarser multiple (graph_inputs.padded_to; the same numbers), fewer
shapes to record while the epoch starts; which graph serves a batch depends on its step alone.

tests/test_cuda_graphs.py trains the tiny model through this path (the same static-buffer
function, run without a device graph on the CPU) against TRL's eager step.
"""

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from graph_attention import attention_backends
from graph_inputs import GRAPH_KEYS, padded_to

CAPTURES = ("synchronized", "ahead")  # train.cuda_graphs_capture


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def capture_beside_the_gpu(graph, pool, stream, mode: str):
    """torch.cuda.graph without its entry's device synchronisation and cache flush: the capture
    begins while the GPU still runs the steps queued before it. A capture launches nothing, and
    every graph replays on the loop's stream in its order, so the pool's blocks a running replay
    uses are free to be recorded into the next graph, as in any shared pool."""
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode=mode)
        try:
            yield
        finally:
            graph.capture_end()


@dataclass
class Recording:
    replay: object  # a torch.cuda.CUDAGraph's replay, or the function itself (CPU tests)
    inputs: dict  # static input buffers
    loss: torch.Tensor
    metrics: tuple


class GraphedSteps:
    """Per padded batch shape, one recorded forward + backward; see the module docstring.

    ``step`` returns the loss and TRL's metric tensors of a replayed step, or None when this
    batch trains eagerly (first step, a batch the graphs do not serve, or graphs off)."""

    replay_on_cpu = False  # tests: run the recorded function itself where no device graph exists

    def __init__(
        self,
        parameters,
        off_reason: str | None,
        logger,
        checkpointed_eager_reason: str | None,
        max_tokens: int | None = None,
        attention: str = "cudnn",
        capture: str = "synchronized",
        coarse_multiple: int | None = None,
        coarse_steps: int = 0,
    ):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.grads: list[torch.Tensor] | None = None
        self.recordings: dict[tuple, Recording] = {}
        self.pool = None
        self.logger = logger
        self.warm = False
        self.eager_steps = self.replayed_steps = 0
        self.eager_reasons: dict[str, int] = {}
        self.off_reason = off_reason
        # why checkpointed batches train eagerly (None: they are recorded too)
        self.checkpointed_eager_reason = checkpointed_eager_reason
        self.max_tokens = max_tokens  # longer batches train eagerly (not launch-bound: no gain)
        attention_backends(attention)  # an unknown kernel fails here, before the first step
        self.attention = attention
        if capture not in CAPTURES:
            raise ValueError(f"train.cuda_graphs_capture must be one of {CAPTURES}, not {capture!r}")
        self.capture = capture
        # the first coarse_steps batches replay shapes padded further, to multiples of
        # coarse_multiple: fewer shapes to record while the epoch starts, the finer ones after
        self.coarse_multiple, self.coarse_steps = coarse_multiple, coarse_steps
        self.coarse_replays = 0  # replays of the first coarse_steps batches
        self.prepare = None  # prepare(batch, seq) -> checkpointed layers: set on the model before a recording
        self.stream = None  # the side stream every recording is captured on
        self.lock = threading.Lock()  # one forward/backward on the host at a time
        self.main_waiting = 0  # the main thread waits for the lock: the recorder steps aside
        self.recorder = None  # graph_recorder.Recorder, with capture "ahead"
        self.replayed = torch.cuda.Event() if torch.cuda.is_available() else None  # the last replay's end
        self.waited_seconds = 0.0  # the main thread's wait for a recording under way
        self.recording_seconds: list[float] = []  # host time of each recording (capture and instantiation)
        self.instantiation_seconds: list[float] = []  # of which the graph's instantiation (capture_end)
        self.entry_seconds: list[float] = []  # of which torch.cuda.graph's entry (GPU wait, flush, begin)
        self.captured_seconds: list[float] = []  # of which the captured forward and backward
        # the capturing thread's CPU time in them (the backward's launches run on autograd's device
        # thread): against captured_seconds, how long a background capture waited rather than ran
        self.captured_cpu_seconds: list[float] = []
        # of captured_seconds, the backward's (from the loss to the gradients in their buffers): 43-55 %
        # of a capture on one H200, its stalls without a Python call in them (bench/results/
        # trace_stalls_recorder_backward_h200: not the saved-tensor hooks)
        self.captured_backward_seconds: list[float] = []
        # host time of each replay's launch while the recorder runs: ~2 ms in the batch-4 epochs,
        # 130 ms under the profiler (launch queues full), bench/results/epochs_h200_launch_queues_env_b4
        self.launch_seconds: list[float] = []
        # of which the wait for the GPU to finish the steps queued before the recording: the work
        # the host was ahead by when the new shape arrived (torch.cuda.graph waits for it anyway)
        self.drain_seconds: list[float] = []
        if off_reason is None and not torch.cuda.is_available() and not self.replay_on_cpu:
            self.off_reason = "no CUDA device"
        logger.info("CUDA graphs: %s", f"off ({self.off_reason})" if self.off_reason else "on, one per batch shape")

    def summary(self) -> dict:
        """For metrics.json: how the steps were trained."""
        return dict(
            enabled=self.off_reason is None,
            attention=self.attention,
            capture=self.capture,
            off_reason=self.off_reason,
            shapes_recorded=[list(shape[0]) for shape in self.recordings],
            replayed_steps=self.replayed_steps,
            eager_steps=self.eager_steps,
            eager_reasons=self.eager_reasons,
            recording_seconds=[round(t, 4) for t in self.recording_seconds],
            instantiation_seconds=[round(t, 4) for t in self.instantiation_seconds],
            entry_seconds=[round(t, 4) for t in self.entry_seconds],
            captured_seconds=[round(t, 4) for t in self.captured_seconds],
            captured_cpu_seconds=[round(t, 4) for t in self.captured_cpu_seconds],
            captured_backward_seconds=[round(t, 4) for t in self.captured_backward_seconds],
            launch_seconds_median=round(statistics.median(self.launch_seconds), 4) if self.launch_seconds else None,
            drain_seconds=[round(t, 4) for t in self.drain_seconds],
            recorded_ahead=self.recorder.recorded if self.recorder else [],
            recorded_ahead_in_loop=self.recorder.recorded_in_loop if self.recorder else [],
            coarse_replays=self.coarse_replays,
            recorder_failure=self.recorder.failure if self.recorder else None,
            waited_seconds=round(self.waited_seconds, 4),
        )

    def serves(self, batch: int, seq: int) -> bool:
        """A batch of this shape is recorded, not trained eagerly for its length (max_tokens)."""
        return self.max_tokens is None or batch * seq <= self.max_tokens

    def _eager(self, reason: str) -> None:
        self.eager_steps += 1
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1
        return None

    def step(self, inputs: dict, num_items, loss_fn, checkpointed: bool, layout: bool):
        """``loss_fn(static_inputs) -> (loss, metrics)`` is what each recording runs; its
        inputs carry ``num_items`` when the trainer counted the batch's tokens.
        ``checkpointed``: the plan recomputes layers for this batch; a recording holds that
        unless ``checkpointed_eager_reason`` says why not (random numbers replayed on the host).
        ``layout``: right_padded(inputs), read on the host before the batch moved (reading the
        GPU copy here would be a device sync per step)."""
        if self.recorder is not None and self.recorder.error is not None:
            raise RuntimeError("the CUDA graph recorder thread failed") from self.recorder.error
        earlier = self.eager_steps + self.replayed_steps  # the batches before this one (the coarse ones' count)
        if self.off_reason:
            return self._eager("graphs off")
        if not self.serves(*inputs["input_ids"].shape):
            return self._eager(f"longer than cuda_graphs_max_tokens ({self.max_tokens})")
        if checkpointed and self.checkpointed_eager_reason:
            return self._eager(self.checkpointed_eager_reason)
        if not self.warm:
            self.warm = True
            return self._eager("first step")
        present = {k for k, v in inputs.items() if v is not None}
        if present != GRAPH_KEYS:
            return self._eager(f"batch keys {sorted(present)}")
        if not layout:
            return self._eager("not right-padded")
        # Not where a checkpointed recording would replay random numbers on the host (the longer
        # shape may recompute layers the batch's own does not), nor past cuda_graphs_max_tokens.
        coarse = False
        if self.coarse_multiple and earlier < self.coarse_steps and not self.checkpointed_eager_reason:
            batch, seq = inputs["input_ids"].shape
            seq = -(-seq // self.coarse_multiple) * self.coarse_multiple
            if self.serves(batch, seq):
                inputs, coarse = padded_to(inputs, seq), True
        key = (tuple(inputs["input_ids"].shape), None if num_items is None else torch.as_tensor(num_items).dtype)
        recording = self.recordings.get(key)
        self._bind_grads()
        if recording is None:
            if self.recorder is not None:
                self.recorder.wait_warm()
            with self.exclusive():
                recording = self.recordings.get(key)  # the recorder's, finished while we waited
                if recording is None and not self.off_reason:
                    recording = self.record(key, inputs, num_items, loss_fn)
            if recording is None:
                return self._eager("graphs off")
        for name, buffer in recording.inputs.items():
            buffer.copy_(num_items if name == "num_items" else inputs[name])
        # While the recorder captures, the loop waits for the previous replay on an event rather than
        # in cudaGraphLaunch, which waits for it holding the driver: the thread's captured launches
        # stalled as long (270 ms a 4 x 1024 step, bench/results/profile_recorder_h200).
        waits_on_event = self.replayed is not None and self.recorder is not None and self.recorder.running
        if waits_on_event:
            self.replayed.synchronize()  # the step queued after it keeps the card busy meanwhile
            launching = time.perf_counter()
        recording.replay()
        if waits_on_event:  # the previous replay is done: what is left is the launch queues' room
            self.launch_seconds.append(time.perf_counter() - launching)
            self.replayed.record()
        if self.recorder is not None and self.recorder.thread is None:  # once the loop has recorded a shape
            self.recorder.after_replay(key[1], inputs["input_ids"].device, loss_fn)
        self.replayed_steps += 1
        self.coarse_replays += coarse
        # The outputs live in the shared pool: copy them before another shape replays.
        return recording.loss.detach().clone(), tuple(m.clone() for m in recording.metrics)

    @contextlib.contextmanager
    def exclusive(self, timed: bool = True):
        """The main thread's forward/backward outside a replay (an eager step, a recording), never
        beside the recorder's: it waits for a recording under way; the recorder waits for it.
        ``timed``: the wait counts in ``waited_seconds`` (a profiler's start and stop do not)."""
        self.main_waiting += 1
        started = time.perf_counter()
        try:
            self.lock.acquire()
        finally:
            self.main_waiting -= 1
        if timed:
            self.waited_seconds += time.perf_counter() - started
        try:
            yield
        finally:
            self.lock.release()

    def stop(self) -> None:
        """End of training: nothing more is recorded (the model is the caller's again)."""
        if self.recorder is not None:
            self.recorder.stop()

    def record(
        self, key, inputs: dict, num_items, loss_fn, background: bool = False, synchronized: bool = True
    ) -> Recording | None:
        """Record one shape (``self.lock`` held): the plan's layers set first, the time kept. None: not
        recorded (graphs now off, or a checkpointed shape the recorder leaves to an eager step).
        ``synchronized`` False: the capture begins without waiting for the GPU (a loop's recording
        ahead, graph_recorder.Recorder.after_replay, beside the replay it just launched)."""
        batch, seq = key[0][0], key[0][-1]
        layers = self.prepare(batch, seq) if self.prepare is not None else 0
        if background and layers and self.checkpointed_eager_reason:
            return None
        started = time.perf_counter()
        try:
            recording = self._record(inputs, num_items, loss_fn, background, synchronized)
        except RuntimeError as error:
            reason = f"recording failed at batch shape {key[0]}: {str(error).splitlines()[0][:300]}"
            if background:  # the loop records its shapes itself from here on
                self.recorder.failure = reason
                self.logger.warning("Recording ahead stopped: %s", reason)
                return None
            self.off_reason = reason  # a model this path cannot hold: say so, train on eagerly
            self.logger.warning("CUDA graphs off for the rest of the run: %s", self.off_reason)
            return None
        self.recordings[key] = recording
        self.recording_seconds.append(time.perf_counter() - started)
        return recording

    def _bind_grads(self) -> None:
        """Point every trainable parameter's .grad at its fixed buffer: zeroed after the
        trainer's zero_grad (None), carrying an eager step's gradient (accumulation)."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.parameters]
        to_zero = []
        for parameter, buffer in zip(self.parameters, self.grads, strict=True):
            if parameter.grad is buffer:
                continue
            if parameter.grad is None:
                to_zero.append(buffer)
            else:
                buffer.copy_(parameter.grad)
            parameter.grad = buffer
        if to_zero:
            torch._foreach_zero_(to_zero)

    def _record(self, inputs: dict, num_items, loss_fn, background: bool, synchronized: bool) -> Recording:
        static = {name: inputs[name].clone() for name in GRAPH_KEYS}
        if num_items is not None:  # the trainer's token count over the accumulated batches
            static["num_items"] = torch.as_tensor(num_items, device=inputs["input_ids"].device).clone()
        parameters, buffers = self.parameters, self.grads
        backward_seconds = 0.0  # the capture's, kept with its other times

        # A background capture runs while the main thread's optimizer updates the adapters in place:
        # their version counters move between the captured forward and backward, and autograd would
        # refuse the saved tensors. Nothing captured has run yet (a replay reads the memory as it is
        # then), so the check is moot: saved-tensor hooks, with which autograd does not check.
        saved = torch.autograd.graph.saved_tensors_hooks(_same, _same) if background else contextlib.nullcontext()

        def forward_backward():
            nonlocal backward_seconds
            # The backward too: a checkpointed layer's recomputation must run the forward's
            # attention kernel (its saved tensors' shapes).
            with attention_backends(self.attention), saved:
                loss, metrics = loss_fn(static)
                backward = time.perf_counter()
                if not background:
                    loss.backward()  # into .grad, bound to the fixed buffers (_bind_grads)
                else:
                    # Into the fixed buffers, as .grad's accumulation does (buffer + gradient), but
                    # without .grad, which the main thread rebinds while the recorder records.
                    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
                    pairs = [(buffer, grad) for buffer, grad in zip(buffers, grads, strict=True) if grad is not None]
                    torch._foreach_add_([buffer for buffer, _ in pairs], [grad for _, grad in pairs])
                backward_seconds = time.perf_counter() - backward
            # Keep the values, not the autograd graph behind the loss: with checkpointing it ends
            # at the embedding output (a leaf made to require grad), which it would keep alive with
            # its gradient, two hidden-state tensors per recorded shape.
            return loss.detach(), metrics

        if not torch.cuda.is_available():  # replay_on_cpu (tests): the function is the recording
            batch, seq = static["input_ids"].shape[0], static["input_ids"].shape[-1]

            def replay():  # runs the model: the shape's layers, and never beside the recorder
                with self.lock:
                    if self.prepare is not None:
                        self.prepare(batch, seq)
                    recording.loss, recording.metrics = forward_backward()

            recording = Recording(replay=replay, inputs=static, loss=torch.zeros(()), metrics=())
            return recording
        if self.stream is None:  # one capture stream: the pool's segments are per stream
            self.stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        mode, random_state = "global", contextlib.nullcontext()
        if self.recorder is not None:
            # Recording ahead: only this thread's CUDA calls are checked, and every recording,
            # whichever thread makes it, draws from a generator state of its own seeded by its shape
            # (graph_recorder.own_random_state): a shape's masks do not depend on who recorded it.
            from graph_recorder import own_random_state

            shape = tuple(static["input_ids"].shape)
            mode, random_state = "thread_local", own_random_state(static["input_ids"].device, shape)
        # torch.cuda.graph waits for the GPU and empties the caches first. The loop's wait is timed
        # apart (drain_seconds: how far ahead of the card the host was); on the recorder thread it
        # waits for one replay at most. Captured without the wait and flush, a background recording
        # took as long (bench/results/epochs_h200_recorder_warm), and the dropout test's two runs
        # once ended 5e-6 apart (epochs_h200_recorder_event, not separated): kept.
        if not background and synchronized:
            draining = time.perf_counter()
            torch.cuda.synchronize()
            self.drain_seconds.append(time.perf_counter() - draining)
        if synchronized:
            capture = torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode=mode)
        else:
            capture = capture_beside_the_gpu(graph, self.pool, self.stream, mode)
        entering = time.perf_counter()
        with random_state, capture:
            entered, cpu = time.perf_counter(), time.thread_time()
            loss, metrics = forward_backward()
            captured, cpu = time.perf_counter(), time.thread_time() - cpu
        self.instantiation_seconds.append(time.perf_counter() - captured)
        self.entry_seconds.append(entered - entering)
        self.captured_seconds.append(captured - entered)
        self.captured_cpu_seconds.append(cpu)
        self.captured_backward_seconds.append(backward_seconds)
        self.pool = graph.pool()
        self.logger.info("CUDA graph recorded for batch shape %s", tuple(inputs["input_ids"].shape))
        return Recording(replay=graph.replay, inputs=static, loss=loss, metrics=metrics)
