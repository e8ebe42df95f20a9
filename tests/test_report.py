"""Tables, figures and the report: built in CI, rebuildable from the tables alone, and
rendered for real in headless Chromium with the headline numbers checked against runs.csv."""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import PROJECT, TINY_CONFIG, snakemake
from figures import FIGURES
from tables import PAIR_KEYS

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_runs_table_has_one_row_per_cell(pipeline_run):
    runs = pd.read_csv(pipeline_run / "tables" / "runs.csv")
    assert len(runs) == 4 and runs.cell.is_unique
    for column in (
        "train_peak_gib",
        "weights_gib",
        "tokens_per_second",
        "final_train_loss",
        "ppl_adapter_eval_chat_assistant",
        "ppl_merged_wikitext",
        "merge_max_abs_logit_diff",
    ):
        assert runs[column].notna().all(), column
    documented = (PROJECT / "report" / "columns.md").read_text()
    undocumented = [c for c in runs.columns if f"`{c}`" not in documented and not c.startswith("ppl_")]
    assert not undocumented
    assert "last_batch_loss" not in runs.columns and (runs.memory_measure == "cpu_train_phase_peak_rss").all()
    gaps = pd.read_csv(pipeline_run / "tables" / "gaps.csv")
    assert len(gaps) == 2 * 2 * 2  # two learning rates × adapter/merged × two eval sets
    assert gaps.example_ci_low.notna().all() and (gaps.example_ci_low <= gaps.example_ci_high).all()
    assert not [c for c in gaps.columns if f"`{c}`" not in documented]


def test_figures_and_report_exist(pipeline_run):
    for name in FIGURES:
        assert (pipeline_run / "figures" / f"{name}.png").stat().st_size > 1000
        assert (pipeline_run / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    assert (pipeline_run / "report" / "report.html").stat().st_size > 10_000


def test_deleted_figures_and_report_rebuild_from_the_tables(pipeline_run):
    figures, report = pipeline_run / "figures", pipeline_run / "report" / "report.html"
    before = {p.name: p.read_bytes() for p in figures.glob("*.png")}
    shutil.rmtree(figures)
    report.unlink()
    # Only the figure and report rules may run: nothing upstream (no model, no GPU) is needed.
    snakemake(
        "--cores",
        "2",
        "--allowed-rules",
        "figure",
        "downstream_figure",
        "report",
        str(report),
        results_dir=pipeline_run,
    )
    assert {p.name: p.read_bytes() for p in figures.glob("*.png")} == before  # same tables, same pixels
    assert report.is_file()


def test_tables_alone_rebuild_figures_and_report_by_command(pipeline_run, tmp_path):
    """The documented command, on a folder that holds nothing but the tables."""
    shutil.copytree(pipeline_run / "tables", tmp_path / "tables")
    result = subprocess.run(
        [
            "make",
            "-s",
            "report-from-tables",
            f"RESULTS={tmp_path}",
            f"CONFIG={TINY_CONFIG}",
            f"PYTHON_BIN={sys.executable}",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The tiny config enables evaluate.lm_eval: its figure is redrawn too.
    assert sorted(p.stem for p in (tmp_path / "figures").glob("*.png")) == sorted([*FIGURES, "downstream"])
    assert (tmp_path / "report" / "report.html").is_file()


def expected_headline(runs: pd.DataFrame) -> dict[str, str]:
    """Recomputed here from runs.csv, independently of scripts/report.py: one line per pair
    setting (this grid: two learning rates, one quant setting, never pooled)."""
    lora = runs[runs.method == "lora"].set_index(PAIR_KEYS)
    qlora = runs[runs.method == "qlora"].set_index(PAIR_KEYS)
    joined = lora.join(qlora, lsuffix="_l", rsuffix="_q", how="inner").reset_index()
    expected = {"merge-max-diff": f"{runs.merge_max_abs_logit_diff.max():.3g}"}
    assert joined.learning_rate.nunique() == 2
    for i, (_, group) in enumerate(joined.groupby("learning_rate", sort=True)):
        weights = group.weights_gib_l - group.weights_gib_q
        steady = group.steady_tokens_per_second_q / group.steady_tokens_per_second_l
        expected |= {
            f"weights-saved-gib-{i}": f"{weights.mean():.3f}",
            f"weights-saved-pct-{i}": f"{(weights / group.weights_gib_l).mean() * 100:.1f}",
            f"speed-ratio-{i}": f"{(group.tokens_per_second_q / group.tokens_per_second_l).mean():.3f}",
            f"steady-speed-ratio-{i}": f"{steady.mean():.3f}",
        }
    return expected


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Chromium is missing: tests/browser/install.sh (run by make test) installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_report_renders_in_a_real_browser(pipeline_run, browser):
    report = pipeline_run / "report" / "report.html"
    browser.get(report.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert sorted(alt for alt, *_ in images) == sorted([*FIGURES, "downstream"])  # the tiny config runs lm-eval
    broken = [alt for alt, complete, width, height in images if not (complete and width > 100 and height > 100)]
    assert not broken
    runs = pd.read_csv(pipeline_run / "tables" / "runs.csv")
    for element_id, value in expected_headline(runs).items():
        assert browser.find_element("id", element_id).text == value, element_id
    quality = browser.find_element("id", "quality-cost-0").text
    assert "one seed: no interval" in quality and "eval-set 95 % interval" in quality
    # A CPU study: the memory measure is named and no savings headline is drawn from RSS.
    assert browser.find_element("id", "memory-measure").text == "cpu_train_phase_peak_rss"
    assert not browser.find_elements("id", "memory-saved-gib-0")
