"""train.dequantize: triton writes bitsandbytes' NF4 dequantised weights bit for bit (on a CUDA
GPU), and a run without one keeps bitsandbytes' kernel and says why."""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import nf4_dequantize  # noqa: E402

LOGGER = logging.getLogger("test")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a CUDA GPU")


@pytest.fixture
def installed():
    from bitsandbytes.backends.cuda import ops

    before = ops._dequantize_4bit_impl
    yield nf4_dequantize.install(LOGGER)
    ops._dequantize_4bit_impl = before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_bitsandbytes_kernel_stays():
    assert nf4_dequantize.install(LOGGER) == "bitsandbytes (no CUDA device)"  # what ran, and why


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (64, 3), (1, 4098)])
def test_triton_dequantisation_equals_bitsandbytes_bit_for_bit(installed, shape, dtype):
    """Weights quantised by bitsandbytes (7B shapes, and shapes whose last program is partial)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.cuda import ops

    assert installed == "triton"
    torch.manual_seed(0)
    weight = torch.randn(shape, device="cuda", dtype=dtype) * 0.02
    weight[0, :2] = 0.0  # the table's zero, and a block whose absmax is tiny
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ours = F.dequantize_4bit(packed, state)
    theirs = torch.empty(shape, dtype=dtype, device="cuda")
    ops._dequantize_4bit_impl.bitsandbytes_impl(packed, state.absmax, 64, "nf4", dtype, out=theirs)
    assert nf4_dequantize.served(packed, state.absmax, 64, "nf4", dtype, ours)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    # every code with every absmax bit pattern of a block: random bytes, absmax over 12 decades
    codes = torch.randint(0, 256, (weight.numel() // 2, 1), dtype=torch.uint8, device="cuda")
    absmax = torch.logspace(-6, 6, state.absmax.numel(), device="cuda", dtype=torch.float32)
    ours = torch.empty(shape, dtype=dtype, device="cuda")
    nf4_dequantize.dequantize_nf4(codes, absmax, ours)
    ops._dequantize_4bit_impl.bitsandbytes_impl(codes, absmax, 64, "nf4", dtype, out=theirs)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


@CUDA
def test_a_4bit_layer_trains_to_the_same_numbers(installed):
    """A Linear4bit's forward and input gradient (the two places bitsandbytes dequantises)."""
    import bitsandbytes as bnb
    from bitsandbytes.backends.cuda import ops

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(4096, 11008, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    x = torch.randn(2, 300, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        x.grad = None
        out = layer(x)
        out.float().square().mean().backward()
        return out.detach().clone(), x.grad.clone()

    ours = step()
    ops._dequantize_4bit_impl, triton_impl = ops._dequantize_4bit_impl.bitsandbytes_impl, ops._dequantize_4bit_impl
    try:
        theirs = step()
    finally:
        ops._dequantize_4bit_impl = triton_impl
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
