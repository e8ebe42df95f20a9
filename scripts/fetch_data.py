"""Data stage, part 1: fetch one data set (Hub, offline mirror or local file) as raw rows.

The output is a JSON-lines file with one object per source row, ``{"row": i, "text": ...}``
(``row`` = 0-based index in the source, the number every later error message uses), and
a provenance record: where the rows came from, the resolved Hub commit or the file's
sha256, and whether the mirror stood in for the Hub.

Hub access (``data.hub_access``): ``hub`` uses ``datasets.load_dataset``; ``mirror`` uses
the ``data.mirror`` entry for the Hub id (a byte-exact file checked by sha256); ``auto``
asks the Hub first and falls back to the mirror when it cannot be reached (or
``HF_HUB_OFFLINE=1``).
"""

import argparse
import json
import os
import time
from pathlib import Path

from runtime import log_arguments, resolve_path, setup_logging, sha256_file, write_manifest, write_provenance

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
PLAIN_TEXT_SUFFIXES = {".txt", ".raw"}


class DataSourceError(RuntimeError):
    pass


def hub_commit_or_none(hub_id: str, revision: str, logger) -> str | None:
    """The commit the Hub resolves revision to, or None when the Hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        logger.info("HF_HUB_OFFLINE=1: not asking the Hub")
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(hub_id, revision=revision, timeout=15).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise DataSourceError(f"Hub data set {hub_id}@{revision}: {err}") from err
    except Exception as err:  # network failures come in many classes (httpx, OSError, timeouts)
        logger.warning("the Hub did not answer for %s (%s: %s)", hub_id, type(err).__name__, err)
        return None


def read_local_rows(path: Path, text_field: str) -> list:
    """Rows of a local file as a list of text values (None where the field is null)."""
    if not path.is_file():
        raise DataSourceError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PLAIN_TEXT_SUFFIXES:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataSourceError(f"{path}: not UTF-8 text at byte {err.start}") from err
        # One document; CRLF from the original archive normalised to LF.
        return [text.replace("\r\n", "\n")]
    if suffix not in LOCAL_FORMATS:
        raise DataSourceError(f"{path}: unsupported file type {suffix!r} (use .parquet, .jsonl, .json, .csv, .txt)")
    if suffix == ".jsonl" or suffix == ".json":
        _check_utf8_lines(path)
    if suffix == ".jsonl":
        _check_json_lines(path)
    import datasets

    try:
        table = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    except Exception as err:
        raise DataSourceError(f"{path}: could not be read as {LOCAL_FORMATS[suffix]} ({err})") from err
    if text_field not in table.column_names:
        raise DataSourceError(f"{path}: no column {text_field!r} (columns: {table.column_names}); set text_field")
    return list(table[text_field])


def _check_utf8_lines(path: Path) -> None:
    bad = []
    for number, line in enumerate(path.read_bytes().splitlines()):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
    if bad:
        raise DataSourceError(f"{path}: undecodable (non UTF-8) text in rows {bad[:20]} (0-based)")


def _check_json_lines(path: Path) -> None:
    """Every non-empty line of a JSON Lines file is a JSON object (else: which line, and why)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(
                    f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataSourceError(f"{path}: line {number} is not a JSON object (found {type(record).__name__})")


def read_hub_rows(source: dict, commit: str) -> list:
    import datasets

    table = datasets.load_dataset(
        source["hub_id"],
        name=source.get("config_name"),
        revision=commit,
        data_files=source.get("data_files"),
        split=source["split"],
    )
    if source["text_field"] not in table.column_names:
        raise DataSourceError(f"Hub data set {source['hub_id']}: no column {source['text_field']!r}")
    rows = list(table[source["text_field"]])
    if source["markup"] == "plain":
        return ["".join(rows)]  # WikiText rows are lines with their newlines: one document
    return rows


def mirror_entry(hub_id: str, mirror: list[dict]) -> dict:
    for entry in mirror:
        if entry["hub_id"] == hub_id:
            return entry
    raise DataSourceError(f"config key 'data.mirror': no entry for {hub_id} and the Hub cannot be reached")


def main(
    name: str,
    source: dict,
    mirror: list[dict],
    hub_access: str,
    out_path: Path,
    provenance_path: Path,
    log_path: Path | None = None,
) -> None:
    started = time.time()
    logger = setup_logging(log_path, "fetch_data")
    log_arguments(logger, name=name, source=source, mirror=mirror, hub_access=hub_access, out_path=out_path)
    details: dict = {"dataset": name, "config": source}
    if source.get("local_path"):
        path = resolve_path(source["local_path"])
        rows = read_local_rows(path, source["text_field"])
        details.update(origin="local", path=str(path), sha256=sha256_file(path))
    else:
        commit = None if hub_access == "mirror" else hub_commit_or_none(source["hub_id"], source["revision"], logger)
        if commit is not None:
            rows = read_hub_rows(source, commit)
            details.update(origin="hub", hub_id=source["hub_id"], resolved_commit=commit)
        elif hub_access == "hub":
            raise DataSourceError(f"data.hub_access is hub but the Hub cannot be reached for {source['hub_id']}")
        else:
            entry = mirror_entry(source["hub_id"], mirror)
            path = resolve_path(entry["path"])
            digest = sha256_file(path) if path.is_file() else None
            if digest != entry["sha256"]:
                raise DataSourceError(
                    f"mirror file {path} for {source['hub_id']}: sha256 {digest} != expected {entry['sha256']}"
                )
            rows = read_local_rows(path, source["text_field"])
            details.update(
                origin="mirror", hub_id=source["hub_id"], revision=source["revision"], path=str(path), sha256=digest
            )
            logger.info("using the mirror %s for %s (sha256 verified)", path, source["hub_id"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as handle:
        for number, text in enumerate(rows):
            handle.write(json.dumps({"row": number, "text": text}, ensure_ascii=False) + "\n")
    details["rows"] = len(rows)
    write_provenance(provenance_path, "fetch_data", started, **details)
    logger.info("%s: %d rows -> %s", name, len(rows), out_path)


def _from_snakemake(smk) -> None:
    started = time.time()
    data = smk.params.data
    name = smk.wildcards.dataset
    main(
        name=name,
        source=data[name],
        mirror=data["mirror"],
        hub_access=data["hub_access"],
        out_path=Path(smk.output.rows),
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "fetch_data", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a pipeline config file")
    parser.add_argument("--dataset", required=True, choices=["train", "eval_chat", "wikitext"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--provenance", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    a = parser.parse_args()
    data_config = yaml.safe_load(a.config.read_text())["data"]
    main(
        a.dataset, data_config[a.dataset], data_config["mirror"], data_config["hub_access"], a.out, a.provenance, a.log
    )
