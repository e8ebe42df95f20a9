"""The published GPU study (studies/): its figures and report come back byte for byte from
its tables alone, and its audit passes, and fails when one committed table is altered."""

import shutil
import subprocess
import sys

import pytest

import audit
from conftest import PROJECT

STUDIES = sorted(p for p in (PROJECT / "studies").iterdir() if (p / "report" / "report.html").is_file())
REDRAWN = [
    "report/report.html",
    *(f"figures/{n}.{e}" for n in ("memory", "perplexity", "loss_curves") for e in ("png", "svg")),
]


@pytest.mark.parametrize("study", STUDIES, ids=[p.name for p in STUDIES])
def test_figures_and_report_regenerate_byte_identical(study, tmp_path):
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    for path in [*copy.glob("figures/*.png"), *copy.glob("figures/*.svg"), copy / "report" / "report.html"]:
        path.unlink()
    command = ["make", "-s", "report-from-tables", f"RESULTS={copy}", f"CONFIG={copy / 'config.yaml'}"]
    subprocess.run([*command, f"PYTHON_BIN={sys.executable}"], cwd=PROJECT, check=True, capture_output=True)
    for name in (*REDRAWN, *(p.relative_to(study).as_posix() for p in study.glob("figures/*.png"))):
        assert (copy / name).read_bytes() == (study / name).read_bytes(), name


@pytest.mark.parametrize("study", STUDIES, ids=[p.name for p in STUDIES])
def test_the_published_audit_passes_and_catches_an_altered_table(study, tmp_path):
    walk = audit.main(study, study / "config.yaml", code="report", published=True)
    assert walk["manifests"] >= 30 and any(p.endswith(".safetensors") for p in walk["unpublished"])
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    pairs = copy / "tables" / "pairs.csv"
    pairs.write_text(pairs.read_text().replace("nf4", "fp4", 1))
    with pytest.raises(audit.AuditError, match="tables/pairs.csv: sha256 .* does not match"):
        audit.main(copy, copy / "config.yaml", code="report", published=True)


def test_a_study_is_published():
    assert STUDIES, "no published study under studies/"
