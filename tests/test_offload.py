"""scripts/offload.py (``train.offload_checkpoints``): checkpointed layers keep their input in
host memory, on the tiny random Llama with a real bitsandbytes 4-bit base: the same losses and
gradients as torch's checkpointing bit for bit, the layer inputs really released from the
device, the memory model's term, and CUDA graphs recording the copies."""

import gc
import json
import weakref

import pytest
import torch

import checkpointing
from gpu_recipes import LLAMA2_7B
from memory_model import GIB, predict_peak
from memory_plan import GRAPH_PEAK_FACTOR, choose_checkpointing
from model_shape import ModelShape
from test_recipe import LENGTHS, PROJECT, train_tiny


@pytest.mark.parametrize("folded", [True, False], ids=["folded_dropout", "peft_dropout"])
def test_offloaded_checkpoints_train_to_the_checkpointed_numbers_bit_for_bit(tiny_model, tmp_path, folded):
    """Six steps with every layer checkpointed: the offloaded inputs give the stock
    checkpointed run's loss, gradient norm and token metrics, step by step."""
    settings = dict(gradient_checkpointing=True, logging_steps=1, recompute_lora_dropout=folded)
    offloaded, _, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, offload_checkpoints=True, **settings)
    stock, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **settings)
    layer = checkpointing.decoder_layers(trainer.model)[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.func.__name__ == "offloaded_checkpoint"
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert len(offloaded) == len(stock) == 6
    for ours, theirs in zip(offloaded, stock, strict=True):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


def layer_inputs_alive(model, ids) -> list[bool]:
    """After the forward (before the backward): is each decoder layer's input still held?"""
    refs = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: refs.append(weakref.ref(args[0])))
        for layer in checkpointing.decoder_layers(model)
    ]
    loss = model(input_ids=ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    gc.collect()
    alive = [ref() is not None for ref in refs]
    loss.backward()  # and the backward still runs from what was kept
    return alive


def test_offloaded_layer_inputs_leave_the_device_until_the_backward(tiny_model):
    from peft import PeftModel

    from modeling import load_base_model

    alive = {}
    for offload in (False, True, False, True):  # measured after a first pass of each (once-only buffers)
        base = load_base_model(tiny_model, "qlora", torch.float32, "nf4", False)
        model = PeftModel.from_pretrained(base, str(tiny_model / "adapter"), is_trainable=True).train()
        checkpointing.enable_checkpointing(model, every=1, offload=offload)
        ids = torch.arange(3, 67, device=next(model.parameters()).device).unsqueeze(0)
        alive[offload] = layer_inputs_alive(model, ids)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Layer 0's input is the embedding output, which autograd keeps for the embedding's own
    # gradient hook either way; layer 1's is only held for the recomputation.
    assert alive[False] == [True, True]
    assert alive[True] == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host copies and device memory need CUDA")
def test_offloaded_inputs_free_their_device_bytes(tiny_model):
    """Device memory after the forward: exactly each checkpointed layer's input (bf16) less."""
    from peft import PeftModel

    from modeling import load_base_model

    after_forward = {}
    ids = (torch.arange(1024, device="cuda") % 1000 + 3).unsqueeze(0)  # ids within the tiny vocabulary (1,024)
    for offload in (False, True, False, True):  # measured after a first pass of each (once-only buffers)
        base = load_base_model(tiny_model, "qlora", torch.bfloat16, "nf4", False)
        model = PeftModel.from_pretrained(base, str(tiny_model / "adapter"), is_trainable=True).train()
        checkpointing.enable_checkpointing(model, every=1, offload=offload)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        after_forward[offload] = torch.cuda.memory_allocated() - start
        loss.backward()
        del model, base, loss
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    # layer 1's input (layer 0's is the embedding output, kept by its gradient hook)
    assert after_forward[False] - after_forward[True] == 1024 * hidden * 2


def test_memory_model_counts_offloaded_inputs_in_host_memory():
    shape = ModelShape.from_config(LLAMA2_7B)
    recipe_args = dict(method="qlora", rank=64, targets="qv", kernels="liger", recompute_dropout=True)
    on_device = predict_peak(shape, seq=2048, batch=4, checkpoint_every=1, **recipe_args)
    offloaded = predict_peak(shape, seq=2048, batch=4, checkpoint_every=1, offload_checkpoints=True, **recipe_args)
    one_input = 2048 * 4 * 4096 * 2  # tokens x hidden x bf16: 64 MiB
    inputs = 31 * one_input  # every layer's but the first: 1.94 GiB
    assert offloaded["host_offload"] == inputs and on_device["host_offload"] == 0
    # on the device meanwhile: the input coming back ahead of its layer's recomputation
    assert on_device["total"] - offloaded["total"] == inputs - one_input
    in_line = predict_peak(
        shape, seq=2048, batch=4, checkpoint_every=1, offload_checkpoints=True, **recipe_args, offload_prefetch=False
    )
    recorded = predict_peak(
        shape, seq=2048, batch=4, checkpoint_every=1, offload_checkpoints=True, **recipe_args, recorded=True
    )
    assert on_device["total"] - in_line["total"] == on_device["total"] - recorded["total"] == inputs
    # 7.73 GiB on the device (the measured pipeline row: 7.748) becomes 5.85
    assert round(on_device["total"] / GIB, 2) == 7.73 and round(offloaded["total"] / GIB, 2) == 5.85
    # The plan under a 6 GiB budget: every layer checkpointed fits only with the inputs offloaded.
    every, prediction = choose_checkpointing(shape, 6 * GIB, seq=2048, batch=4, **recipe_args)
    assert every == 1 and prediction["total"] > 6 * GIB
    every, prediction = choose_checkpointing(shape, 6 * GIB, seq=2048, batch=4, offload_checkpoints=True, **recipe_args)
    assert every >= 1 and prediction["total"] <= 6 * GIB


def test_graph_step_serves_offloaded_checkpointed_batches(tiny_model, tmp_path, monkeypatch):
    """With gradient_checkpointing auto, the batches the plan checkpoints (inputs to the
    layers' host buffers) take the graph step like the others (its static-buffer function,
    run without a device graph on the CPU): the eager offloaded run's numbers."""
    import cuda_graphs

    monkeypatch.setattr(cuda_graphs.GraphedSteps, "replay_on_cpu", True)
    shape = ModelShape.from_config(tiny_model)
    recipe_args = dict(method="qlora", rank=8, targets="qv", kernels="none", paged_optimizer=False)
    recipe_args.update(recompute_dropout=True, offload_checkpoints=True, graph_capture="synchronized")  # its workspaces
    short = predict_peak(shape, checkpoint_every=0, seq=64, batch=2, **recipe_args)["total"]
    long = predict_peak(shape, checkpoint_every=1, seq=320, batch=2, **recipe_args)["total"]
    budget_gib = max(short, long) * GRAPH_PEAK_FACTOR / GIB * 1.0001
    settings = dict(gradient_checkpointing="auto", memory_budget_gib=budget_gib, pad_to_multiple_of=16)
    settings.update(logging_steps=1, recompute_lora_dropout=True, offload_checkpoints=True)
    graphed, plan, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, cuda_graphs=True, **settings)
    eager, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **settings)
    # none on the short batches; the lower layer on the long ones (the top one whole: its activations
    # never coexist with the lower one's recomputation, and it keeps no input)
    assert plan.summary() == {"0": 3, "1": 3}
    summary = trainer.graphs.summary()
    assert summary["off_reason"] is None and summary["eager_reasons"] == {"first step": 1}
    assert summary["replayed_steps"] == 5
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    assert len(graphed) == len(eager) == 6
    for ours, theirs in zip(graphed, eager, strict=True):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device graph needs CUDA")
