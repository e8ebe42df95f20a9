"""Merge one cell's adapter into the 16-bit base, save it in ``merge.dtype``, verify it.

How the merge is made: the base is loaded in float32, the adapter attached and folded in
(``merge_and_unload``) in float32, and the result cast once to ``merge.dtype`` (auto: bf16
on a GPU that has it, else fp16; float32 on a CPU; an explicit dtype is honoured on a CPU
too) and saved. Folding in 16-bit would round every merged weight twice.

How it is verified, on a fixed batch of held-out chat examples (``merge.check_rows``),
every logit compared at the batch's real tokens, against the float32 base + adapter
(unmerged) as the reference:

1. every LoRA tensor of the adapter file is loaded (a renamed or missing key would leave
   the base untouched);
2. the fold, in float32: merged vs unmerged logits. The error is judged against the
   adapter's own effect on the same batch (base vs base + adapter): its mean must stay
   below ``merge.max_fold_error_share`` of that effect, so a merge that leaves the base
   untouched, drops or doubles part of the adapter fails however small the adapter is;
3. the saved model, reloaded from disk in ``merge.dtype`` with vanilla transformers, vs
   the reference. The tolerance is the precision floor measured on the same batch: the
   unmerged model run in ``merge.dtype`` vs the reference, times
   ``merge.precision_floor_factor`` (max and mean |logit diff| alike); in float32 the
   floor is the float32 fold's own difference;
4. every logit and perplexity is finite.

For QLoRA cells the gap between the adapter on the 4-bit base it was trained on and the
merged 16-bit model (the known merge degradation) is reported, never fatal.

Outputs: the merged model folder (safetensors + tokenizer; vanilla transformers loads it)
and ``merge_check.json`` with every measured difference beside its tolerance; on failure
the check is written, the model is not, and the error names each failed criterion.
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from gpu_assign import assign_gpus
from modeling import device_map, load_base_model, resolve_compute_dtype
from perplexity import token_nll_from_logits
from runtime import log_arguments, setup_logging, write_manifest, write_provenance

# Mean |logit diff| of a correct float32 fold, measured on SmolLM2-135M: 7e-6 (max 8e-5).
# Below this an adapter's effect cannot be told from float32 rounding, so step 2 allows it.
FLOAT32_FOLD_FLOOR = 1e-4


class MergeCheckError(RuntimeError):
    pass


def fixed_batch(eval_file: Path, tokenizer, rows: int, max_length: int) -> dict:
    texts = [json.loads(line)["text"] for line in Path(eval_file).read_text().splitlines()[:rows]]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


@torch.no_grad()
def logits_and_ppl(model, batch: dict) -> tuple[torch.Tensor, float]:
    """Float32 logits on the batch and its token-weighted perplexity (padding masked)."""
    model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(**batch).logits.float()
    mask = batch["attention_mask"][:, 1:].bool()
    nll = token_nll_from_logits(logits, batch["input_ids"])
    return logits, math.exp(float(nll[mask].sum() / mask.sum()))


def check_adapter_loaded(peft_model, adapter_dir: Path) -> int:
    """Every LoRA tensor in the file equals the tensor the model now holds."""
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    held = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    missing = []
    for key, tensor in saved.items():
        name = key.replace(".weight", ".default.weight")
        match = [p for held_name, p in held.items() if held_name.endswith(name)]
        # equal_nan: a NaN in the file that is also in the model was loaded (the logit check catches it).
        if len(match) != 1 or not torch.allclose(match[0].detach().cpu().float(), tensor.float(), 0, 0, True):
            missing.append(key)
    if missing or not saved:
        raise MergeCheckError(f"adapter {adapter_dir}: {len(missing)} LoRA tensor(s) not loaded, e.g. {missing[:3]}")
    return len(saved)


def fold_adapter(peft_model):
    """The merge itself: LoRA deltas added into the base weights (PEFT), adapter removed."""
    return peft_model.merge_and_unload()


def logit_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Max and mean |a - b| over the batch's real (unpadded) positions."""
    diff = (a - b).abs()[mask.to(a.device)]
    return float(diff.max()), float(diff.mean())


