"""Intervals of the study's differences, as tidy tables (no HTML here: ``report.py`` renders them).

Two sources of uncertainty, kept apart and named:

- **seed interval**: a 95 % Student t-interval across seeds of the per-seed difference, all
  on the one fixed eval set. It says how much the gap moves with LoRA init, data order and
  dropout; it says nothing about which conversations were evaluated.
- **eval-set interval**: a paired percentile bootstrap over eval examples. One resample of
  example indices (with replacement) is drawn and used for both arms, every seed and every
  model of a row; each model's token-weighted perplexity, exp(sum nll / sum tokens), is
  recomputed on it and the gap is the mean over seeds of the per-seed difference. The
  resamples are drawn from ``numpy.random.default_rng(bootstrap_seed)``, so a row's interval
  is reproducible from the tables; ``n_resamples`` and ``bootstrap_seed`` are in every row.

Tables: ``gaps.csv`` (QLoRA − LoRA per pair setting) and ``quantisation.csv`` (NF4 − FP4 and
double quantisation − none, on the 4-bit bases and after fine-tuning). Columns are
documented in ``report/columns.md``.
"""

import math
import statistics

import numpy as np
import pandas as pd

from grid import GRID_COLUMNS, base_model_names

N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
EXAMPLE_DATASETS = ["eval_chat_assistant", "eval_chat"]
# An adapter whose answer perplexity is within this relative distance of its training base's
# has barely moved: the gap it shows is its base's gap, not a cost of training.
MOVED_REL_TOLERANCE = 1e-3
# Everything but the seed and the arm (method, quant_type, double_quant): one pair setting.
PAIR_KEYS = [c for c in GRID_COLUMNS if c not in ("method", "quant_type", "double_quant")]
SETTING_KEYS = [c for c in PAIR_KEYS if c != "seed"]
# Two-sided 95 % Student t quantiles by degrees of freedom (beyond 30: the normal 1.96).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T_975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


INTERVAL_COLUMNS = ["gap", "seed_ci_low", "seed_ci_high", "example_ci_low", "example_ci_high", "n_seeds", "n_examples"]
INTERVAL_COLUMNS += ["n_resamples", "bootstrap_seed"]
GAPS_COLUMNS = [*SETTING_KEYS, "quant_type", "double_quant", "model_kind", "dataset", *INTERVAL_COLUMNS]
GAPS_COLUMNS += ["lora_mean_ppl", "qlora_mean_ppl", "lora_base", "qlora_base", "lora_base_ppl", "qlora_base_ppl"]
GAPS_COLUMNS += ["base_gap", "lora_adapter_moved_rel", "qlora_adapter_moved_rel", "adapters_moved"]
QUANTISATION_COLUMNS = ["comparison", "within", "stage", "setting", "dataset", *INTERVAL_COLUMNS]
QUANTISATION_COLUMNS += ["b_mean_ppl", "gap_rel", "a_base", "b_base", "verdict"]


