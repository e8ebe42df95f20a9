"""Audit a results folder: walk from the report back to the sources through the manifests.

Every rule's job leaves a manifest (``*.provenance.json``) with the sha256 of each input
and output file (folders file by file), the config values it used, the study config's
fingerprint, the code version, versions, hardware, seeds and Hub revisions. Starting at
``report/report.provenance.json`` the audit, for each manifest it reaches:

1. checks the code version (git commit, dirty flag, diff hash) against this checkout
   (``--code checkout``, default) or against the report's (``--code report``);
2. checks the config fingerprint against ``--config`` (default: the report's);
3. recomputes the sha256 of every output file and compares it with the manifest;
4. checks that each input's recorded sha256 is the output sha256 recorded by the
   manifest upstream that made it, and that the file still has it; then walks upstream.

Manifests outside the report's lineage (tokenizer audit, Hub push) are checked the same
way afterwards; data mirror and local source files are re-hashed where they exist. The
first mismatch stops the audit with ``AUDIT FAILED: <artifact>: <reason>`` (exit 1). On
success it prints a short provenance tree and the tables the figures and report were
drawn from (``make report-from-tables`` rebuilds them from those alone).

``--published`` audits a published study (``studies/<name>/``, made by
``scripts/publish_study.py``): it holds every manifest but not the weights, so a file a
manifest records and the folder lacks is counted as not published instead of failing;
every file that is there must still have its recorded sha256, and the chain of recorded
hashes from the report down to the sources must hold, as in a full audit.
"""

import argparse
import json
import os
import re
import sys
import time
from collections import deque
from pathlib import Path

import yaml

from config_check import ConfigError, validate_config
from runtime import MANIFEST_SUFFIX, MANIFEST_VERSION, code_version, config_sha256, sha256_file, study_config

ROOT_MANIFEST = f"report/report{MANIFEST_SUFFIX}"
# Merged weights may be deleted once evaluate_merged has read them (README, SLURM: disk): the
# sha256 that merge recorded and the one evaluate_merged read must still agree; the file
# itself is then not re-hashed.
DROPPABLE_WEIGHTS = re.compile(r"merged/[^/]+/model/[^/]+\.safetensors")
CODE_KEYS = ("git_commit", "git_dirty", "git_diff_sha256")


class AuditError(RuntimeError):
    """The first artifact that does not match its manifest (or its manifest's chain)."""

    def __init__(self, artifact: str, reason: str):
        super().__init__(f"{artifact}: {reason}")
        self.artifact = artifact


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]


def _config_diff(recorded: dict, expected: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(recorded) | set(expected))
    diff = []
    for key in keys:
        a, b = recorded.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diff.append(f"{prefix}{key}")
    return diff