def judge(check: dict, merge: dict) -> list[str]:
    """The failed criteria, one sentence each (empty: the merge is faithful)."""
    failures = []
    values = [v for k, v in check.items() if isinstance(v, float)]
    if not all(math.isfinite(v) for v in values):
        bad = sorted(k for k, v in check.items() if isinstance(v, float) and not math.isfinite(v))
        failures.append(f"non-finite values: {', '.join(bad)}")
    tolerance = check["tolerance"]
    if not check["fold_mean_abs_logit_diff"] <= tolerance["fold_mean_abs_logit_diff"]:
        failures.append(
            f"the float32 fold changes logits by {check['fold_mean_abs_logit_diff']:.3g} on average, "
            f"{check['fold_error_share']:.1%} of the adapter's own effect "
            f"({check['adapter_effect_mean_abs_logit_diff']:.3g}; allowed {merge['max_fold_error_share']:.1%}): "
            "part of the adapter is missing, doubled or not merged"
        )
    for stat in ("max", "mean"):
        key = f"{stat}_abs_logit_diff"
        if not check[key] <= tolerance[key]:
            failures.append(
                f"the saved {check['dtype']} model differs from base+adapter by {stat} |logit diff| "
                f"{check[key]:.3g}, beyond {tolerance[key]:.3g} "
                f"({merge['precision_floor_factor']} x the {check['dtype']} precision floor "
                f"{check[f'precision_floor_{key}']:.3g})"
            )
    return failures


