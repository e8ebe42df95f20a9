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
import shutil
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
        # The formatted message, so a token passed as an argument is caught too.
        record.msg = _TOKEN_PATTERN.sub("hf_***", record.getMessage())
        record.args = None
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


# torch >= 2.10 reads the first; the second is its older name, still read when the first is unset.
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def set_cuda_allocator(expandable_segments: bool) -> str:
    """Sets this process's (and its children's) CUDA caching allocator settings; says which apply.

    With expandable segments the allocator grows one mapped range instead of caching blocks of
    every size it was asked for; unsloth sets them on import. At the 7B shape they held 0.17 GiB
    less where eager and recorded batches mix, nothing less where all are recorded
    (bench/results/epochs_h200_allocator). A setting already in the environment wins. Call it
    before the model loads: it shapes the segments made after it.
    """
    for name in ALLOCATOR_VARIABLES:
        if os.environ.get(name):
            return f"{name}={os.environ[name]} (from the environment)"
    if not expandable_segments:
        return "torch's default"
    os.environ[ALLOCATOR_VARIABLES[0]] = EXPANDABLE_SEGMENTS  # this process's children
    # torch reads the variable once (an import, e.g. bitsandbytes', may already have started
    # CUDA): its own setter applies it to this process from here on.
    torch = sys.modules.get("torch")
    if torch is not None:
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (setter or torch.cuda.memory._set_allocator_settings)(EXPANDABLE_SEGMENTS)
    return f"{ALLOCATOR_VARIABLES[0]}={EXPANDABLE_SEGMENTS}"


def set_cublas_workspace(config: str | None) -> str:
    """Sets cuBLAS's workspace size (CUBLAS_WORKSPACE_CONFIG, torch's own variable); says which applies.

    cuBLAS keeps one workspace per thread and stream: torch's default is 32 MiB on Hopper, and
    the recorded steps add the capture stream's in both the main and the autograd thread. torch
    reads it when it makes its first workspace (the first matmul), so this runs before the model
    loads. A setting already in the environment wins.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        return f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']} (from the environment)"
    if not config:
        return "torch's default"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = config
    return f"CUBLAS_WORKSPACE_CONFIG={config}"


def set_cuda_memory(train: dict) -> dict[str, str]:
    """The train section's CUDA settings read once per process (expandable_segments,
    cublas_workspace_config), applied before the model loads; what applies, as the train
    metrics and bench rows record it.

    CUDA's launch-queue size (CUDA_SCALE_LAUNCH_QUEUES) is not among them: read when CUDA starts,
    which importing peft does, and 4x measured no faster in the batch-4 epoch (42.4, 43.2 against
    42.9 s, bench/results/epochs_h200_launch_queues_env_b4); export it to try it."""
    return {
        "cuda_allocator": set_cuda_allocator(train.get("expandable_segments", False)),
        "cublas_workspace": set_cublas_workspace(train.get("cublas_workspace_config")),
    }


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
    dirty = None if status is None else bool(status)
    # A dirty tree is identified by its diff, so two runs of different edits never look alike.
    diff = git("diff", "HEAD") if dirty else None
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": dirty,
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff is not None else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None (no GPU, no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def hardware() -> dict[str, Any]:
    """CPU, GPU name, driver and CUDA version (None where there is no GPU)."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu_name": None,
        "gpu_count": 0,
        "gpu_driver": None,
        "cuda_version": None,
        # The card(s) this job ran on (scripts/gpu_assign.py claims them per job).
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda_version"] = torch.version.cuda
            info["gpu_driver"] = _gpu_driver()
    except ImportError:
        pass
    return info


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _write_json_redacted(path: str | Path, record: dict) -> None:
    text = _TOKEN_PATTERN.sub("hf_***", json.dumps(record, indent=2, default=str, sort_keys=True))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")


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
    _write_json_redacted(record_path, record)
    return record


def scripts_first_in_jobs(scripts_dir: str | Path) -> None:
    """Jobs started from now on import the project's scripts before site-packages.

    Snakemake's script directive appends the scripts folder to sys.path after site-packages,
    where an installed package of the same name would shadow a script (lm-eval's dependency
    ``evaluate`` once shadowed the perplexity stage's old name); PYTHONPATH comes first."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(scripts_dir), os.environ.get("PYTHONPATH")]))


def resolve_path(path: str | Path) -> Path:
    """Config paths are relative to the project folder (where Snakemake runs)."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


# ---------------------------------------------------------------------------------------
# Manifests: the provenance record of a rule's job, extended with the sha256 of every
# input and output file (folders file by file), the config values the job used, seeds
# and the Hub revisions of model and data. scripts/audit.py checks the chain.

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".provenance.json"
SNAKEMAKE_MARKER = ".snakemake_timestamp"
# Config keys that say where and how a run executes, not what it computes: left out of
# the config fingerprint, so moving a results folder or enabling the Hub push does not
# make earlier artifacts look as if they came from another study.
NON_RESULT_CONFIG_KEYS = ("results_dir", "resources", "push")