class Auditor:
    def __init__(self, results_dir: Path, expected_config: dict | None, code: str, published: bool = False):
        self.results = Path(results_dir)
        self.published = published
        self.unpublished: set[str] = set()
        self.hashes: dict[str, str | None] = {}
        self.bytes_hashed = 0
        self.manifests = self._load_manifests()
        self.producers = self._producers()
        self.evaluated = {
            path
            for record in self.manifests.values()
            if _rule(record) == "evaluate_merged"
            for path in record["inputs"]
        }
        self.dropped: set[str] = set()
        if ROOT_MANIFEST not in self.manifests:
            raise AuditError("report/report.html", f"no manifest {ROOT_MANIFEST}: run the pipeline to the report first")
        root = self.manifests[ROOT_MANIFEST]
        self.expected_config = expected_config
        self.expected_fingerprint = config_sha256(expected_config) if expected_config else root["config_sha256"]
        self.code_reference = "this checkout"
        self.expected_code = code_version() if code == "checkout" else None
        if self.expected_code is None or self.expected_code["git_commit"] is None:
            self.code_reference, self.expected_code = "the report", root["code"]

    def _load_manifests(self) -> dict[str, dict]:
        manifests = {}
        for path in sorted(self.results.rglob(f"*{MANIFEST_SUFFIX}")):
            rel = path.relative_to(self.results).as_posix()
            record = json.loads(path.read_text())
            if record.get("manifest_version") != MANIFEST_VERSION:
                raise AuditError(rel, "not a manifest (made before manifests existed, or outside Snakemake): rerun")
            manifests[rel] = record
        if not manifests:
            raise AuditError(str(self.results), "no manifests (*.provenance.json) here: is this a results folder?")
        return manifests

    def _producers(self) -> dict[str, str]:
        producers: dict[str, str] = {}
        for rel, record in self.manifests.items():
            for path in record["outputs"]:
                if path in producers:
                    raise AuditError(path, f"claimed as output by both {producers[path]} and {rel}")
                producers[path] = rel
        return producers

    def actual_hash(self, recorded_path: str) -> str | None:
        if recorded_path not in self.hashes:
            path = Path(recorded_path) if os.path.isabs(recorded_path) else self.results / recorded_path
            self.hashes[recorded_path] = sha256_file(path) if path.is_file() else None
            self.bytes_hashed += path.stat().st_size if path.is_file() else 0
        return self.hashes[recorded_path]

    def _check_file(self, path: str, recorded: str, manifest: str) -> None:
        actual = self.actual_hash(path)
        if actual is None and self.published and not os.path.isabs(path):
            self.unpublished.add(path)  # weights and other large files stay out of a published study
            return
        if actual is None and DROPPABLE_WEIGHTS.fullmatch(path) and path in self.evaluated:
            self.dropped.add(path)
            return
        if actual is None:
            raise AuditError(path, f"missing (recorded by {manifest})")
        if actual != recorded:
            raise AuditError(
                path, f"sha256 {_short(actual)}… does not match {_short(recorded)}… recorded by {manifest}: changed"
            )

    def check_manifest(self, rel: str) -> list[str]:
        """Check one manifest; returns the upstream manifests its inputs came from."""
        record = self.manifests[rel]
        artifact = next(iter(record["outputs"]), rel)
        code = {k: record["code"].get(k) for k in CODE_KEYS}
        expected = {k: self.expected_code.get(k) for k in CODE_KEYS}
        if code != expected:
            raise AuditError(
                artifact,
                f"made by code {_short(code['git_commit'])} (dirty: {code['git_dirty']}, diff "
                f"{_short(code['git_diff_sha256'])}), not that of {self.code_reference} "
                f"{_short(expected['git_commit'])} (dirty: {expected['git_dirty']}, diff "
                f"{_short(expected['git_diff_sha256'])}); rerun it, or audit with --code report",
            )
        if record["config_sha256"] != self.expected_fingerprint:
            raise AuditError(artifact, f"made with another config: {self._config_reason(record)} ({rel})")
        for path, entry in record["outputs"].items():
            self._check_file(path, entry["sha256"], rel)
        upstream = []
        for path, entry in record["inputs"].items():
            producer = self.producers.get(path)
            if producer is None and not os.path.isabs(path):
                raise AuditError(path, f"input of {rel}, but no manifest records making it")
            if producer is not None:
                made = self.manifests[producer]["outputs"][path]["sha256"]
                if made != entry["sha256"]:
                    raise AuditError(
                        path,
                        f"{rel} used sha256 {_short(entry['sha256'])}…, but {producer} made "
                        f"{_short(made)}…: the input was replaced between the two jobs",
                    )
                upstream.append(producer)
            self._check_file(path, entry["sha256"], rel)
        self._check_source(rel, record)
        return upstream

    def _config_reason(self, record: dict) -> str:
        """Name the config keys that differ where the manifest says enough, else the fingerprints."""
        if self.expected_config:
            expected = study_config(self.expected_config)
            params = record.get("params", {})
            if isinstance(params.get("config"), dict):
                keys = _config_diff(study_config(params["config"]), expected)
            else:
                keys = []
                for name, value in params.items():
                    if name in expected and isinstance(value, dict):
                        keys += [f"{name}.{key}" for key in _config_diff(value, expected[name])]
                    elif name in expected and value != expected[name]:
                        keys.append(name)
            if keys:
                return "config keys that differ: " + ", ".join(keys[:8])
        return f"config fingerprint {_short(record['config_sha256'])}… != {_short(self.expected_fingerprint)}…"

    def _check_source(self, rel: str, record: dict) -> None:
        """Data read from a mirror or a local file: the file, where present, still has its sha256."""
        if record.get("stage") == "fetch_data" and record.get("path") and record.get("sha256"):
            source = Path(record["path"])
            if source.is_file() and sha256_file(source) != record["sha256"]:
                raise AuditError(str(source), f"source file of {rel} no longer has sha256 {_short(record['sha256'])}…")

    def run(self) -> dict:
        order, seen, queue = [], {ROOT_MANIFEST}, deque([ROOT_MANIFEST])
        edges: dict[str, set[str]] = {}
        while queue:
            rel = queue.popleft()
            order.append(rel)
            edges[rel] = set(self.check_manifest(rel))
            for upstream in sorted(edges[rel] - seen):
                seen.add(upstream)
                queue.append(upstream)
        others = [rel for rel in self.manifests if rel not in seen]
        for rel in others:
            edges[rel] = set(self.check_manifest(rel))
        return {"lineage": order, "others": others, "edges": edges}


def _rule(record: dict) -> str:
    return record.get("rule") or record["stage"]