def main(
    model_dir: Path,
    adapter_dir: Path,
    eval_file: Path,
    cell: dict,
    merge: dict,
    max_length: int,
    out_dir: Path,
    check_path: Path,
    threads: int = 2,
    provenance_path: Path | None = None,
    log_path: Path | None = None,
    gpus: int = 0,
    jobs_per_gpu: int = 1,
) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    logger = setup_logging(log_path, "merge")
    log_arguments(
        logger,
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        eval_file=eval_file,
        cell=cell,
        merge=merge,
        max_length=max_length,
        out_dir=out_dir,
        threads=threads,
        gpus=gpus,
    )
    assign_gpus(gpus, logger, jobs_per_gpu=jobs_per_gpu)  # before anything initialises CUDA
    torch.set_num_threads(threads)
    dtype = resolve_compute_dtype(merge["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = fixed_batch(eval_file, tokenizer, merge["check_rows"], max_length)
    mask = batch["attention_mask"].bool()

    # The float32 reference: the base, then base + adapter, then their fold.
    base = load_base_model(model_dir, "lora", torch.float32)
    base_logits, base_ppl = logits_and_ppl(base, batch)
    try:
        unmerged = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as err:  # a corrupt or mismatched adapter: say which, not a bare traceback
        raise MergeCheckError(f"adapter {adapter_dir} cannot be attached to {model_dir}: {err}") from err
    tensors = check_adapter_loaded(unmerged, Path(adapter_dir))
    reference_logits, reference_ppl = logits_and_ppl(unmerged, batch)
    merged = fold_adapter(unmerged)
    fold_logits, _ = logits_and_ppl(merged, batch)
    check = {
        **cell,
        "dtype": str(dtype).removeprefix("torch."),
        "check_rows": int(batch["input_ids"].shape[0]),
        "check_tokens": int(mask.sum()),
        "lora_tensors_verified": tensors,
        "base_ppl": base_ppl,
        "unmerged_ppl": reference_ppl,
    }
    effect = logit_diff(reference_logits, base_logits, mask)
    fold = logit_diff(fold_logits, reference_logits, mask)
    del base_logits, fold_logits
    check["adapter_effect_max_abs_logit_diff"], check["adapter_effect_mean_abs_logit_diff"] = effect
    check["fold_max_abs_logit_diff"], check["fold_mean_abs_logit_diff"] = fold
    check["fold_error_share"] = fold[1] / effect[1] if effect[1] > 0 else float("inf") if fold[1] else 0.0

    # Cast once, save, and check what was saved, reloaded as a user would load it.
    merged.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del merged, unmerged, base
    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, device_map=device_map())
    saved_logits, check["merged_ppl"] = logits_and_ppl(saved, batch)
    check["max_abs_logit_diff"], check["mean_abs_logit_diff"] = logit_diff(saved_logits, reference_logits, mask)
    check["rel_ppl_diff"] = abs(check["merged_ppl"] - reference_ppl) / reference_ppl
    del saved, saved_logits

    # The precision floor: the unmerged model itself, run in merge.dtype.
    if dtype == torch.float32:  # the saved weights are the fold's: its rounding is the floor
        floor, check["floor_rel_ppl_diff"] = fold, 0.0
    else:
        low = PeftModel.from_pretrained(load_base_model(model_dir, "lora", dtype), str(adapter_dir))
        low_logits, low_ppl = logits_and_ppl(low, batch)
        floor = logit_diff(low_logits, reference_logits, mask)
        check["floor_rel_ppl_diff"] = abs(low_ppl - reference_ppl) / reference_ppl
        del low, low_logits
    check["precision_floor_max_abs_logit_diff"], check["precision_floor_mean_abs_logit_diff"] = floor
    fold_tolerance = max(merge["max_fold_error_share"] * effect[1], FLOAT32_FOLD_FLOOR)
    check["tolerance"] = {
        "fold_mean_abs_logit_diff": fold_tolerance,
        "max_abs_logit_diff": max(merge["precision_floor_factor"] * floor[0], 1e-6),
        "mean_abs_logit_diff": max(merge["precision_floor_factor"] * floor[1], 1e-6),
        "max_fold_error_share": merge["max_fold_error_share"],
        "precision_floor_factor": merge["precision_floor_factor"],
    }

    if cell["method"] == "qlora":
        quantized = PeftModel.from_pretrained(
            load_base_model(model_dir, "qlora", dtype, cell["quant_type"], cell["double_quant"]), str(adapter_dir)
        )
        _, check["adapter_on_4bit_ppl"] = logits_and_ppl(quantized, batch)
        check["merge_gap_rel_ppl"] = (check["merged_ppl"] - check["adapter_on_4bit_ppl"]) / check["adapter_on_4bit_ppl"]
        logger.info(
            "QLoRA merge gap: 4-bit+adapter ppl %.4f -> merged 16-bit ppl %.4f (%.2f%%, reported only)",
            check["adapter_on_4bit_ppl"],
            check["merged_ppl"],
            100 * check["merge_gap_rel_ppl"],
        )
        del quantized

    failures = judge(check, merge)
    check["passed"], check["failures"] = not failures, failures
    Path(check_path).parent.mkdir(parents=True, exist_ok=True)
    Path(check_path).write_text(json.dumps(check, indent=2) + "\n")
    logger.info(
        "merge check (%s): adapter effect mean |dlogit| %.3g; fold error %.3g (%.2f%% of it); saved model "
        "max/mean |dlogit| %.3g/%.3g vs floor %.3g/%.3g; ppl %.5f vs %.5f -> %s",
        check["dtype"],
        effect[1],
        fold[1],
        100 * check["fold_error_share"],
        check["max_abs_logit_diff"],
        check["mean_abs_logit_diff"],
        floor[0],
        floor[1],
        check["merged_ppl"],
        reference_ppl,
        "passed" if check["passed"] else "FAILED",
    )
    if failures:
        shutil.rmtree(out_dir, ignore_errors=True)  # never leave an unverified model behind
        raise MergeCheckError(f"merge check failed for {adapter_dir}: " + "; ".join(failures) + f"; see {check_path}")
    if provenance_path:
        write_provenance(provenance_path, "merge", started, cell=cell, merge=merge, check=check)
    return check


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        model_dir=Path(smk.input.model_dir),
        adapter_dir=Path(smk.input.adapter_dir),
        eval_file=Path(smk.input.eval_chat),
        cell=dict(smk.params.cell),
        merge=smk.params.merge,
        max_length=smk.params.max_length,
        out_dir=Path(smk.output.merged_dir),
        check_path=Path(smk.output.check),
        threads=smk.threads,
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
        gpus=getattr(smk.resources, "gpu", 0),
        jobs_per_gpu=smk.config["resources"].get("jobs_per_gpu", 1),
    )
    write_manifest(smk, "merge", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="pipeline config (merge and evaluate sections)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--adapter-dir", type=Path, required=True)
    parser.add_argument("--eval-file", type=Path, required=True, help="prepare_data's eval_chat.jsonl")
    parser.add_argument("--method", choices=["lora", "qlora"], required=True)
    parser.add_argument("--quant-type", default="nf4")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--out-dir", type=Path, required=True)
    a = parser.parse_args()
    cfg = yaml.safe_load(a.config.read_text())
    main(
        a.model_dir,
        a.adapter_dir,
        a.eval_file,
        {"method": a.method, "quant_type": a.quant_type, "double_quant": a.double_quant},
        cfg["merge"],
        cfg["evaluate"]["max_length"],
        a.out_dir / "merged",
        a.out_dir / "merge_check.json",
    )
