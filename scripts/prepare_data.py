"""Data stage, part 2: validate, parse into turns, format, subset, and measure token lengths.

Inputs are the raw rows of fetch_data (``{"row", "text"}``) and the base model's tokenizer.
Every chat row is parsed into (user, assistant) turns; a row with a missing or empty text,
broken ``[INST]``/``[/INST]`` or ``### Human:``/``### Assistant:`` structure, or undecodable
text either stops the run with the offending row numbers (``on_invalid_rows: fail``) or is
dropped and counted (``drop``). Turns are then rendered in one format for training and
evaluation alike:

- ``llama2``: the tutorial's ``<bos>[INST] user [/INST] answer <eos>`` per turn, using the
  base tokenizer's own BOS/EOS strings (exactly the guanaco-llama2 text for Llama-2);
- ``chat_template``: the base model's own chat template.

Outputs: ``train.jsonl`` (``row``, ``text``), ``eval_chat.jsonl`` (``row``, ``text``,
``turns``), ``wikitext.txt``, and ``stats.json`` (rows kept/dropped and why, token-length
statistics, the share truncated at ``max_length``).
"""

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import numpy

from runtime import log_arguments, setup_logging, write_manifest, write_provenance

LLAMA2_TURN = re.compile(r"\s*<s>\s*\[INST\](?P<user>.*?)\[/INST\](?P<assistant>.*?)</s>", re.S)
HUMAN_ASSISTANT_MARKER = re.compile(r"### (Human|Assistant):")
LLAMA2_MARKERS = ("<s>", "</s>", "[INST]", "[/INST]")


class InvalidRowsError(ValueError):
    """Rows that fail validation; the message lists them by 0-based source row number."""


class RowProblem(ValueError):
    pass


def parse_llama2_inst(text: str) -> list[tuple[str, str]]:
    turns, pos = [], 0
    while text[pos:].strip():
        match = LLAMA2_TURN.match(text, pos)
        if not match:
            raise RowProblem(f"broken <s>[INST] ... [/INST] ... </s> structure at character {pos}")
        user, assistant = match["user"].strip(), match["assistant"].strip()
        if any(marker in user + assistant for marker in LLAMA2_MARKERS):
            raise RowProblem("broken [INST]/[/INST] structure (a marker inside a turn)")
        if not user or not assistant:
            raise RowProblem("empty user or assistant turn")
        turns.append((user, assistant))
        pos = match.end()
    return turns