def provenance_tree(auditor: Auditor, walk: dict) -> list[str]:
    """One line per rule, from the report down to the sources, with job and file counts."""
    manifests = auditor.manifests
    jobs: dict[str, list[str]] = {}
    for rel in walk["lineage"] + walk["others"]:
        jobs.setdefault(_rule(manifests[rel]), []).append(rel)
    upstream: dict[str, set[str]] = {}
    for rel, ups in walk["edges"].items():
        upstream.setdefault(_rule(manifests[rel]), set()).update(_rule(manifests[u]) for u in ups)

    def label(rule: str) -> str:
        files = sum(len(manifests[rel]["outputs"]) for rel in jobs[rule])
        text = f"{rule} ×{len(jobs[rule])} ({files} file{'s' if files != 1 else ''})"
        record = manifests[jobs[rule][0]]
        if rule == "fetch_model":
            keys = ("source", "original_model", "hub_id", "resolved_commit", "gguf_sha256")
            text += " source: " + ", ".join(f"{k}={record[k]}" for k in keys if record.get(k))
        if rule == "fetch_data":
            for rel in jobs[rule]:
                r = manifests[rel]
                origin = r.get("resolved_commit") or _short(r.get("sha256"))
                text += f"; {r.get('dataset')}: {r.get('origin')} {r.get('hub_id') or r.get('path')} @ {origin}"
        return text

    lines: list[str] = []
    printed: set[str] = set()

    def visit(rule: str, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        if rule in printed:
            lines.append(f"{prefix}{branch}{rule} (above)")
            return
        printed.add(rule)
        lines.append(f"{prefix}{branch}{label(rule)}")
        children = sorted(upstream.get(rule, ()))
        child_prefix = prefix if top else prefix + ("    " if last else "│   ")
        for i, child in enumerate(children):
            visit(child, child_prefix, i == len(children) - 1, False)

    for root in ["report"] + sorted({_rule(manifests[r]) for r in walk["others"]}):
        if root not in printed:
            visit(root, "", True, True)
    return lines


def drawn_from_tables(auditor: Auditor) -> list[str]:
    """The tables files the figures and the report were drawn from, with their sha256."""
    tables = {}
    for record in auditor.manifests.values():
        if _rule(record) in ("figure", "report"):
            for path, entry in record["inputs"].items():
                if path.startswith("tables/"):
                    tables[path] = entry["sha256"]
    return [f"{path} (sha256 {_short(digest)}…)" for path, digest in sorted(tables.items())]


def load_config(path: Path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    try:
        validate_config(config)
    except ConfigError as err:
        raise AuditError(str(path), str(err)) from None
    return config


def main(results_dir: Path, config_path: Path | None = None, code: str = "checkout", published: bool = False) -> dict:
    started = time.time()
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise AuditError(str(results_dir), "no such results folder")
    auditor = Auditor(results_dir, load_config(config_path) if config_path else None, code, published)
    walk = auditor.run()
    seconds = time.time() - started
    files = len(auditor.hashes) - len(auditor.unpublished)
    root = auditor.manifests[ROOT_MANIFEST]
    commit = root["code"]
    print(f"AUDIT PASSED: {results_dir}")
    print(
        f"{len(auditor.manifests)} manifests, {files} files ({auditor.bytes_hashed / 1e9:.2f} GB) re-hashed"
        + (f", {len(auditor.unpublished)} recorded files not published (weights, logs)" if published else "")
        + " "
        f"in {seconds:.1f} s; code {_short(commit['git_commit'])} (dirty: {commit['git_dirty']}) = "
        f"{auditor.code_reference}; config {_short(auditor.expected_fingerprint)}…"
        + (f" = {config_path}" if config_path else " (the report's)")
    )
    if auditor.dropped:
        print(
            f"{len(auditor.dropped)} merged weight files dropped after evaluation: their sha256 "
            "recorded by merge and read by evaluate_merged agree"
        )
    print("\nprovenance (report -> sources):")
    print("\n".join(provenance_tree(auditor, walk)))
    drawn = drawn_from_tables(auditor)
    print("\nfigures and report were drawn from these tables alone:")
    print("\n".join(f"  {line}" for line in drawn))
    print(f"rebuild them without a model or GPU: make report-from-tables RESULTS={results_dir}")
    return {
        "seconds": seconds,
        "files": files,
        "unpublished": sorted(auditor.unpublished),
        "dropped": sorted(auditor.dropped),
        "manifests": len(auditor.manifests),
        "tables": drawn,
        **walk,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="a results_dir")
    parser.add_argument("--config", type=Path, help="the config the folder must come from (default: the report's)")
    parser.add_argument(
        "--code",
        choices=["checkout", "report"],
        default="checkout",
        help="checkout: every artifact was made by this checkout's code (default); report: by the report's",
    )
    parser.add_argument(
        "--published", action="store_true", help="a published study: recorded files it does not hold are not errors"
    )
    a = parser.parse_args()
    try:
        main(a.results, a.config, a.code, a.published)
    except AuditError as err:
        print(f"AUDIT FAILED: {err}", file=sys.stderr)
        sys.exit(1)
