"""Tokenizer and chat-template audit of the base model a training run uses.

Records the chat template's sha256, the BOS/EOS/PAD/UNK tokens and ids, whether the
tokenizer adds BOS itself, and checks on real formatted training examples that EOS
survives in the labels: the two shortest examples are tokenised and collated exactly as
TRL's SFTTrainer does (``DataCollatorForLanguageModeling`` with the tokenizer's pad id),
and the last labelled token of the shorter, padded one must be EOS. A tokenizer whose
pad token is EOS would mask it, and the model would never learn to stop: the job fails.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

from prepare_data import adds_bos, read_jsonl
from runtime import log_arguments, setup_logging, write_manifest, write_provenance

IGNORE_INDEX = -100


class TokenizerAuditError(RuntimeError):
    """The tokenizer or the formatted data would lose EOS (or padding would be learnt)."""


def special_tokens(tokenizer) -> dict:
    return {
        f"{kind}_{field}": getattr(tokenizer, f"{kind}_{field}")
        for kind in ("bos", "eos", "pad", "unk")
        for field in ("token", "token_id")
    }


def eos_label_check(tokenizer, texts: list[str], max_length: int | None) -> dict:
    """Collate the two shortest texts like SFTTrainer; the padded one must end in a labelled EOS."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if len(texts) < 2:
        raise TokenizerAuditError(f"need at least two formatted training examples, got {len(texts)}")
    short, long = sorted(texts, key=len)[:2]
    ids = [tokenizer(text).input_ids for text in (short, long)]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    labels = collator([{"input_ids": i} for i in ids])["labels"][0]
    kept = labels[labels != IGNORE_INDEX]
    last = int(kept[-1]) if len(kept) else None
    padded = int((labels == IGNORE_INDEX).sum())
    return {
        "example_tokens": len(ids[0]),
        "example_fits_max_length": max_length is None or len(ids[0]) <= max_length,
        "example_ends_with_eos_text": short.endswith(tokenizer.eos_token),
        "last_label_id": last,
        "eos_in_labels": last == tokenizer.eos_token_id,
        "padding_positions_masked": padded,
    }


def main(
    model_dir: Path,
    train_file: Path,
    max_length: int | None,
    out_path: Path,
    provenance_path: Path,
    log_path: Path | None = None,
) -> dict:
    from transformers import AutoTokenizer

    started = time.time()
    logger = setup_logging(log_path, "tokenizer_audit")
    log_arguments(logger, model_dir=model_dir, train_file=train_file, max_length=max_length, out_path=out_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    texts = [row["text"] for row in read_jsonl(train_file)]
    audit = {
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        **special_tokens(tokenizer),
        "pad_differs_from_eos": tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id,
        "adds_bos": adds_bos(tokenizer),
        "padding_side": tokenizer.padding_side,
        "eos_check": eos_label_check(tokenizer, texts, max_length),
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(audit, indent=2, sort_keys=True) + "\n")
    write_provenance(provenance_path, "tokenizer_audit", started, audit=audit)
    check = audit["eos_check"]
    if not audit["pad_differs_from_eos"]:
        raise TokenizerAuditError(f"pad token id {tokenizer.pad_token_id} equals EOS: EOS would be masked")
    if not check["eos_in_labels"]:
        raise TokenizerAuditError(
            f"EOS (id {tokenizer.eos_token_id}) is not the last label of a collated example "
            f"(last label id {check['last_label_id']}): the model would not learn to stop"
        )
    if check["padding_positions_masked"] == 0:
        raise TokenizerAuditError("padding of the shorter example was not masked out of the labels")
    logger.info(
        "chat template %s, eos %r (%s), pad %r (%s): EOS kept in the labels -> %s",
        (audit["chat_template_sha256"] or "none")[:12],
        tokenizer.eos_token,
        tokenizer.eos_token_id,
        tokenizer.pad_token,
        tokenizer.pad_token_id,
        out_path,
    )
    return audit


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        model_dir=Path(smk.input.model_dir),
        train_file=Path(smk.input.train),
        max_length=smk.params.max_length,
        out_path=Path(smk.output.audit),
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "tokenizer_audit", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True, help="formatted training examples (data/train.jsonl)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--provenance", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    a = parser.parse_args()
    try:
        main(a.model_dir, a.train, a.max_length, a.out, a.provenance, a.log)
    except TokenizerAuditError as err:
        raise SystemExit(f"tokenizer audit failed: {err}") from None