def parse_human_assistant(text: str) -> list[tuple[str, str]]:
    pieces = HUMAN_ASSISTANT_MARKER.split(text)
    if pieces[0].strip():
        raise RowProblem("text before the first '### Human:' marker")
    roles, contents = pieces[1::2], [p.strip() for p in pieces[2::2]]
    if roles and roles[-1] == "Human" and len(roles) > 1:
        # openassistant-guanaco ends a quarter of its conversations with an unanswered
        # prompt: nothing to learn or score there, so that last prompt is left out.
        roles, contents = roles[:-1], contents[:-1]
    if not roles or roles != ["Human", "Assistant"] * (len(roles) // 2):
        raise RowProblem("turns must alternate '### Human:' / '### Assistant:', starting with Human and with an answer")
    if not all(contents):
        raise RowProblem("empty user or assistant turn")
    return list(zip(contents[0::2], contents[1::2], strict=True))


PARSERS = {"llama2_inst": parse_llama2_inst, "human_assistant": parse_human_assistant}


def check_text(text) -> str:
    if text is None:
        raise RowProblem("missing text")
    if not isinstance(text, str):
        raise RowProblem(f"text is {type(text).__name__}, not a string")
    if not text.strip():
        raise RowProblem("empty text")
    if "\ufffd" in text or re.search(r"[\ud800-\udfff]", text):
        raise RowProblem("undecodable text (replacement character or lone surrogate)")
    return text


def parse_rows(rows: list[dict], markup: str, on_invalid: str, dataset: str, logger) -> tuple[list[dict], dict]:
    """Parse rows into turns. Fail listing every bad row, or drop them and count reasons."""
    parsed, problems = [], {}
    for row in rows:
        try:
            turns = PARSERS[markup](check_text(row.get("text")))
        except RowProblem as problem:
            problems.setdefault(str(problem), []).append(row["row"])
            continue
        parsed.append({"row": row["row"], "turns": turns})
    if problems:
        summary = "; ".join(
            f"{reason}: rows {numbers[:20]}{' ...' if len(numbers) > 20 else ''}"
            for reason, numbers in problems.items()
        )
        if on_invalid == "fail":
            raise InvalidRowsError(
                f"data set '{dataset}' has invalid rows (0-based): {summary}. "
                "Fix the file or set data.on_invalid_rows: drop"
            )
        logger.warning("%s: dropping invalid rows (0-based): %s", dataset, summary)
    return parsed, {reason: len(numbers) for reason, numbers in problems.items()}


def render(turns: list[tuple[str, str]], text_format: str, tokenizer) -> str:
    if text_format == "chat_template":
        messages = []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        # No trailing newline: the text must end with EOS (TRL appends one otherwise).
        return tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
    text = "".join(f"{bos}[INST] {user} [/INST] {assistant} {eos}" for user, assistant in turns)
    # A tokenizer that adds BOS itself (Llama-2's) would otherwise see it twice.
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("x").input_ids
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def subset(items: list, max_rows: int | None, seed: int) -> list:
    if max_rows is None or max_rows >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), max_rows))
    return [items[i] for i in chosen]


def length_stats(lengths: list[int], max_length: int | None) -> dict:
    ordered = sorted(lengths)
    stats = {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "mean": round(statistics.fmean(lengths), 1) if lengths else 0,
        "median": statistics.median(lengths) if lengths else 0,
        # Linear interpolation between closest ranks (numpy's default, R type 7).
        "p95": round(float(numpy.percentile(ordered, 95)), 2) if lengths else 0,
        "max": max(lengths, default=0),
    }
    if max_length:
        stats["max_length"] = max_length
        stats["share_truncated"] = round(sum(n > max_length for n in lengths) / max(len(lengths), 1), 4)
        stats["tokens_after_truncation"] = sum(min(n, max_length) for n in lengths)
    return stats


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with Path(path).open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def wikitext_prefix(text: str, max_tokens: int | None, tokenizer) -> str:
    """Whole lines of the document until max_tokens tokens (all of it when None)."""
    if max_tokens is None:
        return text
    kept, count = [], 0
    for line in text.splitlines(keepends=True):
        if count >= max_tokens:
            break
        kept.append(line)
        count += len(tokenizer(line, add_special_tokens=False).input_ids)
    return "".join(kept)


