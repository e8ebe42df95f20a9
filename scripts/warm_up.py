"""The GPU libraries' first calls on a thread beside the model's loading (``train.warm_up_beside_load``).

A run's first training step pays, once per process, for what each library sets up at its first
call: cuDNN's attention (1.8 s at the first call of a fresh process on an H200, then 0.11-0.15 s
at each new sequence length: bench/results/attention_shapes_h200.json), Triton's first launch
of each kernel (Liger's, the NF4 dequantisation: the compiled kernel and its launcher loaded),
CUDA's lazy loading of each kernel module (cuBLAS's among them). The batch-4 epoch's first,
eager step took 1.66-2.0 s where the same batch replays in 0.30 s
(bench/results/epochs_h200_revision2_b4). Meanwhile the main thread loads and quantises the
model, mostly host work. So this thread makes those first calls then, on small operands at the
model's widths (and the attention at the longest batch, the one group_by_length runs first),
and the main thread joins it before training: nothing runs beside a training step (a warm-up
beside the first step broke the loop's first recording, graph_recorder.Recorder.start).

What stays with the main thread: cuDNN's forward plans and the cuBLAS handles are per thread in
PyTorch. The backward's run on the autograd engine's device thread, which every thread shares.
No random numbers are drawn: the run's dropout masks are the same with or without it.
"""

import json
import threading
import time
from pathlib import Path

import torch

WARM_TOKENS = 64  # rows of the small operands (a multiple of 16, as a padded batch's token count)


class LibraryWarmUp:
    """``warm_up`` on a thread of its own: ``start`` before the model loads, ``join`` before training."""

    def __init__(
        self, model_dir: Path, kernels: str, dequantize: bool, fused_adamw: bool, longest: tuple[int, int], dtype
    ):
        self.model_dir, self.kernels, self.dequantize = Path(model_dir), kernels, dequantize
        self.fused_adamw, self.longest, self.dtype = fused_adamw, longest, dtype
        self.thread: threading.Thread | None = None
        self.seconds: dict[str, float] = {}  # each library's first calls, in order
        self.error: str | None = None
        self.started = 0.0

    def start(self) -> "LibraryWarmUp":
        if torch.cuda.is_available():
            self.started = time.perf_counter()
            self.thread = threading.Thread(target=self._run, name="library-warm-up", daemon=True)
            self.thread.start()
        return self

    def join(self) -> dict:
        """Waits for the thread; what it did, how long, and how long the main thread waited here."""
        if self.thread is None:
            return {"ran": False, "reason": "no CUDA device"}
        waiting = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - waiting
        return {
            "ran": self.error is None,
            "error": self.error,
            "seconds": {name: round(s, 4) for name, s in self.seconds.items()},
            "thread_seconds": round(sum(self.seconds.values()), 4),
            "waited_seconds": round(waited, 4),  # not beside the loading: the main thread's cost
        }

    def _run(self) -> None:
        try:
            warm_up(
                self.model_dir, self.kernels, self.dequantize, self.fused_adamw, self.longest, self.dtype, self.seconds
            )
        except Exception as error:  # a library left cold costs time, not correctness
            self.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"


def warm_up(
    model_dir: Path, kernels: str, dequantize: bool, fused_adamw: bool, longest: tuple[int, int], dtype, seconds: dict
) -> None:
    """The first calls the run's training step will make, per library, on the current CUDA
    device, each timed into ``seconds``."""
    from memory_model import ModelShape

    config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape.from_config(config)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)  # a new thread's current device is the first one
    head_dim = config.get("head_dim") or shape.hidden // shape.heads
    tokens, (batch, seq) = WARM_TOKENS, longest

    def timed(name: str, calls) -> None:
        begun = time.perf_counter()
        calls()
        torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - begun

    def rows(width: int) -> torch.Tensor:
        return torch.ones(tokens, width, device=device, dtype=dtype, requires_grad=True)

    def matmuls() -> None:  # cuBLAS and cuBLASLt (a bias epilogue), as the frozen and LoRA linears run
        x, weight = rows(shape.hidden), torch.ones(shape.hidden, shape.hidden, device=device, dtype=dtype)
        torch.nn.functional.linear(x, weight).sum().backward()
        torch.addmm(weight[0], x.detach(), weight)

    def attention() -> None:  # the eager step's kernel (torch's choice) at the first batch's shape
        q = torch.ones(batch, shape.heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        kv = torch.ones(batch, shape.kv_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        grouped = shape.kv_heads != shape.heads
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=grouped).sum().backward()

    timed("cublas", matmuls)
    timed("attention", attention)
    if dequantize:
        timed("nf4_dequantize", lambda: _dequantize(device, dtype))
    if kernels == "liger":
        timed("liger", lambda: _liger(config, shape, head_dim, rows, device, dtype))
    if fused_adamw:
        timed("adamw_fused", lambda: _adamw(device))


def _dequantize(device, dtype) -> None:
    from nf4_dequantize import BLOCKSIZE, dequantize_nf4

    packed = torch.zeros(BLOCKSIZE * 64, device=device, dtype=torch.uint8)
    absmax = torch.ones(packed.numel() * 2 // BLOCKSIZE, device=device)
    dequantize_nf4(packed, absmax, torch.empty(packed.numel() * 2, device=device, dtype=dtype))


def _liger(config: dict, shape, head_dim: int, rows, device, dtype) -> None:
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy, forward and backward, called
    as the patched Llama modules call them (modeling.apply_kernels)."""
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss, unpack_cross_entropy_result
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import _swiglu_dispatch

    norm = LigerRMSNorm(shape.hidden, eps=config.get("rms_norm_eps", 1e-6)).to(device, dtype)
    norm(rows(shape.hidden)).sum().backward()
    _swiglu_dispatch(rows(shape.intermediate), rows(shape.intermediate)).sum().backward()
    q = torch.ones(1, shape.heads, WARM_TOKENS, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.ones(1, shape.kv_heads, WARM_TOKENS, head_dim, device=device, dtype=dtype, requires_grad=True)
    cos = torch.ones(1, WARM_TOKENS, head_dim, device=device, dtype=dtype)
    sum(t.sum() for t in liger_rotary_pos_emb(q, k, cos, cos)).backward()
    head = torch.ones(shape.vocab, shape.hidden, device=device, dtype=dtype)
    labels = torch.zeros(1, WARM_TOKENS, device=device, dtype=torch.long)
    hidden = rows(shape.hidden)
    items = torch.ones((), device=device)
    unpack_cross_entropy_result(LigerForCausalLMLoss(hidden, head, labels, shape.hidden, items))[0].backward()


def _adamw(device) -> None:
    """The fused AdamW's kernel (the 7B configs' optimizer), on a parameter of its own."""
    parameter = torch.nn.Parameter(torch.ones(1024, device=device))
    parameter.grad = torch.ones_like(parameter)
    torch.optim.AdamW([parameter], fused=True).step()
