"""One benchmark row trained with unsloth, in this process; prints ``ROW {json}`` last.

Unsloth's QLoRA at the same settings as the pipeline's rows (bench/gpu_recipes.py): its own
4-bit load (NF4, double quantization, bf16 compute), its LoRA kernels and checkpointing, TRL's
SFTTrainer as unsloth patches it, the rows in the given order (a sequential sampler). Timing
and memory as the train stage measures them (scripts/train_metrics.py). Any failure, the
import included, still prints a row: ``status: "not run: <type>: <message>"``, exit 0.

Its own package layer (trl <= 1.15, datasets < 5): ``bash bench/unsloth_layer.sh`` where the registry is
reachable, ``bash bench/unsloth_install.sh`` on the GPU host, then
    PYTHONPATH=/tmp/unsloth-site:/tmp/site python3 bench/unsloth_row.py --row '{"model_dir": ..., ...}'

Row keys: model_dir, rows_file (JSON {"input_ids": [[...], ...]}) or seq (random rows as
gpu_recipes.token_rows), batch, steps (null: one epoch), learning_rate, lr_scheduler,
warmup_ratio, max_grad_norm, weight_decay, optimizer, lora_r, lora_alpha, lora_dropout,
targets (qv | all_linear), seed, gradient_checkpointing ("unsloth" | true | false),
loss_steps; optional padding_free (null: unsloth decides), max_seq_length (default 1024).
"""

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "scripts"))
from runtime import ALLOCATOR_VARIABLES  # noqa: E402

GIB = 1024**3
BLOCK_WARMUP = 3  # block rows: the median step after these (bench/epochs.py's WARMUP)
PACKAGES = "unsloth unsloth_zoo trl transformers peft torch bitsandbytes xformers datasets triton accelerate".split()
# beyond those: packages unsloth 2026.10.9 declares or looks for at run time (bench/unsloth_layer.sh
# brings the declared ones); two layers' rows may differ by these
PACKAGES += "torchao cut_cross_entropy diffusers flash_attn vllm".split()
TARGETS = {"qv": ["q_proj", "v_proj"], "all_linear": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()}
REQUIRED = """model_dir batch steps learning_rate lr_scheduler warmup_ratio max_grad_norm weight_decay optimizer
lora_r lora_alpha lora_dropout targets seed gradient_checkpointing loss_steps""".split()
# Before unsloth's import: no Hub traffic (statistics, name mapping), its compiled-module cache
# outside the checkout, and no silent CPU training (unsloth 2026 falls back to CPU without a GPU).
ENVIRONMENT = "UNSLOTH_DISABLE_STATISTICS UNSLOTH_DISABLE_CPU_FALLBACK HF_HUB_OFFLINE TRANSFORMERS_OFFLINE".split()
ENVIRONMENT += ["HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"]  # each set to 1
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template", "added_tokens")


