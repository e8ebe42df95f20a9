"""Publish a finished study into the repository: everything a reader needs to check and
redraw it, nothing that is weights or data.

    python scripts/publish_study.py --results /scratch/smollm2-gpu \\
        --config config/smollm2-gpu.yaml --out studies/smollm2-135m-h200

Copied, with their paths under the results folder kept: every manifest
(``*.provenance.json``), the tidy tables, figures and report, ``data/stats.json``, the
tokenizer audit, each cell's ``metrics.json``, loss curve and merge check, every
evaluation CSV (per data set and per example) and the greedy samples. Left out: model
weights and tokenizer files, adapters, the prepared data (the data sets' own licences
apply; the manifests keep their sha256), TensorBoard events and logs. ``config.yaml`` is
the config as Snakemake built it (``config/config.yaml`` updated by the config file given),
with the ``results_dir`` the report recorded; any other difference from the recorded config
stops the publication. Its key order is Snakemake's, so the redrawn report is the same bytes.

Then ``make report-from-tables RESULTS=<out> CONFIG=<out>/config.yaml`` redraws the figures
and report byte for byte, and ``scripts/audit.py --results <out> --published --code
report`` checks every published file and the chain of recorded hashes.
"""

import argparse
import json
import shutil
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"
PUBLISHED = [
    "**/*.provenance.json",
    "tables/*",
    "figures/*",
    "report/report.html",
    "data/stats.json",
    "model/tokenizer_audit.json",
    "train/*/metrics.json",
    "train/*/loss_curve.csv",
    "merged/*/merge_check.json",
    "eval/*/*.csv",
    "samples/*/*.jsonl",
]


def published_files(results: Path) -> list[Path]:
    return sorted({p for pattern in PUBLISHED for p in results.glob(pattern) if p.is_file()})


def layered(top: dict, below: dict) -> dict:
    """``top`` over ``below``, in Snakemake's key order: top's keys first, then below's others."""
    merged = {}
    for key, value in top.items():
        merged[key] = (
            layered(value, below[key]) if isinstance(value, dict) and isinstance(below.get(key), dict) else value
        )
    merged.update({key: value for key, value in below.items() if key not in top})
    return merged


def main(results: Path, config: Path, out: Path) -> list[Path]:
    results, out = Path(results), Path(out)
    if not (results / "report" / "report.provenance.json").is_file():
        raise SystemExit(f"{results}: no report manifest; run the study to its report first")
    if out.exists():
        shutil.rmtree(out)
    copied = []
    for path in published_files(results):
        target = out / path.relative_to(results)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(target)
    recorded = json.loads((results / "report" / "report.provenance.json").read_text())["params"]["config"]
    # As Snakemake built it: --configfile over the Snakefile's configfile, then --config.
    given = layered(yaml.safe_load(Path(config).read_text()), yaml.safe_load(DEFAULT_CONFIG.read_text()))
    given["results_dir"] = recorded["results_dir"]
    if json.dumps(given, sort_keys=True) != json.dumps(recorded, sort_keys=True):
        differ = sorted(k for k in set(given) | set(recorded) if given.get(k) != recorded.get(k))
        raise SystemExit(f"{config} is not the config the study ran with (keys that differ: {differ})")
    (out / "config.yaml").write_text(yaml.safe_dump(given, sort_keys=False))
    size = sum(p.stat().st_size for p in copied)
    print(f"{len(copied)} files ({size / 1e6:.1f} MB) -> {out}")
    return copied


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="the study's results_dir")
    parser.add_argument("--config", type=Path, required=True, help="the config file the study ran with")
    parser.add_argument("--out", type=Path, required=True, help="e.g. studies/<name>")
    a = parser.parse_args()
    main(a.results, a.config, a.out)