def test_recorded_offloaded_steps_train_to_the_recorded_on_device_numbers(tiny_model, tmp_path):
    """Device graphs over every layer checkpointed: with the inputs copied to the host and
    back inside the recording, the same numbers as with them kept on the device."""
    settings = dict(gradient_checkpointing=True, pad_to_multiple_of=16, logging_steps=1, cuda_graphs=True)
    settings.update(recompute_lora_dropout=True, compute_dtype="bfloat16")
    offloaded, _, trainer = train_tiny(tiny_model, tmp_path / "a", LENGTHS, offload_checkpoints=True, **settings)
    on_device, _, _ = train_tiny(tiny_model, tmp_path / "b", LENGTHS, **settings)
    summary = trainer.graphs.summary()
    assert summary["off_reason"] is None and summary["replayed_steps"] == 5, summary
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
    for ours, theirs in zip(offloaded, on_device, strict=True):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


def test_a_second_forward_before_the_backward_is_refused():
    """A layer's host buffer holds its latest input: an older call's recomputation says so."""
    from offload import HostSlot, offloaded_checkpoint

    linear, slot = torch.nn.Linear(8, 8), HostSlot()
    first = offloaded_checkpoint(linear, torch.randn(4, 8, requires_grad=True) * 1, slot=slot, use_reentrant=False)
    offloaded_checkpoint(linear, torch.randn(4, 8, requires_grad=True) * 1, slot=slot, use_reentrant=False)
    with pytest.raises(RuntimeError, match="a layer ran forward again before the backward of its previous call"):
        first.sum().backward()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned copies on a side stream need CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("prefetch", [True, False])
