"""The report's sections on synthetic studies (a CPU study shaped like config/config.yaml, a
GPU study shaped like the GPU grid) built by the real tables, figures and report code: what
each headline says, per setting, and that the tables alone regenerate it byte for byte."""

import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import PROJECT
from study_tables import build_tables

CONFIG = PROJECT / "config" / "config.yaml"


def regenerate(results) -> str:
    command = [
        "make",
        "-s",
        "report-from-tables",
        f"RESULTS={results}",
        f"CONFIG={CONFIG}",
        f"PYTHON_BIN={sys.executable}",
    ]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return (results / "report" / "report.html").read_text()


def element(page: str, element_id: str) -> str | None:
    found = re.search(rf"id='{re.escape(element_id)}'>(.*?)</(span|b|p)>", page, re.S)
    return found and re.sub(r"<[^>]+>", "", found.group(1))


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """Report only (no figures: the GPU study draws them), to keep the test cheap."""
    import report

    root = tmp_path_factory.mktemp("cpu-report")
    build_tables(root)
    report.main(root / "tables", {}, yaml.safe_load(CONFIG.read_text()), root / "report" / "report.html")
    return root, (root / "report" / "report.html").read_text()


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-report")
    build_tables(root, gpu=True)
    return root, regenerate(root)


def test_cpu_report_names_both_intervals_and_drops_the_memory_headline(cpu_report):
    root, page = cpu_report
    gaps = pd.read_csv(root / "tables" / "gaps.csv")
    for i, row in enumerate(
        gaps[(gaps.model_kind == "adapter") & (gaps.dataset == "eval_chat_assistant")].itertuples()
    ):
        text = element(page, f"quality-cost-{i}")
        assert text.startswith(f"{row.gap:+.3f}; eval-set 95 % interval [{row.example_ci_low:+.3f}, ")
        assert f"seed 95 % interval [{row.seed_ci_low:+.3f}, {row.seed_ci_high:+.3f}] (t across 2 seeds" in text
        assert "2000 resamples, seed 0" in text
        # lr 2e-6 (first setting) barely moved: the gap is the 4-bit base's; lr 2e-4 trained.
        assert (element(page, f"quality-note-{i}") is not None) == (not row.adapters_moved)
    assert "4-bit base's gap" in element(page, "quality-note-0") and gaps.learning_rate.iloc[0] == 2e-6
    assert element(page, "memory-measure") == "cpu_train_phase_peak_rss"
    assert "memory-saved-gib" not in page and "training-phase" not in page.split("memory-measure")[0]
    assert "high-water mark reset at training start" in page and "includes the allocator" in page
    assert element(page, "gpu-hours-total") == "no GPU"
    assert "one quantisation setting" in element(page, "quant-findings")
    assert "dequantised" in element(page, "double-quantised-note") and "Q4_1" in page
    assert "median" not in page and "last_batch_loss" not in page


def test_gpu_report_per_setting_memory_quantisation_and_gpu_hours(gpu_report):
    root, page = gpu_report
    pairs = pd.read_csv(root / "tables" / "pairs.csv")
    keys = ["target_modules", "quant_type", "double_quant"]
    for i, (_, group) in enumerate(pairs.groupby(keys, sort=True)):
        saved = group.lora_train_peak_gib - group.qlora_train_peak_gib
        assert element(page, f"memory-saved-gib-{i}") == f"{saved.mean():.3f}"
        assert element(page, f"steady-speed-ratio-{i}") == (
            f"{(group.qlora_steady_tokens_per_second / group.lora_steady_tokens_per_second).mean():.3f}"
        )
    assert i == 5  # two targets × three quant settings, never pooled
    assert element(page, "gpu-hours-total") == f"{24 * 1800 / 3600:.3f}"
    assert (element(page, "merge-floor"), element(page, "merge-fold-share")) == ("0.020", "0.0001")
    assert "state lives outside torch" in page and "(optimizer state)" in page
    quantisation = pd.read_csv(root / "tables" / "quantisation.csv")
    answers = quantisation[quantisation.dataset == "eval_chat_assistant"].reset_index(drop=True)
    for i, row in enumerate(answers.itertuples()):
        assert element(page, f"quant-finding-{i}") == row.verdict
    assert {"reproduced", "not reproduced"} == set(answers.verdict)


def test_regeneration_from_tables_is_byte_identical(gpu_report, tmp_path):
    """The figures with error bars (seed intervals) and the page come out the same bytes again."""
    import figures as figures_script
    import report

    root, page = gpu_report
    tables = root / "tables"
    for name in ("perplexity", "throughput"):
        png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
        figures_script.main(name, tables / "runs.csv", tables / "loss_curves.csv", tables / "perplexity.csv", png, svg)
        assert png.read_bytes() == (root / "figures" / png.name).read_bytes()
        assert svg.read_bytes() == (root / "figures" / svg.name).read_bytes()
    figures = {
        n: root / "figures" / f"{n}.png" for n in figures_script.FIGURES if (root / "figures" / f"{n}.png").is_file()
    }
    report.main(tables, figures, yaml.safe_load(CONFIG.read_text()), tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text() == page


def test_report_reads_the_config_it_is_given(gpu_report, tmp_path):
    root, _ = gpu_report
    config = yaml.safe_load(CONFIG.read_text()) | {"model": {"source": "hub"}}
    import report

    report.main(root / "tables", {}, config, tmp_path / "report.html")
    assert element((tmp_path / "report.html").read_text(), "double-quantised-note") == (
        "Base weights from model.source hub."
    )


def test_a_study_without_pairs_still_reports(cpu_report, tmp_path):
    """A grid of one arm (e.g. QLoRA only) has no gaps: the report says so instead of failing."""
    import shutil

    import figures
    import report
    import tables as tables_script
    from statistics_tables import GAPS_COLUMNS, gaps_table, quantisation_table

    root, _ = cpu_report
    tables = shutil.copytree(root / "tables", tmp_path / "tables")
    runs = pd.read_csv(tables / "runs.csv")
    qlora = runs[runs.method == "qlora"]
    perplexity, examples = pd.read_csv(tables / "perplexity.csv"), pd.read_csv(tables / "perplexity_examples.csv")
    gaps = gaps_table(qlora, perplexity, examples)
    assert gaps.empty and list(gaps.columns) == GAPS_COLUMNS
    qlora.to_csv(tables / "runs.csv", index=False)
    gaps.to_csv(tables / "gaps.csv", index=False)
    tables_script.pairs_table(qlora).to_csv(tables / "pairs.csv", index=False)
    quantisation_table(qlora, perplexity, examples).to_csv(tables / "quantisation.csv", index=False)
    report.main(tables, {}, yaml.safe_load(CONFIG.read_text()), tmp_path / "report.html")
    assert "no LoRA/QLoRA pairs" in (tmp_path / "report.html").read_text()
    # ... and every figure draws with its one arm (seaborn's dodge of one arm divided by zero)
    curves = pd.read_csv(tables / "loss_curves.csv")
    curves[curves.method == "qlora"].to_csv(tables / "loss_curves.csv", index=False)
    for figure in figures.FIGURES:
        out = tmp_path / "figures" / figure
        figures.main(
            figure,
            tables / "runs.csv",
            tables / "loss_curves.csv",
            tables / "perplexity.csv",
            *(out.with_suffix(suffix) for suffix in (".png", ".svg")),
        )
        assert out.with_suffix(".png").stat().st_size > 10_000
