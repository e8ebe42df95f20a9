"""Intervals, memory measures and GPU-hours of the tidy tables, on small synthetic studies
written as the pipeline writes them and run through the real tables code (seconds, no model)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

import tables as tables_script
from statistics_tables import (
    StatisticsError,
    bootstrap_gap,
    example_arrays,
    gaps_table,
    quantisation_table,
    seed_interval,
)
from study_tables import GIB, build_tables


@pytest.fixture(scope="module")
def cpu_study(tmp_path_factory):
    return build_tables(tmp_path_factory.mktemp("cpu-study"))


@pytest.fixture(scope="module")
def gpu_study(tmp_path_factory):
    return build_tables(tmp_path_factory.mktemp("gpu-study"), gpu=True)


def trained_row(gaps: pd.DataFrame, lr: float = 2e-4) -> pd.Series:
    rows = gaps[(gaps.learning_rate == lr) & (gaps.model_kind == "adapter") & (gaps.dataset == "eval_chat_assistant")]
    assert len(rows) == 1
    return rows.iloc[0]


def test_one_outlier_example_widens_the_eval_set_interval_not_the_seed_interval(cpu_study, tmp_path):
    planted = build_tables(tmp_path / "planted", outlier=3.0)
    clean, outlier = trained_row(pd.read_csv(cpu_study / "gaps.csv")), trained_row(pd.read_csv(planted / "gaps.csv"))
    example_width = lambda row: row.example_ci_high - row.example_ci_low  # noqa: E731
    seed_width = lambda row: row.seed_ci_high - row.seed_ci_low  # noqa: E731
    # The outlier is the same conversation for every seed: resampling examples sees it, seeds do not.
    assert example_width(outlier) > 5 * example_width(clean)
    assert seed_width(outlier) < 2 * seed_width(clean)
    assert outlier.example_ci_low <= outlier.gap <= outlier.example_ci_high
    assert clean.example_ci_low <= clean.gap <= clean.example_ci_high


def test_gap_is_the_paired_perplexity_difference_and_examples_add_up(cpu_study):
    gaps, pairs = pd.read_csv(cpu_study / "gaps.csv"), pd.read_csv(cpu_study / "pairs.csv")
    perplexity = pd.read_csv(cpu_study / "perplexity.csv")
    examples = pd.read_csv(cpu_study / "perplexity_examples.csv")
    for row in gaps.itertuples():
        diffs = pairs.loc[pairs.learning_rate == row.learning_rate, f"diff_ppl_{row.model_kind}_{row.dataset}"]
        assert row.gap == pytest.approx(diffs.mean(), rel=1e-9)
        assert row.n_seeds == len(diffs) == 2 and row.n_resamples == 2000 and row.bootstrap_seed == 0
    # A data set's perplexity is exp(sum nll / sum tokens) over its examples.
    summed = examples.groupby(["model_kind", "model", "dataset"])[["nll", "tokens"]].sum()
    joined = perplexity.set_index(["model_kind", "model", "dataset"]).join(summed, rsuffix="_sum", how="inner")
    assert len(joined) == len(summed)
    assert np.allclose(joined.perplexity, np.exp(joined.nll_sum / joined.tokens_sum))


def test_the_bootstrap_resamples_examples_as_documented():
    """The weighted sums equal an explicit resample of example indices drawn from the same seed."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(5, 50, size=(2, 9)).astype(float)
    a = (tokens * rng.uniform(2, 3, size=(2, 9)), tokens)
    b = (tokens * rng.uniform(2, 3, size=(2, 9)), tokens)
    gap, low, high = bootstrap_gap(a, b, 400, 7)
    draws = np.random.default_rng(7).integers(0, 9, size=(400, 9))
    ppl = lambda side, idx: np.exp(side[0][:, idx].sum(axis=1) / side[1][:, idx].sum(axis=1))  # noqa: E731
    explicit = [float((ppl(a, idx) - ppl(b, idx)).mean()) for idx in draws]
    assert (low, high) == pytest.approx(tuple(np.quantile(explicit, [0.025, 0.975])), rel=1e-12)
    assert gap == pytest.approx(float((ppl(a, np.arange(9)) - ppl(b, np.arange(9))).mean()))
    assert bootstrap_gap(a, b, 400, 7) == (gap, low, high)
    assert bootstrap_gap(a, b, 400, 8) != (gap, low, high)


def test_seed_interval_is_a_t_interval():
    mean, low, high = seed_interval([1.0, 2.0, 3.0])
    assert (mean, high - mean) == pytest.approx((2.0, 4.303 * 1.0 / math.sqrt(3)))
    assert math.isnan(seed_interval([1.0])[1])


