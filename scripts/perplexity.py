"""Perplexity and greedy samples of one model: the base (16- or 4-bit), an adapter on its
training base, or a merged model.

Perplexity is token-weighted (total NLL over total predicted tokens), padding masked,
in fixed batches in eval mode, so it is deterministic:

- ``eval_chat``: the held-out chat split over whole sequences, and ``eval_chat_assistant``
  over the assistant tokens only (each answer and its EOS);
- ``wikitext``: WikiText-2 test with a sliding window (``evaluate.wikitext_context``
  tokens, moved by ``evaluate.wikitext_stride``; each token is scored once, with at least
  context - stride tokens of left context, all preceding tokens in the first window),
  windows of equal length scored ``evaluate.batch_size`` at a time.

An answer token is one whose characters overlap the answer's span (so a token that carries
the answer's leading space counts, as the tokenizer of SmolLM2 and Llama make them).

Outputs: a tidy CSV (one row per data set: tokens, mean nll, perplexity, plus the model's
description), the same per held-out example (``*.examples.csv``: tokens and summed nll of
each conversation, for intervals over the eval set), and greedy generations for
``evaluate.sample_prompts`` in the chat format.
"""

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch

from gpu_assign import assign_gpus
from grid import GRID_COLUMNS
from modeling import load_base_model, resolve_compute_dtype
from prepare_data import adds_bos
from runtime import log_arguments, setup_logging, write_manifest, write_provenance

CSV_COLUMNS = ["model_kind", "model", "precision", *GRID_COLUMNS, "dataset", "tokens", "nll", "perplexity"]
# Per held-out example: nll is the sum over the example's scored tokens (nats).
EXAMPLE_COLUMNS = ["model_kind", "model", "precision", *GRID_COLUMNS, "dataset", "example", "tokens", "nll"]


def assistant_spans(text: str, turns: list, eos: str) -> list[tuple[int, int]]:
    """Character spans of each answer in the formatted text, with the EOS that closes it."""
    spans, pos = [], 0
    for user, answer in turns:
        start = text.find(answer, text.find(user, pos) + len(user))
        if start < 0:
            raise ValueError("an answer is missing from its formatted text")
        end = start + len(answer)
        rest = text[end:]
        if rest.lstrip().startswith(eos):
            end += len(rest) - len(rest.lstrip()) + len(eos)
        spans.append((start, end))
        pos = end
    return spans


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """NLL of every token given its prefix: shape (batch, seq-1), for targets input_ids[:, 1:]."""
    logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
    return token_nll_from_logits(logits, input_ids).cpu()


def token_nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of input_ids[:, 1:]. Flattened to (tokens, vocab): the contiguous float32
    log-softmax is accurate to ~1e-6, the transposed (batch, vocab, seq) one only to ~1e-4."""
    batch, length, vocab = logits.shape
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1).to(logits.device), reduction="none"
    )
    return nll.view(batch, length - 1)


def answer_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Which tokens belong to an answer: those whose characters overlap an answer span.

    A token that starts before the span (its leading space) but reaches into it is the
    answer's first token; a token that ends where the span starts is not."""
    return [end > start and any(start < e and end > s for s, e in spans) for start, end in offsets]


@torch.no_grad()
def chat_perplexity(
    model, tokenizer, examples: list[dict], max_length: int, batch_size: int, records: list | None = None
) -> dict:
    """Token-weighted NLL over whole sequences and over assistant tokens only; with
    ``records``, also one (dataset, example, tokens, nll) tuple per example and data set."""
    totals = {"eval_chat": [0.0, 0], "eval_chat_assistant": [0.0, 0]}
    tokenizer.padding_side = "right"
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        encoded = tokenizer(
            [e["text"] for e in chunk],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=True,
        )
        nll = token_nll(model, encoded["input_ids"], encoded["attention_mask"])
        full = encoded["attention_mask"][:, 1:].bool()
        assistant = torch.zeros_like(full)
        for row, example in enumerate(chunk):
            spans = assistant_spans(example["text"], example["turns"], tokenizer.eos_token)
            # Position j scores token j + 1: the mask of the targets, offsets[1:].
            assistant[row] = torch.tensor(answer_token_mask(encoded["offset_mapping"][row].tolist()[1:], spans))
        assistant &= full
        for name, mask in (("eval_chat", full), ("eval_chat_assistant", assistant)):
            totals[name][0] += float(nll[mask].sum())
            totals[name][1] += int(mask.sum())
            if records is not None:
                for row in range(len(chunk)):
                    records.append((name, first + row, int(mask[row].sum()), float(nll[row][mask[row]].sum())))
    return {name: (total, count) for name, (total, count) in totals.items()}