def versions() -> dict:
    """Installed versions by metadata (works when the import fails)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def keep(notes: list[str], text: str) -> None:
    for line in text.splitlines():
        if "Unsloth" in line and len(notes) < 60 and line.strip()[:300] not in notes:
            notes.append(line.strip()[:300])


class Notes:
    """Tees stdout/stderr and keeps the lines unsloth prints about itself (its warnings and choices)."""

    def __init__(self, stream, notes: list[str]):
        self.stream, self.notes, self.partial = stream, notes, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        keep(self.notes, "\n".join(lines))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def token_rows(row: dict, vocab: int) -> list[list[int]]:
    if row.get("rows_file"):
        rows = json.loads(Path(row["rows_file"]).read_text())["input_ids"]
        if not rows or max(max(r) for r in rows) >= vocab:
            raise ValueError(f"rows_file {row['rows_file']} is empty or has token ids >= the model's vocab {vocab}")
        return rows
    import torch  # gpu_recipes.token_rows' rows: the same generator and seed

    count = row["batch"] * row["steps"]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (count, row["seq"]), generator=generator).tolist()


def tokens_per_second(row: dict, tokens: int, seconds: float, step_seconds: list[float]) -> float:
    """An epoch: all its tokens over its wall time; synthetic blocks: the median step after
    warm-up, as bench/epochs.py measures every block row."""
    if row.get("rows_file"):
        return tokens / seconds
    import train_metrics

    return train_metrics.median_step_tokens_per_second(step_seconds, row["seq"] * row["batch"], BLOCK_WARMUP)


def trained_tokens(lengths: list[int], batch: int, steps: int | None) -> int:
    """Tokens of the batches a sequential sampler feeds in `steps` steps (epochs repeat)."""
    batches = [sum(lengths[i : i + batch]) for i in range(0, len(lengths), batch)]
    if steps is None:
        return sum(batches)
    return sum(batches[i % len(batches)] for i in range(steps))


def fitting_model_dir(model_dir: Path, vocab: int, scratch: Path) -> tuple[Path, str | None]:
    """model_dir, or a view of it with a stand-in tokenizer of exactly `vocab` tokens when its own
    tokenizer is larger (unsloth grows the input embedding to len(tokenizer), lm_head not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    size = len(AutoTokenizer.from_pretrained(model_dir))
    if size <= vocab:
        return model_dir, None
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.startswith(TOKENIZER_FILES):
            (scratch / item.name).symlink_to(item)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(scratch)
    return scratch, f"model_dir's tokenizer has {size} tokens > vocab {vocab}: a {vocab}-token stand-in (pad id 0)"


def run_row(row: dict, notes: list[str], scratch: Path) -> dict:
    # isort: off
    import unsloth  # first: it patches transformers, TRL and PEFT on import
    from memory_peak import allocator_state  # imports torch: after unsloth has set the allocator
    from unsloth import FastLanguageModel

    # isort: on
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    import train_metrics

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: unsloth rows run on a GPU only")
    model_dir = Path(row["model_dir"])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rows = token_rows(row, vocab)
    lengths = [len(r) for r in rows]
    max_length = max(row.get("max_seq_length") or 1024, max(lengths))
    checkpointing = row["gradient_checkpointing"]
    load_dir, tokenizer_note = fitting_model_dir(model_dir, vocab, scratch / "model")
    if tokenizer_note:
        notes.append(tokenizer_note)
    set_seed(row["seed"])
    # The same 4-bit load as a hub "unsloth/...-bnb-4bit" model (NF4, double quantisation, bf16 compute).
    common = dict(use_gradient_checkpointing=checkpointing, random_state=row["seed"])
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(load_dir), max_seq_length=max_length, dtype=torch.bfloat16, load_in_4bit=True, **common,
        use_exact_model_name=True, offload_embedding=False,  # HF_HUB_OFFLINE; weights stay on the GPU
    )  # fmt: skip
    model = FastLanguageModel.get_peft_model(
        model, r=row["lora_r"], lora_alpha=row["lora_alpha"], lora_dropout=row["lora_dropout"],
        target_modules=TARGETS[row["targets"]], bias="none", **common,
    )  # fmt: skip
    wanted = dict(
        output_dir=str(scratch / "out"), per_device_train_batch_size=row["batch"], gradient_accumulation_steps=1,
        num_train_epochs=1, max_steps=row["steps"] if row["steps"] is not None else -1,
        learning_rate=row["learning_rate"], lr_scheduler_type=row["lr_scheduler"],
        warmup_steps=row["warmup_ratio"],  # transformers 5: a float below 1 is a ratio
        max_grad_norm=row["max_grad_norm"], weight_decay=row["weight_decay"], optim=row["optimizer"],
        train_sampling_strategy="sequential", bf16=True, logging_steps=1, save_strategy="no", report_to="none",
        seed=row["seed"], data_seed=row["seed"], max_length=max_length, packing=False,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    if row.get("padding_free") is not None:
        wanted["padding_free"] = row["padding_free"]
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    dropped = sorted(set(wanted) - known)
    args = SFTConfig(**{k: v for k, v in wanted.items() if k in known})

    class InOrderSFTTrainer(SFTTrainer):  # the rows come ordered: never shuffle them
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    timer = train_metrics.step_timer()
    dataset = Dataset.from_dict({"input_ids": rows})
    trainer = InOrderSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = trained_tokens(lengths, row["batch"], row["steps"])
    step_seconds = [s["step_seconds"] for _, s in sorted(timer.steps.items())]
    block = not row.get("rows_file")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "recipe": "unsloth",
        "status": "ok",
        "steps": trainer.state.global_step,
        "rows": len(rows),
        "tokens": tokens,
        "tokens_seen_trainer": trainer.state.num_input_tokens_seen,
        "epoch_seconds": None if block else round(seconds, 2),
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_per_second(row, tokens, seconds, step_seconds), 1),
        "steady_tokens_per_second": train_metrics.steady_tokens_per_second(timer.steps),
        "step_seconds": [round(t, 4) for t in step_seconds],
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
        "losses": losses[: row["loss_steps"]],
        "final_loss": losses[-1] if losses else None,
        "max_seq_length": max_length,
        "padding_free": getattr(trainer.args, "padding_free", None),
        "gradient_checkpointing": checkpointing,
        "quantization": "nf4, double quantisation, bf16 compute (unsloth's fixed 4-bit config)",
        "sampler": type(trainer._get_train_sampler()).__name__,
        "sft_config_dropped": dropped,
        "device": torch.cuda.get_device_name(0),
        "unsloth_version": getattr(unsloth, "__version__", None),
        # unsloth sets the allocator's settings on import (expandable segments): what it ran with.
        "cuda_allocator": dict(allocator_state(), set={k: os.environ.get(k) for k in ALLOCATOR_VARIABLES}),
    }


def main(row: dict) -> dict:
    versions_found = versions()
    missing = [k for k in REQUIRED if k not in row] + ([] if row.get("rows_file") or row.get("seq") else ["rows_file"])
    if missing:
        return {"recipe": "unsloth", "status": f"not run: the row lacks {missing}", "versions": versions_found}
    notes: list[str] = []
    for key in ENVIRONMENT:
        os.environ.setdefault(key, "1")
    real_out, real_err = sys.stdout, sys.stderr
    handler = logging.Handler()  # unsloth logs its choices (padding-free, kernels) at INFO
    handler.emit = lambda record: keep(notes, record.getMessage())
    for name in ("unsloth", "unsloth_zoo"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    sys.stdout, sys.stderr = Notes(real_out, notes), Notes(real_err, notes)
    try:
        with tempfile.TemporaryDirectory(prefix="unsloth-row-") as scratch:
            (Path(scratch) / "model").mkdir()
            os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(scratch) / "compiled"))
            result = run_row(row, notes, Path(scratch))
    except BaseException as error:  # noqa: B036  a row whatever happens, SystemExit included
        if isinstance(error, KeyboardInterrupt):
            raise
        sys.stdout, sys.stderr = real_out, real_err
        traceback.print_exc()
        result = {"recipe": "unsloth", "status": f"not run: {type(error).__name__}: {str(error)[:300]}"}
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    return {**result, "versions": versions_found, "notes": notes}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", required=True, help="the row's settings as JSON (keys above)")
    print("ROW " + json.dumps(main(json.loads(parser.parse_args().row))), flush=True)