def test_the_backward_brings_each_input_back_while_the_layer_above_recomputes(monkeypatch, prefetch, device):
    """Double buffering: a layer's recomputation starts the copy back of the layer below it
    (the one the backward reaches next), so every input but the top layer's is already
    fetched when its own recomputation asks; a second step links nothing to the first's copies,
    and the gradients are those of plain checkpointing. Without ``prefetch`` every copy comes
    back in line; a forward whose backward never ran is never prefetched from. On a GPU the
    copies back run on the side stream, their events waited for."""
    from offload import CopyChain, HostCopy, HostSlot, offloaded_checkpoint

    made, links, fetched_after_get = [], [], []
    make, get = HostCopy.__init__, HostCopy.get

    def recording_make(self, *args):
        make(self, *args)
        made.append(self)
        links.append(self.below)

    def recording_get(self):
        tensor = get(self)
        if self.tensor is None:  # a recomputation, not the forward
            fetched_after_get.append([copy.fetched is not None for copy in made])
        return tensor

    monkeypatch.setattr(HostCopy, "__init__", recording_make)
    monkeypatch.setattr(HostCopy, "get", recording_get)
    if device == "cuda":
        torch.cuda.empty_cache()  # no segment cached from an earlier test
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512, device=device) for _ in range(4)]
    copies_chain = CopyChain() if prefetch else None  # one model's slots, by layer
    slots = [HostSlot(chain=copies_chain, index=index) for index in range(4)]
    leaf = torch.randn(256, 512, device=device, requires_grad=True)
    abandoned = leaf * 1  # a forward whose backward never runs: its copies stay in the slots
    for layer, slot in zip(layers, slots, strict=True):
        abandoned = offloaded_checkpoint(layer, abandoned, slot=slot, use_reentrant=False)
    made.clear()
    links.clear()
    for step in range(2):
        hidden = leaf * 1  # not a leaf: every layer's input is offloaded
        for layer, slot in zip(layers, slots, strict=True):
            hidden = offloaded_checkpoint(layer, hidden, slot=slot, use_reentrant=False)
        hidden.sum().backward()
        copies = made[4 * step :]
        assert [copy.prefetched for copy in copies] == [prefetch] * 3 + [False]  # the top layer's in line
        assert all(copy.below is None for copy in copies)  # each link dropped once used
    # each copy linked to the one made before it in its own forward, never to an earlier
    # forward's (the step before's, brought back; the abandoned one's top layer, still held)
    chain = [None, made[0], made[1], made[2], None, made[4], made[5], made[6]]
    assert links == (chain if prefetch else [None] * 8)
    # after the top layer's recomputation the one below it is fetched, and so on down
    assert fetched_after_get[:4] == [
        [False, False, prefetch, False],
        [False, prefetch, False, False],
        [prefetch, False, False, False],
        [False, False, False, False],
    ]
    ours = [leaf.grad.clone()] + [p.grad.clone() for layer in layers for p in layer.parameters()]
    leaf.grad = None
    for layer in layers:
        layer.zero_grad()
    for _ in range(2):
        hidden = leaf * 1
        for layer in layers:
            hidden = torch.utils.checkpoint.checkpoint(layer, hidden, use_reentrant=False)
        hidden.sum().backward()
    theirs = [leaf.grad] + [p.grad for layer in layers for p in layer.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    if device == "cuda":  # the copies back came from the compute stream's pool, none from the side stream's
        from offload import _copy_stream

        side_stream = _copy_stream(torch.device("cuda", torch.cuda.current_device())).cuda_stream
        assert side_stream not in {segment["stream"] for segment in torch.cuda.memory_snapshot()}


def test_a_host_slot_grows_once_to_the_longest_batch():
    """A batch in another dtype than reserved, or longer, gets one buffer of at least the
    longest batch (not one per length), and the old buffer stays for any recording of it."""
    from offload import HostSlot

    slot = HostSlot(longest=1000)
    first = slot.reserve(1000, torch.bfloat16, pinned=False)
    for numel in (100, 200, 300, 200):
        assert slot.reserve(numel, torch.float32, pinned=False).numel() == 1000
    assert slot.reserve(1200, torch.float32, pinned=False).numel() == 1200
    assert [(b.numel(), b.dtype) for b in slot.buffers] == [
        (1000, torch.bfloat16),
        (1000, torch.float32),
        (1200, torch.float32),
    ]
    assert slot.buffers[0] is first


def test_hidden_states_by_name_are_kept_on_the_device_and_said(caplog):
    """transformers hands the layer's keyword arguments inside the function: hidden states
    passed by name cannot be offloaded; the run says so and checkpoints them as torch does."""
    import functools

    from offload import HostSlot, offloaded_checkpoint

    linear, slot = torch.nn.Linear(8, 8), HostSlot()
    leaf = torch.randn(4, 8, requires_grad=True)
    function = functools.partial(lambda hidden_states: linear(hidden_states), hidden_states=leaf * 1)
    with caplog.at_level("WARNING", logger="offload"):
        out = offloaded_checkpoint(function, slot=slot, use_reentrant=False)
    assert torch.equal(out, linear(leaf)) and slot.buffers == []
    assert "passes its hidden states by name; its layers keep them on the GPU" in caplog.text
    out.sum().backward()
    plain = leaf.detach().clone().requires_grad_()
    linear(plain * 1).sum().backward()
    assert torch.equal(leaf.grad, plain.grad)  # the gradient flows through, as without checkpointing


def test_offload_with_compile_stops_at_config_check():
    import yaml

    from config_check import ConfigError, validate_config

    config = yaml.safe_load((PROJECT / "config" / "llama2-7b.yaml").read_text())
    config["train"].update(offload_checkpoints=True, compile=True, kernels="none")
    with pytest.raises(ConfigError, match="config key 'train.offload_checkpoints': not with train.compile"):
        validate_config(config)
    config["train"].update(compile=False)
    validate_config(config)