def main(
    train_rows: Path,
    eval_chat_rows: Path,
    wikitext_rows: Path,
    model_dir: Path,
    data: dict,
    out_train: Path,
    out_eval_chat: Path,
    out_wikitext: Path,
    out_stats: Path,
    provenance_path: Path,
    log_path: Path | None = None,
) -> None:
    from transformers import AutoTokenizer

    started = time.time()
    logger = setup_logging(log_path, "prepare_data")
    log_arguments(
        logger,
        train_rows=train_rows,
        eval_chat_rows=eval_chat_rows,
        wikitext_rows=wikitext_rows,
        model_dir=model_dir,
        data=data,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stats: dict = {"format": data["format"], "on_invalid_rows": data["on_invalid_rows"]}

    train, stats_train_invalid = parse_rows(
        read_jsonl(train_rows), data["train"]["markup"], data["on_invalid_rows"], "train", logger
    )
    eval_chat, stats_eval_invalid = parse_rows(
        read_jsonl(eval_chat_rows), data["eval_chat"]["markup"], data["on_invalid_rows"], "eval_chat", logger
    )

    # Held-out means held out: drop eval conversations whose first prompt is also trained on.
    train_prompts = {example["turns"][0][0] for example in train}
    overlapping = [e["row"] for e in eval_chat if e["turns"][0][0] in train_prompts]
    eval_chat = [e for e in eval_chat if e["row"] not in set(overlapping)]
    if overlapping:
        logger.info(
            "eval_chat: dropped %d row(s) whose prompt is in the training data: %s", len(overlapping), overlapping
        )

    train = subset(train, data["train"].get("max_rows"), data["subset_seed"])
    eval_chat = subset(eval_chat, data["eval_chat"].get("max_rows"), data["subset_seed"])
    for example in train + eval_chat:
        example["text"] = render(example["turns"], data["format"], tokenizer)

    for name, examples, invalid in (
        ("train", train, stats_train_invalid),
        ("eval_chat", eval_chat, stats_eval_invalid),
    ):
        lengths = [len(tokenizer(e["text"]).input_ids) for e in examples]
        stats[name] = {
            "invalid_rows": invalid,
            "turns": sum(len(e["turns"]) for e in examples),
            "rows_used": [e["row"] for e in examples],
            **length_stats(lengths, data["max_length"]),
        }
    stats["eval_chat"]["dropped_overlap_with_train"] = overlapping
    stats["eval_chat"]["unanswered_last_prompt_removed"] = (
        sum(HUMAN_ASSISTANT_MARKER.findall(r["text"] or "")[-1:] == ["Human"] for r in read_jsonl(eval_chat_rows))
        if data["eval_chat"]["markup"] == "human_assistant"
        else 0
    )

    (document,) = [r["text"] for r in read_jsonl(wikitext_rows)]
    document = check_text(document)
    wikitext = wikitext_prefix(document, data["wikitext"].get("max_tokens"), tokenizer)
    stats["wikitext"] = {
        "characters": len(wikitext),
        "tokens": len(tokenizer(wikitext, add_special_tokens=False).input_ids),
    }

    for path in (out_train, out_eval_chat, out_wikitext, out_stats):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_train, [{"row": e["row"], "text": e["text"]} for e in train])
    write_jsonl(out_eval_chat, [{"row": e["row"], "text": e["text"], "turns": e["turns"]} for e in eval_chat])
    Path(out_wikitext).write_text(wikitext)
    Path(out_stats).write_text(json.dumps(stats, indent=2) + "\n")
    write_provenance(provenance_path, "prepare_data", started, data=data, stats=stats)
    logger.info(
        "train %d rows (%d tokens, %.1f%% truncated at %d); eval_chat %d rows; wikitext %d tokens",
        stats["train"]["rows"],
        stats["train"]["tokens"],
        100 * stats["train"]["share_truncated"],
        data["max_length"],
        stats["eval_chat"]["rows"],
        stats["wikitext"]["tokens"],
    )


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        train_rows=Path(smk.input.train),
        eval_chat_rows=Path(smk.input.eval_chat),
        wikitext_rows=Path(smk.input.wikitext),
        model_dir=Path(smk.input.model_dir),
        data=smk.params.data,
        out_train=Path(smk.output.train),
        out_eval_chat=Path(smk.output.eval_chat),
        out_wikitext=Path(smk.output.wikitext),
        out_stats=Path(smk.output.stats),
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "prepare_data", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a pipeline config file (its data section is used)")
    parser.add_argument(
        "--raw-dir", type=Path, required=True, help="folder with fetch_data's {train,eval_chat,wikitext}.jsonl"
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    a = parser.parse_args()
    main(
        a.raw_dir / "train.jsonl",
        a.raw_dir / "eval_chat.jsonl",
        a.raw_dir / "wikitext.jsonl",
        a.model_dir,
        yaml.safe_load(a.config.read_text())["data"],
        a.out_dir / "train.jsonl",
        a.out_dir / "eval_chat.jsonl",
        a.out_dir / "wikitext.txt",
        a.out_dir / "stats.json",
        a.out_dir / "prepare_data.provenance.json",
        a.log,
    )
