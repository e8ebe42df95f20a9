"""CUDA graphs for the training step (scripts/cuda_graphs.py, graph_attention.py)
on the tiny random Llama with a real 4-bit base: a replayed step trains to the numbers of TRL's
eager step (on the CPU the recorded function runs as the replay), the batches the graphs cannot
serve train eagerly, recordings attend as eager steps do and keep no step alive, and the
device-only tests (a real graph, no device syncs) run where CUDA is. Recording ahead and the
coarse shapes: tests/test_graph_recorder.py."""

import threading

import pytest
import torch

import checkpointing
import host_facts
from test_recipe import LENGTHS, LOGGER, PROJECT, train_tiny


def test_cuda_graph_step_trains_like_the_eager_step(tiny_model, tmp_path, monkeypatch):
    """The graph step's own maths (no padding mask, every position scored, fixed buffers,
    gradients accumulated into fixed tensors), run without a device graph on the CPU."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    settings = dict(gradient_checkpointing=False, pad_to_multiple_of=16, logging_steps=1)
    graphed, _, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, cuda_graphs=True, **settings)
    eager, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **settings)
    summary = trainer.graphs.summary()
    assert summary["eager_steps"] == 1 and summary["eager_reasons"] == {"first step": 1}
    assert summary["replayed_steps"] == 5  # 6 batches of two, every one padded (lengths differ)
    assert sorted(summary["shapes_recorded"]) == [[2, 48], [2, 64], [2, 304], [2, 320]]
    assert len(graphed) == len(eager) == 6
    # Measured on this CPU (float32): bit for bit. A pad can change a real token's numbers only
    # through attention, and causal attention gives it weight exp(-inf) = 0 either way. On a GPU
    # the kernels differ (flash vs cuDNN attention): bench/results/epochs_h200 states that gap.
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    for ours, theirs in zip(graphed, eager, strict=True):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    # each step's loss kept on the device, read once: the values logged at every step
    assert trainer.step_losses_on_host() == [h["loss"] for h in graphed]


def test_recordings_keep_no_step_alive(tiny_model, tmp_path, monkeypatch):
    """A recording keeps its outputs, not the autograd graph behind its loss: with checkpointing
    that graph ends at the embedding output (a leaf made to require grad) and would hold it and
    its gradient,
    two hidden-state tensors per recorded shape (measured on the H200: 0.43 GiB over 14 shapes
    of a batch-4 epoch, bench/results/graph_memory_h200_recorded)."""
    import gc
    import weakref

    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    outputs = []
    embedding_forward = torch.nn.Embedding.forward

    def forward(self, *args, **kwargs):
        output = embedding_forward(self, *args, **kwargs)
        outputs.append(weakref.ref(output))
        return output

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)
    settings = dict(gradient_checkpointing=True, recompute_lora_dropout=True, pad_to_multiple_of=16)
    _, _, trainer = train_tiny(tiny_model, tmp_path, LENGTHS, cuda_graphs=True, **settings)
    gc.collect()
    # one embedding output per forward run in Python: the CPU's replays run it too; on a GPU the
    # eager first step and the four recordings (measured on one H200: 5), the replays do not
    forwards = 5 if torch.cuda.is_available() else 6
    assert len(trainer.graphs.recordings) == 4 and len(outputs) == forwards
    assert [ref() for ref in outputs] == [None] * forwards


def test_recordings_try_the_configured_attention_kernel_first():
    """train.cuda_graphs_attention sets SDPA's priority order inside a recording, and only there."""
    from torch.nn.attention import SDPBackend

    import cuda_graphs
    import graph_attention

    before = torch._C._get_sdp_priority_order()
    for first, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with graph_attention.attention_backends(first):
            order = torch._C._get_sdp_priority_order()
        assert order[:2] == [
            int(backend),
            int(SDPBackend.FLASH_ATTENTION if first == "cudnn" else SDPBackend.CUDNN_ATTENTION),
        ]
        assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(ValueError, match="train.cuda_graphs_attention must be one of"):
        cuda_graphs.GraphedSteps([], None, LOGGER, None, attention="xformers")
    with pytest.raises(ValueError, match="train.cuda_graphs_capture must be one of"):
        cuda_graphs.GraphedSteps([], None, LOGGER, None, capture="eager")


