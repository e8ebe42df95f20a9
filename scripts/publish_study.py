"""Publish a finished study into the repository: everything a reader needs to check and
redraw it, nothing that is weights or data.

    python scripts/publish_study.py --results /scratch/smollm2-gpu \\
        --config config/smollm2-gpu.yaml --out studies/smollm2-135m-h200

Copied, with their paths under the results folder kept: every manifest
(``*.provenance.json``), the tidy tables, figures and report, ``data/stats.json``, the
tokenizer audit, each cell's ``metrics.json``, loss curve and merge check, every
evaluation CSV (per data set and per example) and the greedy samples. Left out: model
weights and tokenizer files, adapters, the prepared data (the data sets' own licences
apply; the manifests keep their sha256), TensorBoard events and logs. The config is copied
as ``config.yaml``.

Then ``make report-from-tables RESULTS=<out> CONFIG=<out>/config.yaml`` redraws the figures
and report byte for byte, and ``scripts/audit.py --results <out> --published --code
report`` checks every published file and the chain of recorded hashes.
"""

import argparse
import shutil
from pathlib import Path

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
    shutil.copy2(config, out / "config.yaml")
    size = sum(p.stat().st_size for p in copied)
    print(f"{len(copied)} files ({size / 1e6:.1f} MB) -> {out}")
    return copied


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="the study's results_dir")
    parser.add_argument("--config", type=Path, required=True, help="the config the study ran with")
    parser.add_argument("--out", type=Path, required=True, help="e.g. studies/<name>")
    a = parser.parse_args()
    main(a.results, a.config, a.out)
