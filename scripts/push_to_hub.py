"""Upload one trained model (merged, or the adapter) and its tokenizer to the Hugging Face
Hub with a generated model card. Opt-in: the rule runs only with ``push.enabled: true``.

The model card (``README.md``) has YAML front matter (base_model, datasets, library_name,
license, tags), a table of the run's hyperparameters, its memory and speed, the
perplexities of the pushed model and of its base, and a provenance summary (code version,
config fingerprint, Hub revisions or mirror hashes of model and data, sha256 of every
uploaded file). ``upload.json`` lists every file with its size and sha256.

The token comes only from the environment (``HF_TOKEN``) or the Hub login (``hf auth
login``); it is passed to ``huggingface_hub`` and never logged or written. Without one a
real push stops before anything is sent. ``--dry-run`` writes card and plan, uploads
nothing and needs no token.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from grid import GRID_COLUMNS
from runtime import (
    MANIFEST_SUFFIX,
    SNAKEMAKE_MARKER,
    config_sha256,
    log_arguments,
    setup_logging,
    sha256_file,
    write_manifest,
)

CARD_NAME = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TRAIN_KEYS = (
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "optimizer",
    "lr_scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "weight_decay",
    "compute_dtype",
)
MEMORY_COLUMNS = (
    "memory_measure",
    "train_peak_gib",
    "weights_gib",
    "footprint_bytes",
    "tokens_per_second",
    "train_wall_seconds",
    "final_train_loss",
    "device",
)


class PushError(RuntimeError):
    """A push that cannot go ahead (no token, unknown cell, missing files); says what to do."""


def hub_token() -> str | None:
    """The token from HF_TOKEN or the Hub login; never logged, never written."""
    from huggingface_hub import get_token

    return get_token()


def select_cell(runs: pd.DataFrame, perplexity: pd.DataFrame, cell: str, what: str) -> str:
    if cell != "best":
        if cell not in set(runs["cell"]):
            raise PushError(f"config key 'push.cell': {cell!r} is not a trained cell (see tables/runs.csv)")
        return cell
    scored = perplexity[(perplexity.model_kind == what) & (perplexity.dataset == "eval_chat")]
    if scored.empty:
        raise PushError(f"tables/perplexity.csv has no {what} perplexity on eval_chat to choose the best cell")
    return str(scored.sort_values(["perplexity", "model"]).iloc[0]["model"])


def upload_files(model_dir: Path, base_dir: Path, what: str) -> dict[str, Path]:
    """{path in the repo: local file}: the model (or adapter) files plus the tokenizer."""
    skip = {CARD_NAME, SNAKEMAKE_MARKER}  # PEFT's own card is replaced; Snakemake's marker is no model file
    files = {p.name: p for p in sorted(model_dir.iterdir()) if p.is_file() and p.name not in skip}
    if what == "adapter":
        files.update({name: base_dir / name for name in TOKENIZER_FILES if (base_dir / name).is_file()})
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json") if n not in files]
    if missing:
        raise PushError(f"{model_dir}: tokenizer files missing: {missing}")
    return files


def _value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _read_record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def provenance_summary(results_dir: Path, cell: str, config: dict, files: dict[str, dict]) -> dict:
    model = _read_record(results_dir / "model" / f"base{MANIFEST_SUFFIX}")
    train = _read_record(results_dir / "train" / cell / f"train{MANIFEST_SUFFIX}")
    data = {}
    for path in sorted((results_dir / "data" / "raw").glob(f"*{MANIFEST_SUFFIX}")):
        record = _read_record(path)
        keys = ("origin", "hub_id", "revision", "resolved_commit", "sha256")
        data[record.get("dataset", path.stem)] = {k: record[k] for k in keys if record.get(k) is not None}
    return {
        "code": train.get("code"),
        "config_sha256": config_sha256(config),
        "base_model": {
            k: model[k]
            for k in ("source", "original_model", "hub_id", "resolved_commit", "gguf_sha256", "package", "weights_note")
            if model.get(k) is not None
        },
        "data": data,
        "files": files,
    }


def model_card(
    repo_id: str,
    cell_row: dict,
    perplexity: pd.DataFrame,
    config: dict,
    what: str,
    license_id: str,
    provenance: dict,
) -> str:
    model_config = config["model"]
    base_model = model_config.get("hub_id") or provenance["base_model"].get("original_model")
    front = {
        "base_model": base_model,
        "datasets": [config["data"]["train"]["hub_id"]] if config["data"]["train"].get("hub_id") else [],
        "library_name": "peft" if what == "adapter" else "transformers",
        "license": license_id,
        "tags": list(dict.fromkeys(["qlora-snakemake", cell_row["method"], "lora", "peft", "trl", "sft"])),
        "pipeline_tag": "text-generation",
    }
    hyper = [(k, cell_row[k]) for k in GRID_COLUMNS] + [(k, config["train"][k]) for k in TRAIN_KEYS]
    hyper += [("max_length", config["data"]["max_length"])]
    memory = [(k, cell_row.get(k)) for k in MEMORY_COLUMNS]
    mine = perplexity[perplexity.model == cell_row["cell"]]
    bases = perplexity[perplexity.model_kind == "base"]
    ppl = [(r.model_kind, r.precision, r.dataset, r.perplexity) for r in pd.concat([bases, mine]).itertuples()]
    code = provenance.get("code") or {}
    kind = "4-bit QLoRA" if cell_row["method"] == "qlora" else "16-bit LoRA"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{base_model} fine-tuned with {kind} (TRL SFTTrainer + PEFT) by the qlora-snakemake pipeline; "
        + (
            "this repository holds the LoRA adapter (load it on the base model with PEFT)."
            if what == "adapter"
            else "the adapter is merged into the 16-bit base."
        ),
        "",
        f"Training run: `{cell_row['cell']}`",
        "",
        "## Hyperparameters",
        "",
        _table(("hyperparameter", "value"), hyper),
        "",
        "## Memory and speed",
        "",
        _table(("measure", "value"), memory),
        "",
        "## Perplexity",
        "",
        _table(("model", "precision", "dataset", "perplexity"), ppl),
        "",
        "## Provenance",
        "",
        f"- code: git commit `{code.get('git_commit')}` (uncommitted changes: {code.get('git_dirty')})",
        f"- study config sha256: `{provenance['config_sha256']}`",
        f"- base model: `{json.dumps(provenance['base_model'], sort_keys=True)}`",
    ]
    lines += [f"- data `{name}`: `{json.dumps(rec, sort_keys=True)}`" for name, rec in provenance["data"].items()]
    lines += [
        "",
        _table(("file", "bytes", "sha256"), [(n, f["bytes"], f["sha256"]) for n, f in provenance["files"].items()]),
    ]
    lines += ["", "Every artifact of the run has a manifest; `make audit` re-checks the chain.", ""]
    return "\n".join(lines)


def main(
    results_dir: Path,
    push: dict,
    config: dict,
    out_card: Path,
    out_plan: Path,
    log_path: Path | None = None,
) -> dict:
    logger = setup_logging(log_path, "push_to_hub")
    log_arguments(logger, results_dir=results_dir, push=push, out_card=out_card, out_plan=out_plan)
    results_dir = Path(results_dir)
    if not push.get("repo_id"):
        raise PushError("config key 'push.repo_id': set the Hub repository (owner/name)")
    token = hub_token()
    logger.info("Hub token: %s", "found (environment or login)" if token else "none")
    if not push["dry_run"] and token is None:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login` "
            "(the token is read from there only, never from the config), or set push.dry_run: true"
        )
    runs = pd.read_csv(results_dir / "tables" / "runs.csv")
    perplexity = pd.read_csv(results_dir / "tables" / "perplexity.csv")
    cell = select_cell(runs, perplexity, push["cell"], push["what"])
    model_dir = results_dir / ("train" if push["what"] == "adapter" else "merged") / cell
    model_dir = model_dir / ("adapter" if push["what"] == "adapter" else "model")
    files = upload_files(model_dir, results_dir / "model" / "base", push["what"])
    hashes = {
        name: {"bytes": p.stat().st_size, "sha256": sha256_file(p), "source": str(p)} for name, p in files.items()
    }
    license_id = push["license"] or _read_record(results_dir / "model" / f"base{MANIFEST_SUFFIX}").get("license")
    provenance = provenance_summary(results_dir, cell, config, hashes)
    cell_row = runs[runs.cell == cell].iloc[0].to_dict()
    card = model_card(
        push["repo_id"], cell_row, perplexity, config, push["what"], (license_id or "other").lower(), provenance
    )
    Path(out_card).parent.mkdir(parents=True, exist_ok=True)
    Path(out_card).write_text(card)
    plan = {
        "repo_id": push["repo_id"],
        "private": push["private"],
        "what": push["what"],
        "cell": cell,
        "dry_run": push["dry_run"],
        "files": {**hashes, CARD_NAME: {"bytes": len(card.encode()), "sha256": sha256_file(out_card)}},
        "total_bytes": sum(f["bytes"] for f in hashes.values()) + len(card.encode()),
        "commit": None,
    }
    for name, info in plan["files"].items():
        logger.info(
            "%s %s (%d bytes, sha256 %s)",
            "would upload" if push["dry_run"] else "upload",
            name,
            info["bytes"],
            info["sha256"],
        )
    if not push["dry_run"]:
        plan["commit"] = upload(push, files, Path(out_card), token, logger)
    Path(out_plan).write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    logger.info(
        "%s %d files (%d bytes) of %s -> %s (%s)",
        "dry run: would upload" if push["dry_run"] else "uploaded",
        len(plan["files"]),
        plan["total_bytes"],
        cell,
        push["repo_id"],
        "private" if push["private"] else "public",
    )
    return plan


def upload(push: dict, files: dict[str, Path], card: Path, token: str, logger) -> dict:
    """create_repo + upload_folder from a staging folder of hard links (copies across file systems)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(push["repo_id"], private=push["private"], repo_type="model", exist_ok=True)
    logger.info("repository ready: %s", url)
    with tempfile.TemporaryDirectory(prefix="push_to_hub_") as staging:
        for name, source in {**files, CARD_NAME: card}.items():
            try:
                os.link(source, Path(staging) / name)
            except OSError:
                shutil.copy2(source, Path(staging) / name)
        info = api.upload_folder(
            repo_id=push["repo_id"], folder_path=staging, repo_type="model", commit_message=push["commit_message"]
        )
    return {"oid": info.oid, "url": info.commit_url}


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        results_dir=Path(smk.config["results_dir"]),
        push=dict(smk.params.push),
        config=smk.params.config,
        out_card=Path(smk.output.card),
        out_plan=Path(smk.output.plan),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "push_to_hub", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    from config_check import push_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="a results_dir of a finished run")
    parser.add_argument("--config", type=Path, required=True, help="the run's config file (push: section optional)")
    parser.add_argument("--repo-id", help="owner/name (default: push.repo_id)")
    parser.add_argument("--what", choices=["merged", "adapter"])
    parser.add_argument("--cell", help="a cell name or best")
    parser.add_argument("--license")
    parser.add_argument("--public", action="store_true", help="create the repository public (default private)")
    parser.add_argument("--dry-run", action="store_true", help="write card and plan, upload nothing")
    parser.add_argument("--out-dir", type=Path, help="where README.md and upload.json go (default RESULTS/hub)")
    parser.add_argument("--log", type=Path)
    a = parser.parse_args()
    run_config = yaml.safe_load(a.config.read_text())
    settings = push_settings(run_config)
    overrides = {"repo_id": a.repo_id, "what": a.what, "cell": a.cell, "license": a.license}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["private"] = settings["private"] and not a.public
    settings["dry_run"] = settings["dry_run"] or a.dry_run
    out_dir = a.out_dir or a.results / "hub"
    try:
        main(a.results, settings, run_config, out_dir / CARD_NAME, out_dir / "upload.json", a.log)
    except PushError as err:
        raise SystemExit(f"push_to_hub: {err}") from None