def test_graph_step_needs_right_padding():
    from graph_inputs import right_padded

    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, 10]])
    right = dict(attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), labels=labels)
    assert right_padded(right)
    left = dict(attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), labels=labels)
    assert not right_padded(left)
    unmasked = dict(attention_mask=right["attention_mask"], labels=torch.tensor([[5, 6, 7, -100], [7, 8, 9, 10]]))
    assert not right_padded(unmasked)  # a pad with a label would change the loss


def test_the_batch_layout_is_read_on_the_host_before_the_batch_moves(monkeypatch):
    """HostFacts reads the count and the layout from the collator's batch; the graph step takes
    that layout instead of reading the GPU copy (a device sync)."""
    import cuda_graphs

    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, 10]])
    right = dict(
        input_ids=labels.clamp(min=0), attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), labels=labels
    )
    left = dict(right, attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    collate = host_facts.HostFacts(lambda examples: dict(examples[0]))
    assert collate([right])[host_facts.HOST_FACTS] == host_facts.BatchFacts(tokens=6, right_padded=True)
    assert collate([left])[host_facts.HOST_FACTS] == host_facts.BatchFacts(tokens=6, right_padded=False)
    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    graphs = cuda_graphs.GraphedSteps([], None, LOGGER, None)
    graphs.warm = True
    assert (
        graphs.step(right, None, loss_fn=None, checkpointed=False, layout=False) is None
    )  # the host's answer, not the tensors'
    assert graphs.eager_reasons == {"not right-padded": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs need CUDA")
def test_replayed_steps_never_wait_for_the_gpu(tiny_model, tmp_path):
    """Once each batch shape is recorded, a whole trainer step (batch copy, replay, clipping, fused
    AdamW, scheduler, step timer, token count) queues its work without one device sync, as
    torch's sync debug mode counts them: the host runs ahead of the GPU."""
    import warnings

    from transformers import TrainerCallback

    from train_metrics import step_timer

    class SyncWarnings(TrainerCallback):
        """Every sync torch reports from the start of step 4 to the end of step 6."""

        def __init__(self):
            self.caught, self.context = [], warnings.catch_warnings(record=True)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                self.caught = self.context.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                torch.ones(1, device="cuda").item()  # the one sync the window must see: the counter works

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                torch.cuda.set_sync_debug_mode("default")
                self.context.__exit__(None, None, None)

    syncs, timer = SyncWarnings(), step_timer()
    settings = dict(cuda_graphs=True, gradient_checkpointing=False, pad_to_multiple_of=16, compute_dtype="bfloat16")
    settings.update(optimizer="adamw_torch_fused", logging_steps=100)
    # two shapes, 48 and 320 tokens: step 1 eager, steps 2 and 3 record, steps 4-6 replay
    _, _, trainer = train_tiny(tiny_model, tmp_path, LENGTHS[:4] * 3, callbacks=[syncs, timer], **settings)
    assert trainer.graphs.summary()["replayed_steps"] == 5  # a recording step replays too
    found = [f"{w.filename}:{w.lineno}: {w.message}" for w in syncs.caught if "is a prototype" not in str(w.message)]
    assert len(found) == 1 and "test_cuda_graphs.py" in found[0], found  # the deliberate .item(), nothing else
    assert trainer.state.num_input_tokens_seen == sum(LENGTHS[:4]) * 3
    assert all(s["step_seconds"] > 0 for s in timer.steps.values()) and len(timer.steps) == 6


def test_recording_attends_by_the_causal_flag_not_a_mask_tensor(tiny_model, monkeypatch):
    """While a graph records (a stream capture, stubbed here), SDPA gets no mask tensor when neither
    a padding mask nor position ids were passed: under a capture transformers cannot read the
    model's own position ids and builds a causal mask tensor, with which cuDNN's attention ran every
    tile on the card. Called as a training forward is (no cache: the position ids' check)."""
    from transformers import LlamaForCausalLM

    import graph_attention

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    model = LlamaForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[0, 12:] = 0
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)

    def attention(**inputs) -> set:
        calls.clear()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, **inputs).logits
        return set(calls), logits

    eager, reference = attention()
    assert eager == {(True, True)}  # eager, transformers reads the position ids and uses the flag
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    unmasked, _ = attention()
    assert unmasked == {(False, False)}  # without the context: a mask tensor, as the card recorded
    with graph_attention.causal_rows():
        flagged, logits = attention()
        with_padding, _ = attention(attention_mask=padded)
    assert flagged == {(True, True)} and torch.equal(logits, reference)
    assert with_padding == {(False, False)}  # a padding mask is the library's to read
    assert attention()[0] == {(False, False)}  # after the context: the library's decision again

    # Per thread: a recorder thread inside the context leaves the loop thread's forward alone.
    inside, done = threading.Event(), threading.Event()

    def recorder():
        with graph_attention.causal_rows():
            inside.set()
            done.wait(timeout=60)

    thread = threading.Thread(target=recorder)
    thread.start()
    inside.wait(timeout=60)
    beside, _ = attention()
    done.set()
    thread.join()
    assert beside == {(False, False)}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with graph_attention.causal_rows():
        assert attention()[0] == {(True, True)}  # an eager step's: the same decision, nothing read


