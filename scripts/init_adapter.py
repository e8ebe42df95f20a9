"""Create the initial LoRA adapter of one (rank, alpha, dropout, targets, seed) once.

Both arms of a seed load this same adapter, so LoRA and QLoRA start from identical LoRA
weights (A random, B zero) and differ only in the base model's precision.
"""

import argparse
import time
from pathlib import Path

import torch

from modeling import TARGET_MODULES
from runtime import log_arguments, setup_logging, write_manifest, write_provenance


def main(
    model_dir: Path,
    out_dir: Path,
    lora_r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: str,
    seed: int,
    provenance_path: Path | None = None,
    log_path: Path | None = None,
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    started = time.time()
    logger = setup_logging(log_path, "init_adapter")
    log_arguments(
        logger,
        model_dir=model_dir,
        out_dir=out_dir,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        seed=seed,
    )
    # On the meta-free float32 base: only shapes matter here, and the result is device-neutral.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    set_seed(seed)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=TARGET_MODULES[target_modules],
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    peft_model.save_pretrained(out_dir)
    logger.info("initial adapter: %d trainable of %d parameters -> %s", trainable, total, out_dir)
    if provenance_path:
        write_provenance(
            provenance_path,
            "init_adapter",
            started,
            seed=seed,
            trainable_parameters=trainable,
            total_parameters=total,
            lora_config=config.to_dict(),
        )


def _from_snakemake(smk) -> None:
    started = time.time()
    w = smk.wildcards
    main(
        model_dir=Path(smk.input.model_dir),
        out_dir=Path(smk.output.adapter_dir),
        lora_r=int(w.lora_r),
        lora_alpha=float(w.lora_alpha),
        lora_dropout=float(w.lora_dropout),
        target_modules=w.target_modules,
        seed=int(w.seed),
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "init_adapter", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--target-modules", choices=sorted(TARGET_MODULES), default="qv")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path)
    a = parser.parse_args()
    main(a.model_dir, a.out_dir, a.lora_r, a.lora_alpha, a.lora_dropout, a.target_modules, a.seed, log_path=a.log)