def sliding_windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_new) of each window over a text of ``length`` tokens: the window
    holds tokens [begin, end) and scores its targets from position first_new on, so that
    every token but the first is scored exactly once."""
    windows, scored_until = [], 1  # the first token has no prefix: never scored
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        windows.append((begin, end, max(scored_until, begin + 1) - (begin + 1)))
        scored_until = end
        if end == length:
            break
    return windows


@torch.no_grad()
def sliding_window_nll(model, ids: list[int], context: int, stride: int, batch_size: int = 1) -> tuple[float, int]:
    """Total NLL and token count over a long text, each token scored once; windows of the
    same length go through the model ``batch_size`` at a time."""
    total, count = 0.0, 0
    windows = sliding_windows(len(ids), context, stride)
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        groups: dict[int, list] = {}
        for window in chunk:  # only the last window can be shorter
            groups.setdefault(window[1] - window[0], []).append(window)
        for group in groups.values():
            batch = torch.tensor([ids[begin:end] for begin, end, _ in group])
            nll = token_nll(model, batch, torch.ones_like(batch))  # nll[r, j] scores token begin + j + 1
            for row, (_, _, first_new) in enumerate(group):
                total += float(nll[row, first_new:].sum())
                count += nll.shape[1] - first_new
    return total, count


def prompt_text(prompt: str, text_format: str, tokenizer) -> str:
    if text_format == "chat_template":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    text = f"{tokenizer.bos_token or ''}[INST] {prompt} [/INST]"
    if tokenizer.bos_token and adds_bos(tokenizer):  # the tokenizer adds BOS itself
        text = text.removeprefix(tokenizer.bos_token)
    return text


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], text_format: str, max_new_tokens: int) -> list[dict]:
    """Greedy answers to every prompt, generated together (left-padded batch)."""
    if not prompts:
        return []
    tokenizer.padding_side = "left"
    texts = [prompt_text(prompt, text_format, tokenizer) for prompt in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    tokenizer.padding_side = "right"
    completions = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return [{"prompt": p, "completion": c.strip()} for p, c in zip(prompts, completions, strict=True)]


def load_model(
    model_dir: Path,
    precision: str,
    compute_dtype: torch.dtype,
    quant_type: str,
    double_quant: bool,
    adapter_dir: Path | None,
):
    model = load_base_model(
        model_dir, "qlora" if precision == "4bit" else "lora", compute_dtype, quant_type, double_quant
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def main(
    model_dir: Path,
    description: dict,
    eval_chat_file: Path,
    wikitext_file: Path,
    evaluate: dict,
    text_format: str,
    out_csv: Path,
    out_samples: Path,
    adapter_dir: Path | None = None,
    out_examples: Path | None = None,
    compute_dtype: str = "auto",
    threads: int = 2,
    provenance_path: Path | None = None,
    log_path: Path | None = None,
    gpus: int = 0,
    jobs_per_gpu: int = 1,
) -> list[dict]:
    from transformers import AutoTokenizer

    started = time.time()
    logger = setup_logging(log_path, "evaluate")
    log_arguments(
        logger,
        model_dir=model_dir,
        description=description,
        adapter_dir=adapter_dir,
        eval_chat_file=eval_chat_file,
        wikitext_file=wikitext_file,
        evaluate=evaluate,
        text_format=text_format,
        compute_dtype=compute_dtype,
        threads=threads,
        gpus=gpus,
    )
    assign_gpus(gpus, logger, jobs_per_gpu=jobs_per_gpu)  # before anything initialises CUDA
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = resolve_compute_dtype(compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(
        model_dir,
        description["precision"],
        dtype,
        description.get("quant_type") or "nf4",
        bool(description.get("double_quant")),
        adapter_dir,
    )

    examples = [json.loads(line) for line in Path(eval_chat_file).read_text().splitlines()]
    records: list = []
    results = chat_perplexity(model, tokenizer, examples, evaluate["max_length"], evaluate["batch_size"], records)
    wikitext_ids = tokenizer(Path(wikitext_file).read_text(), add_special_tokens=False).input_ids
    results["wikitext"] = sliding_window_nll(
        model, wikitext_ids, evaluate["wikitext_context"], evaluate["wikitext_stride"], evaluate["batch_size"]
    )
    rows = []
    for dataset, (total, count) in results.items():
        row = {column: description.get(column) for column in CSV_COLUMNS}
        row.update(dataset=dataset, tokens=count, nll=total / count, perplexity=math.exp(total / count))
        rows.append(row)
        logger.info("%s: %d tokens, perplexity %.4f", dataset, count, row["perplexity"])
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with Path(out_csv).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if out_examples:
        with Path(out_examples).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=EXAMPLE_COLUMNS)
            writer.writeheader()
            for dataset, example, tokens, nll in sorted(records):
                row = {column: description.get(column) for column in EXAMPLE_COLUMNS}
                writer.writerow(dict(row, dataset=dataset, example=example, tokens=tokens, nll=nll))
    samples = greedy_samples(model, tokenizer, evaluate["sample_prompts"], text_format, evaluate["max_new_tokens"])
    Path(out_samples).parent.mkdir(parents=True, exist_ok=True)
    Path(out_samples).write_text("".join(json.dumps({**description, **s}, ensure_ascii=False) + "\n" for s in samples))
    if provenance_path:
        write_provenance(provenance_path, "evaluate", started, description=description, evaluate=evaluate)
    return rows


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        model_dir=Path(smk.input.model_dir),
        description=dict(smk.params.description),
        eval_chat_file=Path(smk.input.eval_chat),
        wikitext_file=Path(smk.input.wikitext),
        evaluate=smk.params.evaluate,
        text_format=smk.params.text_format,
        out_csv=Path(smk.output.table),
        out_samples=Path(smk.output.samples),
        adapter_dir=Path(smk.input.adapter_dir) if "adapter_dir" in smk.input.keys() else None,
        out_examples=Path(smk.output.examples),
        compute_dtype=smk.params.compute_dtype,
        threads=smk.threads,
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
        gpus=getattr(smk.resources, "gpu", 0),
        jobs_per_gpu=smk.config["resources"].get("jobs_per_gpu", 1),
    )
    write_manifest(smk, "evaluate", started)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments naming the model an evaluation scores (this stage and downstream.py)."""
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--adapter-dir", type=Path)
    parser.add_argument("--precision", choices=["16bit", "4bit"], default="16bit")
    parser.add_argument("--data-dir", type=Path, required=True, help="prepare_data's output folder")
    parser.add_argument("--out-dir", type=Path, required=True)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="pipeline config (evaluate section, data.format)")
    add_model_arguments(parser)
    a = parser.parse_args()
    cfg = yaml.safe_load(a.config.read_text())
    main(
        a.model_dir,
        {"model_kind": "cli", "model": str(a.model_dir), "precision": a.precision},
        a.data_dir / "eval_chat.jsonl",
        a.data_dir / "wikitext.txt",
        cfg["evaluate"],
        cfg["data"]["format"],
        a.out_dir / "perplexity.csv",
        a.out_dir / "samples.jsonl",
        adapter_dir=a.adapter_dir,
        out_examples=a.out_dir / "perplexity.examples.csv",
        compute_dtype=cfg["train"]["compute_dtype"],
    )
