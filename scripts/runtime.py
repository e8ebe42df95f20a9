"""Small pieces every stage script shares: logging to the rule's log, hashing, provenance.

Kept deliberately thin; each stage script stays readable on its own.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "gguf",
    "snakemake",
)
# Anything that looks like a Hugging Face token never reaches a log or a file.
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")


class _RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _TOKEN_PATTERN.sub("hf_***", str(record.msg))
        return True


def setup_logging(log_path: str | Path | None, name: str) -> logging.Logger:
    """Log to the rule's log file (and stderr), with a time stamp on every line."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for handler in handlers:
        handler.addFilter(_RedactTokens())
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return logging.getLogger(name)


def log_arguments(logger: logging.Logger, **arguments: Any) -> None:
    """First lines of every log: the resolved arguments of main()."""
    logger.info("resolved arguments:\n%s", json.dumps(arguments, indent=2, default=str, sort_keys=True))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version() -> dict[str, Any]:
    """Git commit of the project and whether the tree had uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        pass
    return info


def write_provenance(record_path: str | Path, stage: str, started: float, /, **details: Any) -> dict:
    """Write a JSON record of how an artifact was made: stage, timing, code, versions, details."""
    record = {
        "stage": stage,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(),
        "versions": package_versions(),
        "hardware": hardware(),
        **details,
    }
    text = _TOKEN_PATTERN.sub("hf_***", json.dumps(record, indent=2, default=str, sort_keys=True))
    Path(record_path).parent.mkdir(parents=True, exist_ok=True)
    Path(record_path).write_text(text + "\n")
    return record


def resolve_path(path: str | Path) -> Path:
    """Config paths are relative to the project folder (where Snakemake runs)."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path
