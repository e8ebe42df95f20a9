"""scripts/lora_dropout.py on a tiny random Llama with a real bitsandbytes NF4 base: the folded
LoRA dropout gives the stock path's loss and gradients bit for bit, still drops, and keeps
per layer the input once and each mask as bits (autograd's saved tensors, counted)."""

import pytest
import torch

from lora_dropout import pack_mask, recompute_lora_dropout, unpack_mask
from memory_model import layer_activation_bytes
from model_shape import ModelShape
from modeling import load_base_model

RANK, HIDDEN, LAYERS, BATCH, SEQ = 8, 64, 2, 2, 24
DEVICES = ["cuda" if torch.cuda.is_available() else "cpu"]  # the model loads onto the GPU where there is one


def build_lora_llama(folder):
    """A tiny random Llama of HIDDEN and LAYERS (tests/conftest.py's ``lora_llama_dir``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4)
    config.update(dict(num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False))
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def adapted(folder, device: str):
    """QLoRA q/v r=8, dropout 0.1, both LoRA matrices random (B = 0 would zero A's gradient)."""
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(1)
    lora = LoraConfig(
        r=RANK, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(load_base_model(folder, "qlora", dtype), lora)
    model.enable_input_require_grads()  # as the pipeline's checkpointing sets up: every layer's input needs grad
    return model.train()


def step(model, seed: int, autocast: torch.dtype | None, saved: list | None = None):
    """One forward and backward; returns the loss and every adapter gradient (and logs saved tensors)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(3)).to(device)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)

    def pack(tensor):
        if saved is not None:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(loss, grads: dict, stock_loss, stock_grads: dict) -> None:
    """The same loss and every adapter gradient bit for bit, none of them zero."""
    assert torch.equal(loss, stock_loss)
    assert grads.keys() == stock_grads.keys() and len(grads) == 4 * LAYERS
    for name, grad in grads.items():
        assert torch.equal(grad, stock_grads[name]), name
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["no_autocast", "bf16_autocast"])
def test_folded_dropout_trains_to_the_stock_numbers_bit_for_bit(lora_llama_dir, device, autocast):
    model = adapted(lora_llama_dir, device).to(device)
    ids = torch.arange(SEQ, device=device).unsqueeze(0)
    with torch.no_grad():
        stock_eval = model.eval()(input_ids=ids).logits
    stock_loss, stock_grads = step(model.train(), seed=5, autocast=autocast)
    assert recompute_lora_dropout(model) == 2 * LAYERS  # q and v in each layer
    assert recompute_lora_dropout(model) == 0  # already folded
    loss, grads = step(model, seed=5, autocast=autocast)
    assert_same_step(loss, grads, stock_loss, stock_grads)
    # Another seed draws other masks: the dropout is there, not folded away.
    _, other = step(model, seed=6, autocast=autocast)
    first_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert not torch.equal(other[first_a], grads[first_a])
    with torch.no_grad():  # no dropout in eval: the folded layer is lora_A's plain linear
        assert torch.equal(model.eval()(input_ids=ids).logits, stock_eval)
        with model.disable_adapter():
            assert not torch.equal(model(input_ids=ids).logits, stock_eval)  # the adapters act


def test_checkpointed_recomputation_reuses_the_forward_masks_every_time():
    """A second backward through a retained graph recomputes the layer again, with the same masks."""
    from torch.utils.checkpoint import checkpoint

    from lora_dropout import DropoutLinear, checkpoint_context

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    linear.__class__, linear.dropout_p = DropoutLinear, 0.5
    x = torch.randn(16, 64, requires_grad=True)
    out = checkpoint(linear, x, use_reentrant=False, context_fn=checkpoint_context, preserve_rng_state=False)
    torch.manual_seed(99)  # a recomputation that drew new masks would see another RNG state
    out.sum().backward(retain_graph=True)
    first = (linear.weight.grad.clone(), x.grad.clone())
    out.sum().backward()
    assert torch.equal(linear.weight.grad, 2 * first[0]) and torch.equal(x.grad, 2 * first[1])
    # and they are the forward's: the output is the linear of x under the mask the gradient shows
    kept = x.grad != 0
    assert 0.3 < kept.float().mean() < 0.7
    expected = torch.nn.functional.linear(torch.ops.aten.native_dropout_backward(x.detach(), kept, 2.0), linear.weight)
    assert torch.equal(out.detach(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the CUDA allocator's bytes (no CPU counter)")
def test_folded_dropout_keeps_no_cast_of_its_weight_through_the_forward():
    """Autocast caches the cast of a weight that requires grad until its region ends: nn.Linear's
    bf16 copy of each lora_A stays beside the whole forward. The folded lora_A casts its own:
    after its forwards the device holds their outputs and packed masks, nothing more."""
    from lora_dropout import DropoutLinear

    torch.manual_seed(0)
    tokens, features, rank = 512, 4096, 64
    linears = [torch.nn.Linear(features, rank, bias=False, device="cuda") for _ in range(3)]
    x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def held_after_forwards() -> int:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before = torch.cuda.memory_allocated()
            outputs = [linear(x) for linear in linears]
            held = torch.cuda.memory_allocated() - before
        del outputs  # alive until counted
        return held

    held_after_forwards()  # this thread's cuBLAS workspace, allocated at its first matmul
    output, cast = tokens * rank * 2, rank * features * 2
    assert held_after_forwards() == 3 * (output + cast)  # nn.Linear: autocast's cached bf16 weights
    for linear in linears:
        linear.__class__, linear.dropout_p = DropoutLinear, 0.1
    assert held_after_forwards() == 3 * (output + tokens * features // 8)  # outputs and packed masks


# The pipeline's dtypes: float32 on a CPU, bf16 on a GPU (a CPU's bf16 dropout rounds twice).
DTYPES = [("cuda", torch.float32), ("cuda", torch.bfloat16)] if "cuda" in DEVICES else [("cpu", torch.float32)]


@pytest.mark.parametrize(("device", "dtype"), DTYPES)
def test_dropout_output_recomputed_from_its_mask_is_the_same(device, dtype):
    """What a checkpointed layer's recomputation and the backward rebuild from x and the mask
    equals the forward's dropout output (and so the stock recomputation's, which redraws it)."""
    x = torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    dropped, mask = torch.native_dropout(x, 0.1, True)
    assert torch.equal(torch.ops.aten.native_dropout_backward(x, mask, 1 / (1 - 0.1)), dropped)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_packed_mask_holds_entry_i_in_bit_i_and_unpacks_to_the_mask(device, dtype):
    """Every byte value (the top bit too: its word's product wraps negative) round-trips, and
    each byte is the sum of its 8 entries shifted by their place."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # byte value v's 8 entries
    drawn = torch.rand(96 * 64, generator=torch.Generator().manual_seed(0)) > 0.1  # as native_dropout keeps
    mask = torch.cat([bits.flatten().bool(), drawn]).to(device, dtype)
    packed = pack_mask(mask)
    by_definition = (mask.reshape(-1, 8).long().cpu() << torch.arange(8)).sum(dim=1)
    assert packed.dtype == torch.uint8 and torch.equal(packed.long().cpu(), by_definition)
    assert torch.equal(packed[:256].long().cpu(), torch.arange(256))
    unpacked = unpack_mask(packed, True, dtype, mask.reshape(128, 64))
    assert unpacked.dtype == dtype and torch.equal(unpacked, mask.reshape(128, 64))


def saved_bytes(tensors: list, parameters: set) -> int:
    """Bytes autograd keeps: each storage once, parameters left out (they exist anyway)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("device", DEVICES)
def test_folded_dropout_keeps_the_input_once_and_bit_packed_masks(lora_llama_dir, device):
    model = adapted(lora_llama_dir, device).to(device)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = torch.bfloat16 if device == "cuda" else None  # the GPU recipe; fp32 on the CPU
    stock, folded = [], []
    step(model, seed=5, autocast=autocast, saved=stock)
    recompute_lora_dropout(model)
    step(model, seed=5, autocast=autocast, saved=folded)
    tokens, saved_less = BATCH * SEQ, saved_bytes(stock, parameters) - saved_bytes(folded, parameters)
    if device == "cpu":
        # Stock, per adapter: the dropout's fp32 noise and its output; folded: x once, 1 bit a feature.
        assert saved_less == tokens * LAYERS * (2 * (4 + 4) * HIDDEN - 4 * HIDDEN - 2 * HIDDEN // 8)
    else:
        # bf16 under autocast: the memory model's per-token terms, plus the bf16 copy of lora_A's
        # weight that the stock linear keeps (the folded one casts it again in the backward).
        shape = ModelShape(hidden=HIDDEN, intermediate=128, layers=LAYERS, heads=4, kv_heads=4, vocab=256)
        per_token = [
            layer_activation_bytes(shape, RANK, "qv", "pipeline", "liger", recompute_dropout=r) for r in (0, 1)
        ]
        assert saved_less == tokens * LAYERS * (per_token[0] - per_token[1]) + LAYERS * 2 * 2 * RANK * HIDDEN