def test_adapters_that_barely_moved_are_flagged(cpu_study):
    gaps = pd.read_csv(cpu_study / "gaps.csv")
    assert not gaps[gaps.learning_rate == 2e-6].adapters_moved.any()
    assert gaps[gaps.learning_rate == 2e-4].adapters_moved.all()
    still = trained_row(gaps, 2e-6)
    # Barely moved: the gap is the 4-bit base's gap.
    assert still.gap == pytest.approx(still.base_gap, rel=0.05)
    assert (still.lora_base, still.qlora_base) == ("base-16bit", "base-4bit-nf4-dq0")


def test_quantisation_findings_per_setting(gpu_study, cpu_study):
    quantisation = pd.read_csv(gpu_study / "quantisation.csv")
    nf4_fp4 = quantisation[quantisation.comparison == "nf4 − fp4"]
    # Synthetic fp4 bases are 0.06 nats/token worse than nf4: reproduced on bases and adapters, per target.
    assert set(nf4_fp4.stage) == {"base", "adapter"} and (nf4_fp4.verdict == "reproduced").all()
    assert set(nf4_fp4[nf4_fp4.stage == "adapter"].setting) == {"target_modules=qv", "target_modules=all_linear"}
    assert (nf4_fp4[nf4_fp4.stage == "adapter"].n_seeds == 3).all()
    assert nf4_fp4[nf4_fp4.stage == "base"].seed_ci_low.isna().all()
    # Double quantisation here costs 0.002 nats/token, resolved by both intervals: a cost, stated as such.
    dq = quantisation[quantisation.comparison == "double quant − none"]
    assert (dq.verdict == "not reproduced").all() and (dq.gap > 0).all()
    assert pd.read_csv(cpu_study / "quantisation.csv").empty  # one quant setting: nothing to compare


def test_missing_examples_are_named(cpu_study):
    runs = pd.read_csv(cpu_study / "runs.csv")
    examples = pd.read_csv(cpu_study / "perplexity_examples.csv")
    with pytest.raises(StatisticsError, match="no merged rows of .* on eval_chat"):
        gaps_table(runs, pd.read_csv(cpu_study / "perplexity.csv"), examples[examples.model_kind != "merged"])
    one_short = examples.drop(index=examples[(examples.model == "base-4bit-nf4-dq0") & (examples.example == 3)].index)
    with pytest.raises(StatisticsError, match="base-4bit-nf4-dq0 on eval_chat has other examples than base-16bit"):
        example_arrays(one_short, ["base-16bit", "base-4bit-nf4-dq0"], "base", "eval_chat")
    assert quantisation_table(runs, pd.read_csv(cpu_study / "perplexity.csv"), examples).empty
    altered = examples.copy()
    altered.loc[(altered.model_kind == "adapter") & (altered.example == 0), "nll"] *= 1.5
    with pytest.raises(
        StatisticsError, match=r"perplexity_examples.csv.gz does not add up to perplexity.csv for adapter"
    ):
        gaps_table(runs, pd.read_csv(cpu_study / "perplexity.csv"), altered)


def test_memory_measures_and_gpu_hours(cpu_study, gpu_study):
    cpu, gpu = pd.read_csv(cpu_study / "runs.csv"), pd.read_csv(gpu_study / "runs.csv")
    assert (cpu.memory_measure == "cpu_train_phase_peak_rss").all()
    assert np.allclose(cpu.train_peak_gib, cpu.train_peak_rss_bytes / GIB)
    assert cpu.gpu_hours.isna().all()
    assert (gpu.memory_measure == "gpu_train_peak").all()
    assert np.allclose(gpu.train_peak_gib, gpu.gpu_train_peak_bytes / GIB)
    assert np.allclose(gpu.gpu_hours, 1800 * 1 / 3600) and gpu.optimizer_paged.all()
    assert np.allclose(gpu.optimizer_state_gib, 3_686_400 / GIB)
    for runs in (cpu, gpu):
        assert "last_batch_loss" not in runs.columns and "peak_rss_bytes" not in runs.columns
        assert {"final_loss_steps", "steady_from_step", "process_peak_rss_bytes"} <= set(runs.columns)


def test_metrics_from_an_older_train_script_are_named(cpu_study, tmp_path):
    metrics = sorted((cpu_study.parent / "train").glob("*/metrics.json"))[0]
    old = json.loads(metrics.read_text())
    del old["train_peak_rss_bytes"], old["optimizer_state_bytes"]
    (tmp_path / metrics.parent.name).mkdir()
    stale = tmp_path / metrics.parent.name / "metrics.json"
    stale.write_text(json.dumps(old))
    check = cpu_study.parent / "merged" / metrics.parent.name / "merge_check.json"
    with pytest.raises(ValueError, match=r"metrics.json lacks train_peak_rss_bytes, optimizer_state_bytes"):
        tables_script.runs_table([stale], [check], pd.read_csv(cpu_study / "perplexity.csv"))
