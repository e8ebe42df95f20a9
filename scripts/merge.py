"""Merge one cell's adapter into the 16-bit base and verify the merge.

The base is reloaded in 16-bit (``merge.dtype``; float32 on a CPU), the adapter attached,
and ``merge_and_unload`` folds it in. Verification on a fixed batch of held-out chat
examples, in the same precision:

- every LoRA tensor of the adapter file is really loaded (a renamed or missing key would
  otherwise leave the base untouched and the check meaningless);
- merged logits vs base+adapter (unmerged) logits: max and mean absolute difference and
  the perplexity difference; the job fails beyond ``merge.max_abs_logit_diff`` /
  ``merge.max_rel_ppl_diff`` or on any non-finite value;
- for QLoRA cells, also the gap between the adapter on the 4-bit base it was trained on
  and the merged 16-bit model (the known merge degradation): reported, never fatal.

Outputs: the merged model folder (safetensors + tokenizer; vanilla transformers loads it)
and ``merge_check.json``.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from evaluate import token_nll_from_logits
from modeling import load_base_model, resolve_compute_dtype
from runtime import log_arguments, setup_logging, write_manifest, write_provenance


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
    )
    torch.set_num_threads(threads)
    dtype = resolve_compute_dtype(merge["dtype"]) if torch.cuda.is_available() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = fixed_batch(eval_file, tokenizer, merge["check_rows"], max_length)

    try:
        unmerged = PeftModel.from_pretrained(load_base_model(model_dir, "lora", dtype), str(adapter_dir))
    except Exception as err:  # a corrupt or mismatched adapter: say which, not a bare traceback
        raise MergeCheckError(f"adapter {adapter_dir} cannot be attached to {model_dir}: {err}") from err
    tensors = check_adapter_loaded(unmerged, Path(adapter_dir))
    unmerged_logits, unmerged_ppl = logits_and_ppl(unmerged, batch)
    merged = unmerged.merge_and_unload()
    merged_logits, merged_ppl = logits_and_ppl(merged, batch)
    mask = batch["attention_mask"].bool()
    diff = (merged_logits - unmerged_logits).abs()[mask.to(merged_logits.device)]
    check = {
        **cell,
        "dtype": str(dtype).removeprefix("torch."),
        "check_rows": int(batch["input_ids"].shape[0]),
        "check_tokens": int(mask.sum()),
        "lora_tensors_verified": tensors,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "unmerged_ppl": unmerged_ppl,
        "merged_ppl": merged_ppl,
        "rel_ppl_diff": abs(merged_ppl - unmerged_ppl) / unmerged_ppl,
        "tolerance": {"max_abs_logit_diff": merge["max_abs_logit_diff"], "max_rel_ppl_diff": merge["max_rel_ppl_diff"]},
    }
    del unmerged_logits
    if cell["method"] == "qlora":
        quantized = PeftModel.from_pretrained(
            load_base_model(model_dir, "qlora", dtype, cell["quant_type"], cell["double_quant"]), str(adapter_dir)
        )
        _, check["adapter_on_4bit_ppl"] = logits_and_ppl(quantized, batch)
        check["merge_gap_rel_ppl"] = (merged_ppl - check["adapter_on_4bit_ppl"]) / check["adapter_on_4bit_ppl"]
        logger.info(
            "QLoRA merge gap: 4-bit+adapter ppl %.4f -> merged 16-bit ppl %.4f (%.2f%%, reported only)",
            check["adapter_on_4bit_ppl"],
            merged_ppl,
            100 * check["merge_gap_rel_ppl"],
        )
        del quantized

    finite = all(math.isfinite(check[k]) for k in ("max_abs_logit_diff", "unmerged_ppl", "merged_ppl"))
    check["passed"] = bool(
        finite
        and check["max_abs_logit_diff"] <= merge["max_abs_logit_diff"]
        and check["rel_ppl_diff"] <= merge["max_rel_ppl_diff"]
    )
    Path(check_path).parent.mkdir(parents=True, exist_ok=True)
    Path(check_path).write_text(json.dumps(check, indent=2) + "\n")
    logger.info(
        "merge check: max |dlogit| %.3g, mean %.3g, ppl %.5f vs %.5f -> %s",
        check["max_abs_logit_diff"],
        check["mean_abs_logit_diff"],
        merged_ppl,
        unmerged_ppl,
        "passed" if check["passed"] else "FAILED",
    )
    if not check["passed"]:
        raise MergeCheckError(
            f"merge check failed for {adapter_dir}: max |logit diff| {check['max_abs_logit_diff']:.4g} "
            f"(tolerance {merge['max_abs_logit_diff']}), relative ppl diff {check['rel_ppl_diff']:.4g} "
            f"(tolerance {merge['max_rel_ppl_diff']}), finite={finite}; see {check_path}"
        )
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    AutoModelForCausalLM.from_pretrained(out_dir)  # the saved folder loads with vanilla transformers
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
