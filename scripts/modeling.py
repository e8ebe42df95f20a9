"""Loading the base model for one arm: the only place where LoRA and QLoRA differ.

``lora`` loads the base in the compute dtype (bf16/fp16 on a GPU, float32 on a CPU);
``qlora`` loads the same weights through bitsandbytes 4-bit (NF4/FP4, optional double
quantisation) with the same compute dtype. Nothing else differs between the arms: no
fp32 upcast of norms or embeddings in one arm only.
"""

import os

import torch

TARGET_MODULES = {"qv": ["q_proj", "v_proj"], "all_linear": "all-linear"}


def device() -> torch.device:
    """This process's GPU (its LOCAL_RANK under torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")


def device_map() -> dict:
    """from_pretrained's device_map that puts the whole model on this process's device."""
    target = device()
    return {"": target.index if target.type == "cuda" else "cpu"}


def resolve_compute_dtype(name: str) -> torch.dtype:
    """auto: bf16 where the GPU supports it (the tutorial's capability check), else fp16; fp32 on a CPU."""
    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def bnb_cpu_workaround(model) -> int:
    """bitsandbytes 0.50.2 on CPUs with AVX512-BF16: an eval-mode forward before training
    makes later gradients zero, and saving after one corrupts the weights. Turning the
    bf16 CPU path off on every Linear4bit avoids both (regression test in tests/)."""
    import bitsandbytes as bnb

    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def load_base_model(
    model_dir, method: str, compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = False
):
    """The base model of one arm on the current device."""
    from transformers import AutoModelForCausalLM

    target = device()
    kwargs = {"dtype": compute_dtype, "device_map": device_map()}
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype)
    elif method != "lora":
        raise ValueError(f"unknown method {method!r} (lora or qlora)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method == "qlora" and target.type == "cpu":
        bnb_cpu_workaround(model)
    return model


def apply_kernels(model, kernels: str, logger) -> str:
    """Liger's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy (no logits tensor) on a
    Llama model; they need CUDA (Triton), so a CPU run keeps the stock kernels and says so.
    Returns the kernels in use."""
    if kernels == "none":
        return "none"
    if not torch.cuda.is_available():
        logger.warning("kernels %s need CUDA; running with the stock transformers kernels", kernels)
        return "none"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as error:
        raise RuntimeError(
            "config train.kernels is 'liger' but liger-kernel is not installed: "
            "pip install -r requirements-gpu.txt (or set train.kernels: none)"
        ) from error
    if model.config.model_type != "llama":
        raise ValueError(f"config train.kernels 'liger' supports Llama models here, not {model.config.model_type!r}")
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model
    )
    return kernels