def _plain(value: Any) -> Any:
    """Snakemake's Namedlists, numpy scalars and paths as plain JSON values."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "item", lambda: str(v))()))


def study_config(config: dict) -> dict:
    """The part of a config that determines the results (see NON_RESULT_CONFIG_KEYS)."""
    return {key: value for key, value in _plain(config).items() if key not in NON_RESULT_CONFIG_KEYS}


def config_sha256(config: dict) -> str:
    canonical = json.dumps(study_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def relative_to_results(path: str | Path, results_dir: str | Path) -> str:
    """A path as recorded in a manifest: relative to results_dir, else absolute."""
    path, root = os.path.abspath(path), os.path.abspath(results_dir)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def hash_files(path: str | Path, results_dir: str | Path) -> dict[str, dict]:
    """{recorded path: {sha256, bytes}} of one file, or of every file under a folder."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    # Snakemake marks a finished directory() output with an empty file of its own, after the job.
    files = [f for f in files if f.name != SNAKEMAKE_MARKER]
    return {relative_to_results(f, results_dir): {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files}


def _named_files(namedlist, skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """{name: [paths]} of a Snakemake input/output Namedlist (every entry of a rule is named here)."""
    named = {}
    for name in namedlist.keys():
        if name in skip:
            continue
        value = getattr(namedlist, name)
        named[name] = [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]
    return named


def _file_entries(named: dict[str, list[str]], results_dir: str | Path) -> dict[str, dict]:
    entries = {}
    for name, paths in named.items():
        for path in paths:
            for recorded, digest in hash_files(path, results_dir).items():
                entries[recorded] = {"name": name, **digest}
    return entries


def _seeds(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every seed in the job's params and wildcards, by dotted key."""
    found = {}
    if isinstance(value, dict):
        for key, sub in value.items():
            dotted = f"{prefix}{key}"
            if "seed" in str(key).lower() and not isinstance(sub, (dict, list)):
                found[dotted] = sub
            found.update(_seeds(sub, dotted + "."))
    return found


_REVISION_KEYS = ("source", "origin", "hub_id", "revision", "resolved_commit", "original_model", "package")


def hub_revisions(results_dir: str | Path) -> dict[str, Any]:
    """The resolved Hub revisions (or mirror/GGUF hashes) of model and data, from fetch_* records."""
    results_dir = Path(results_dir)
    found: dict[str, Any] = {"model": None, "data": {}}
    model = results_dir / "model" / f"base{MANIFEST_SUFFIX}"
    if model.is_file():
        record = json.loads(model.read_text())
        found["model"] = {k: record[k] for k in (*_REVISION_KEYS, "gguf_sha256") if record.get(k) is not None}
    for path in sorted((results_dir / "data" / "raw").glob(f"*{MANIFEST_SUFFIX}")):
        record = json.loads(path.read_text())
        name = record.get("dataset", path.name.removesuffix(MANIFEST_SUFFIX))
        found["data"][name] = {k: record[k] for k in (*_REVISION_KEYS, "sha256") if record.get(k) is not None}
    return found


def write_manifest(smk, stage: str, started: float) -> dict:
    """Turn the job's provenance record (``output.provenance``) into its manifest.

    Called by each script's Snakemake adapter after ``main`` returns: keeps what ``main``
    recorded and adds the hashes of every input and output file, the params (the config
    values the job used), wildcards, seeds, the config fingerprint and Hub revisions.
    """
    path = Path(smk.output.provenance)
    results_dir = smk.config["results_dir"]
    record = json.loads(path.read_text()) if path.is_file() and path.stat().st_mtime >= started - 1 else {}
    params = {name: _plain(getattr(smk.params, name)) for name in smk.params.keys()}
    wildcards = {name: getattr(smk.wildcards, name) for name in smk.wildcards.keys()}
    record.update(
        manifest_version=MANIFEST_VERSION,
        stage=record.get("stage", stage),
        rule=smk.rule,
        started_utc=record.get("started_utc", _utc(started)),
        finished_utc=_utc(time.time()),
        code=record.get("code") or code_version(),
        versions=record.get("versions") or package_versions(),
        hardware=record.get("hardware") or hardware(),
        params=params,
        wildcards=wildcards,
        seeds={**_seeds(wildcards), **_seeds(params)},
        config_sha256=config_sha256(smk.config),
        hub_revisions=hub_revisions(results_dir),
        inputs=_file_entries(_named_files(smk.input), results_dir),
        outputs=_file_entries(_named_files(smk.output, skip={"provenance"}), results_dir),
        log=[relative_to_results(p, results_dir) for p in smk.log],
    )
    _write_json_redacted(path, record)
    return record