class StatisticsError(ValueError):
    pass


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % t-interval (None with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean, low and high of the 95 % t-interval across seeds (NaN bounds with one seed)."""
    mean, half = mean_interval(values)
    return (mean, math.nan, math.nan) if half is None else (mean, mean - half, mean + half)


def training_base(method: str, quant_type: str, double_quant: bool) -> str:
    """The base model a cell trained on: the 16-bit base for lora, its 4-bit base for qlora."""
    if method == "lora":
        return "base-16bit"
    return base_model_names(pd.DataFrame([{"method": method, "quant_type": quant_type, "double_quant": double_quant}]))[
        1
    ]


def example_arrays(examples: pd.DataFrame, models: list[str], model_kind: str, dataset: str):
    """(nll, tokens): arrays of shape (models, examples), aligned on the example index."""
    rows = examples[(examples.model_kind == model_kind) & (examples.dataset == dataset)]
    nll, tokens, index = [], [], None
    for model in models:
        frame = rows[rows.model == model].sort_values("example")
        if frame.empty:
            raise StatisticsError(f"perplexity_examples.csv.gz has no {model_kind} rows of {model} on {dataset}")
        if index is None:
            index = frame.example.to_numpy()
        elif not np.array_equal(index, frame.example.to_numpy()):
            raise StatisticsError(
                f"perplexity_examples.csv.gz: {model} on {dataset} has other examples than {models[0]}"
            )
        nll.append(frame.nll.to_numpy(float))
        tokens.append(frame.tokens.to_numpy(float))
    return np.array(nll), np.array(tokens)


def perplexities(nll: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Token-weighted perplexity of every model (columns) on every resample (rows of weights)."""
    return np.exp((weights @ nll.T) / (weights @ tokens.T))


def bootstrap_gap(a: tuple, b: tuple, n_resamples: int, seed: int) -> tuple[float, float, float]:
    """Gap mean_i(ppl(a_i) - ppl(b_i)) over paired models, with its paired percentile bootstrap
    interval over examples: the same example resample for every model of both sides."""
    (nll_a, tok_a), (nll_b, tok_b) = a, b
    n = nll_a.shape[1]
    full = np.ones((1, n))
    gap = float((perplexities(nll_a, tok_a, full) - perplexities(nll_b, tok_b, full)).mean())
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    # Multiplicity of each example in each resample: a weighted sum is a resampled sum.
    weights = np.zeros((n_resamples, n))
    np.add.at(weights, (np.arange(n_resamples)[:, None], draws), 1.0)
    gaps = (perplexities(nll_a, tok_a, weights) - perplexities(nll_b, tok_b, weights)).mean(axis=1)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.nanquantile(gaps, [alpha, 1 - alpha])
    return gap, float(low), float(high)


def _ppl(perplexity: pd.DataFrame, model: str, model_kind: str, dataset: str) -> float:
    rows = perplexity[
        (perplexity.model == model) & (perplexity.model_kind == model_kind) & (perplexity.dataset == dataset)
    ]
    return float(rows.perplexity.iloc[0]) if len(rows) else math.nan


def _with_seeds(frame: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    return frame[frame.seed.isin(seeds)].sort_values("seed")


def _paired(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame, pd.DataFrame]]:
    """Per pair setting: (setting, lora rows, qlora rows), both sorted by seed, seeds matched."""
    settings = []
    lora = runs[runs.method == "lora"]
    for key, qlora in runs[runs.method == "qlora"].groupby(SETTING_KEYS + ["quant_type", "double_quant"], sort=True):
        setting = dict(zip(SETTING_KEYS + ["quant_type", "double_quant"], key, strict=True))
        same = lora
        for column in SETTING_KEYS:
            same = same[same[column] == setting[column]]
        seeds = sorted(set(same.seed) & set(qlora.seed))
        if seeds:
            settings.append((setting, _with_seeds(same, seeds), _with_seeds(qlora, seeds)))
    return settings


def gaps_table(
    runs: pd.DataFrame,
    perplexity: pd.DataFrame,
    examples: pd.DataFrame,
    n_resamples: int = N_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """QLoRA − LoRA perplexity gap per pair setting, model kind and data set, with its seed
    interval and its eval-set interval, beside each arm's training base."""
    rows = []
    for setting, lora, qlora in _paired(runs):
        bases = {"lora": "base-16bit", "qlora": training_base("qlora", setting["quant_type"], setting["double_quant"])}
        moved = {}
        for arm, frame in (("lora", lora), ("qlora", qlora)):
            base = _ppl(perplexity, bases[arm], "base", "eval_chat_assistant")
            moved[arm] = float((frame.ppl_adapter_eval_chat_assistant / base - 1).abs().mean())
        for model_kind in ("adapter", "merged"):
            for dataset in EXAMPLE_DATASETS:
                per_seed = list(
                    qlora[f"ppl_{model_kind}_{dataset}"].to_numpy() - lora[f"ppl_{model_kind}_{dataset}"].to_numpy()
                )
                gap, seed_low, seed_high = seed_interval(per_seed)
                a = example_arrays(examples, list(qlora.cell), model_kind, dataset)
                b = example_arrays(examples, list(lora.cell), model_kind, dataset)
                full_gap, example_low, example_high = bootstrap_gap(a, b, n_resamples, bootstrap_seed)
                # The per-example sums and the totals are float32 sums in another order: agree to 1e-4.
                level = float(qlora[f"ppl_{model_kind}_{dataset}"].mean())
                if not math.isclose(full_gap, gap, abs_tol=1e-4 * level):
                    raise StatisticsError(
                        f"perplexity_examples.csv.gz does not add up to perplexity.csv for {model_kind} on {dataset} "
                        f"of {', '.join(qlora.cell)} vs {', '.join(lora.cell)}: gap {full_gap:.6g} vs {gap:.6g}"
                    )
                lora_base = _ppl(perplexity, bases["lora"], "base", dataset)
                qlora_base = _ppl(perplexity, bases["qlora"], "base", dataset)
                rows.append(
                    {
                        **setting,
                        "model_kind": model_kind,
                        "dataset": dataset,
                        "gap": gap,
                        "seed_ci_low": seed_low,
                        "seed_ci_high": seed_high,
                        "example_ci_low": example_low,
                        "example_ci_high": example_high,
                        "n_seeds": len(per_seed),
                        "n_examples": a[0].shape[1],
                        "n_resamples": n_resamples,
                        "bootstrap_seed": bootstrap_seed,
                        "lora_mean_ppl": float(lora[f"ppl_{model_kind}_{dataset}"].mean()),
                        "qlora_mean_ppl": float(qlora[f"ppl_{model_kind}_{dataset}"].mean()),
                        "lora_base": bases["lora"],
                        "qlora_base": bases["qlora"],
                        "lora_base_ppl": lora_base,
                        "qlora_base_ppl": qlora_base,
                        "base_gap": qlora_base - lora_base,
                        "lora_adapter_moved_rel": moved["lora"],
                        "qlora_adapter_moved_rel": moved["qlora"],
                        "adapters_moved": bool(max(moved.values()) > MOVED_REL_TOLERANCE),
                    }
                )
    return pd.DataFrame(rows).reindex(columns=GAPS_COLUMNS)


def _verdict_lower(intervals: list[tuple[float, float]]) -> str:
    """'a < b' claims: every available interval below 0 reproduces it, every one above 0 refutes it."""
    intervals = [(lo, hi) for lo, hi in intervals if not (math.isnan(lo) or math.isnan(hi))]
    if intervals and all(hi < 0 for _, hi in intervals):
        return "reproduced"
    if intervals and all(lo > 0 for lo, _ in intervals):
        return "not reproduced"
    return "not resolved"


def _verdict_no_cost(intervals: list[tuple[float, float]]) -> str:
    """'costs nothing' claims: refuted when an interval lies wholly above 0 (a cost detected)."""
    intervals = [(lo, hi) for lo, hi in intervals if not (math.isnan(lo) or math.isnan(hi))]
    if not intervals:
        return "not resolved"
    return "not reproduced" if any(lo > 0 for lo, _ in intervals) else "reproduced"


def quantisation_table(
    runs: pd.DataFrame,
    perplexity: pd.DataFrame,
    examples: pd.DataFrame,
    n_resamples: int = N_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """The QLoRA paper's two quality findings, tested on this model: NF4 − FP4 (claim: < 0)
    and double quantisation − none (claim: no cost), on the bare 4-bit bases and on the
    fine-tuned QLoRA adapters (paired by seed within one setting)."""
    qlora = runs[runs.method == "qlora"]
    comparisons = []
    quants = set(zip(qlora.quant_type, qlora.double_quant, strict=True))
    for dq in (False, True):
        if ("nf4", dq) in quants and ("fp4", dq) in quants:
            comparisons.append(("nf4 − fp4", f"double_quant={dq}", ("nf4", dq), ("fp4", dq), _verdict_lower))
    for quant_type in ("nf4", "fp4"):
        if (quant_type, True) in quants and (quant_type, False) in quants:
            label = "double quant − none"
            comparisons.append(
                (label, f"quant_type={quant_type}", (quant_type, True), (quant_type, False), _verdict_no_cost)
            )
    rows = []
    for comparison, within, arm_a, arm_b, verdict in comparisons:
        base_a, base_b = training_base("qlora", *arm_a), training_base("qlora", *arm_b)
        for dataset in EXAMPLE_DATASETS:
            a, b = (
                example_arrays(examples, [base_a], "base", dataset),
                example_arrays(examples, [base_b], "base", dataset),
            )
            gap, low, high = bootstrap_gap(a, b, n_resamples, bootstrap_seed)
            rows.append(
                {"comparison": comparison, "within": within, "stage": "base", "setting": "", "dataset": dataset}
                | _interval_columns(
                    gap, (math.nan, math.nan), (low, high), 1, a[0].shape[1], n_resamples, bootstrap_seed
                )
                | _relative(gap, _ppl(perplexity, base_b, "base", dataset))
                | {"a_base": base_a, "b_base": base_b, "verdict": verdict([(low, high)])}
            )
            for key, group in qlora.groupby(SETTING_KEYS, sort=True):
                side_a = group[(group.quant_type == arm_a[0]) & (group.double_quant == arm_a[1])].sort_values("seed")
                side_b = group[(group.quant_type == arm_b[0]) & (group.double_quant == arm_b[1])].sort_values("seed")
                seeds = sorted(set(side_a.seed) & set(side_b.seed))
                side_a, side_b = side_a[side_a.seed.isin(seeds)], side_b[side_b.seed.isin(seeds)]
                if not seeds:
                    continue
                column = f"ppl_adapter_{dataset}"
                mean, seed_low, seed_high = seed_interval(list(side_a[column].to_numpy() - side_b[column].to_numpy()))
                a = example_arrays(examples, list(side_a.cell), "adapter", dataset)
                b = example_arrays(examples, list(side_b.cell), "adapter", dataset)
                _, low, high = bootstrap_gap(a, b, n_resamples, bootstrap_seed)
                setting = ", ".join(
                    f"{k}={v}" for k, v in zip(SETTING_KEYS, key, strict=True) if qlora[k].nunique() > 1
                )
                rows.append(
                    {"comparison": comparison, "within": within, "stage": "adapter", "setting": setting or "all cells"}
                    | {"dataset": dataset}
                    | _interval_columns(
                        mean, (seed_low, seed_high), (low, high), len(seeds), a[0].shape[1], n_resamples, bootstrap_seed
                    )
                    | _relative(mean, float(side_b[column].mean()))
                    | {"a_base": base_a, "b_base": base_b, "verdict": verdict([(seed_low, seed_high), (low, high)])}
                )
    return pd.DataFrame(rows).reindex(columns=QUANTISATION_COLUMNS)


def _relative(gap: float, b_mean_ppl: float) -> dict:
    return {"b_mean_ppl": b_mean_ppl, "gap_rel": gap / b_mean_ppl}


def _interval_columns(gap, seed_ci, example_ci, n_seeds, n_examples, n_resamples, bootstrap_seed) -> dict:
    return {
        "gap": gap,
        "seed_ci_low": seed_ci[0],
        "seed_ci_high": seed_ci[1],
        "example_ci_low": example_ci[0],
        "example_ci_high": example_ci[1],
        "n_seeds": n_seeds,
        "n_examples": n_examples,
        "n_resamples": n_resamples,
        "bootstrap_seed": bootstrap_seed,
    }


def arm_labels(frame: pd.DataFrame) -> pd.Series:
    """One arm per base: 'lora (16-bit)' or 'qlora nf4', 'qlora nf4+dq', 'qlora fp4', ..."""

    def label(row) -> str:
        if row.method == "lora":
            return "lora (16-bit)"
        return f"qlora {row.quant_type}" + ("+dq" if str(row.double_quant).lower() == "true" else "")

    return frame.apply(label, axis=1) if len(frame) else pd.Series(dtype=str)


def setting_labels(frame: pd.DataFrame, keys: list[str] = SETTING_KEYS) -> pd.Series:
    """What a setting varies in (seed and arm aside): e.g. 'target_modules=qv, learning_rate=0.0002'."""
    varying = [k for k in keys if frame[k].nunique() > 1]
    if frame.empty:
        return pd.Series(dtype=str)
    if not varying:
        return pd.Series("all cells", index=frame.index)
    return frame.apply(
        lambda row: ", ".join(f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in varying),
        axis=1,
    )