def test_cuda_graphs_with_checkpointing_stop_at_config_check():
    import yaml

    from config_check import ConfigError, validate_config

    config = yaml.safe_load((PROJECT / "config" / "llama2-7b.yaml").read_text())
    config["train"].update(cuda_graphs=True, gradient_checkpointing=True, recompute_lora_dropout=False)
    with pytest.raises(ConfigError, match="config key 'train.cuda_graphs': a recorded step cannot restore the RNG"):
        validate_config(config)
    config["train"].update(recompute_lora_dropout=True)  # the recomputation reuses the forward's masks
    validate_config(config)


def test_cuda_graphs_step_aside_where_they_cannot_serve(tiny_model, tmp_path, monkeypatch):
    """Graphs need checkpointing without a recomputation that replays random numbers: the run
    trains eagerly and says why; on a machine without CUDA the reason is that."""
    import cuda_graphs

    settings = dict(cuda_graphs=True, max_steps=2, logging_steps=1)
    _, _, cpu = train_tiny(tiny_model, tmp_path / "a", LENGTHS[:4], gradient_checkpointing=False, **settings)
    assert cpu.graphs.summary()["off_reason"] == (None if torch.cuda.is_available() else "no CUDA device")
    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    history, _, checkpointed = train_tiny(tiny_model, tmp_path / "b", LENGTHS[:4], **settings)
    summary = checkpointed.graphs.summary()
    assert summary["off_reason"] == (
        "the memory budget needs checkpointing (every 1) at the longest batch, whose "
        "recomputation replays random numbers (a dropout not folded: train.recompute_lora_dropout)"
    )
    assert summary["eager_steps"] == 2 and summary["replayed_steps"] == 0 and len(history) == 2


def test_cuda_graphs_record_checkpointed_layers_with_folded_dropout(tiny_model, tmp_path, monkeypatch):
    """Folded LoRA dropouts hand their masks to the checkpointed layers' recomputation, which
    then needs no RNG state: the graph step (run without a device graph on the CPU) with
    every layer checkpointed trains to the stock eager checkpointed numbers, bit for bit."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    settings = dict(gradient_checkpointing=True, pad_to_multiple_of=16, logging_steps=1)
    graphed, _, trainer = train_tiny(
        tiny_model, tmp_path / "a", LENGTHS, cuda_graphs=True, recompute_lora_dropout=True, **settings
    )
    stock, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **settings)
    summary = trainer.graphs.summary()
    assert summary["off_reason"] is None and summary["eager_reasons"] == {"first step": 1}
    assert summary["replayed_steps"] == 5
    layer = checkpointing.decoder_layers(trainer.model)[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["preserve_rng_state"] is False
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert len(graphed) == len(stock) == 6
    for ours, theirs in zip(graphed, stock, strict=True):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


def test_cuda_graphs_leave_long_batches_eager(tiny_model, tmp_path, monkeypatch):
    """train.cuda_graphs_max_tokens: a batch of more tokens trains eagerly and says why."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    settings = dict(gradient_checkpointing=False, pad_to_multiple_of=16, max_steps=4, logging_steps=1)
    _, _, trainer = train_tiny(
        tiny_model, tmp_path, LENGTHS[:8], cuda_graphs=True, cuda_graphs_max_tokens=200, **settings
    )
    summary = trainer.graphs.summary()  # batches of two rows padded to 48 (first step), 320, 64 and 304
    assert summary["eager_reasons"] == {"first step": 1, "longer than cuda_graphs_max_tokens (200)": 2}
    assert summary["replayed_steps"] == 1 and summary["shapes_recorded"] == [[2, 64]]
