"""The study's report: one self-contained HTML file (figures embedded) built from the tidy
tables and figures alone, answering how much memory QLoRA saves, what it costs in quality
(with a seed interval and an eval-set interval, named as such) and speed, what the 4-bit
data types cost, and how faithful merging is. Sections: ``report_sections.py``.

    python scripts/report.py --tables results/tables --figures results/figures \\
        --config config/config.yaml --out results/report/report.html

Headline numbers carry element ids (``memory-saved-gib``, ``quality-cost-0``, ...) so tests can
check them; ``memory-saved-*`` exist on a GPU study only (a CPU's RSS is no such measure).
"""

import argparse
import base64
import html
import json
import time
from pathlib import Path

import pandas as pd
import yaml

import downstream_report
from report_sections import (
    fmt,
    gaps_section,
    memory_measure_text,
    memory_speed_section,
    quality_headline,
    quantisation_section,
    table_html,
)
from runtime import log_arguments, setup_logging, write_manifest
from statistics_tables import SETTING_KEYS, arm_labels, mean_interval, setting_labels

FIGURE_CAPTIONS = {
    "memory": "Memory per arm: weights after loading, training peak (the memory measure) and optimizer state.",
    "perplexity": "Perplexity of adapters (on their training base) and merged models per setting and arm, 95 % "
    "interval across the seeds of one setting (fixed eval set); dashed lines: each base model's level.",
    "loss_curves": "Training loss per step, one line per cell, one panel per setting.",
    "throughput": "Training tokens per second per arm and setting: whole train() call, and total tokens over "
    "total time after the warm-up steps.",
    "quality_vs_memory": "Held-out answer perplexity against the training memory measure, per arm and setting.",
}
DATASETS = ["eval_chat_assistant", "eval_chat", "wikitext"]


def headline(runs: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """The numbers the report opens with, per pair setting (never pooled across settings)."""
    gpu = bool((runs.memory_measure == "gpu_train_peak").all())
    numbers = {
        "pairs": len(pairs),
        "seeds": int(runs.seed.nunique()),
        "gpu": gpu,
        "memory_measure": ", ".join(sorted(runs.memory_measure.unique())),
        "settings": [],
    }
    if pairs.empty:
        pairs = pd.DataFrame(columns=SETTING_KEYS + ["quant_type", "double_quant"])
    keys = SETTING_KEYS + ["quant_type", "double_quant"]
    labels = arm_labels(pairs.assign(method="qlora")) + " vs lora, " + setting_labels(pairs)
    for _, group in pairs.groupby(keys, sort=True):
        row = {"setting": labels[group.index[0]], "seeds": len(group)}
        if gpu:  # a CPU's RSS says nothing of what a GPU would need: no savings headline there
            saved = group.lora_train_peak_gib - group.qlora_train_peak_gib
            row["memory_saved_gib"] = float(saved.mean())
            row["memory_saved_pct"] = float((saved / group.lora_train_peak_gib).mean() * 100)
        weights_saved = group.lora_weights_gib - group.qlora_weights_gib
        row["weights_saved_gib"] = float(weights_saved.mean())
        row["weights_saved_pct"] = float((weights_saved / group.lora_weights_gib).mean() * 100)
        row["speed_ratio"] = float((group.qlora_tokens_per_second / group.lora_tokens_per_second).mean())
        steady = group.qlora_steady_tokens_per_second / group.lora_steady_tokens_per_second
        row["steady_speed_ratio"] = float(steady.mean())
        for kind in ("adapter", "merged"):
            for dataset in DATASETS:
                row[f"{kind}_{dataset}"] = mean_interval(list(group[f"diff_ppl_{kind}_{dataset}"]))
        numbers["settings"].append(row)
    numbers["merge_max_abs_logit_diff"] = float(runs.merge_max_abs_logit_diff.max())
    floor = runs.get("merge_precision_floor_max_abs_logit_diff", pd.Series(dtype=float)).dropna()
    numbers["merge_floor_max_abs_logit_diff"] = float(floor.max()) if len(floor) else None
    share = runs.get("merge_fold_error_share", pd.Series(dtype=float)).dropna()
    numbers["merge_fold_error_share_max"] = float(share.max()) if len(share) else None
    gap = runs.loc[runs.method == "qlora", "merge_gap_rel_ppl"].dropna()
    numbers["merge_gap_pct"] = float(gap.mean() * 100) if len(gap) else None
    return numbers


def interval_text(mean: float, half: float | None) -> str:
    return f"{mean:+.3f}" + (f" (seed 95 % CI ± {half:.3f})" if half is not None else " (one seed: no interval)")


def settings_table(n: dict) -> str:
    """Memory, weights and speed per pair setting, with ids for the tests."""
    header = "<tr><th>setting</th><th>seeds</th>"
    header += "<th>training peak QLoRA saves</th>" if n["gpu"] else ""
    header += "<th>weights QLoRA saves</th><th>QLoRA / LoRA tokens/s (whole run; after warm-up)</th></tr>"
    rows = []
    for i, row in enumerate(n["settings"]):
        cells = f"<td>{html.escape(row['setting'])}</td><td>{row['seeds']}</td>"
        if n["gpu"]:
            cells += (
                f"<td><span id='memory-saved-gib-{i}'>{fmt(row['memory_saved_gib'])}</span> GiB "
                f"(<span id='memory-saved-pct-{i}'>{fmt(row['memory_saved_pct'], 1)}</span> %)</td>"
            )
        cells += (
            f"<td><span id='weights-saved-gib-{i}'>{fmt(row['weights_saved_gib'])}</span> GiB "
            f"(<span id='weights-saved-pct-{i}'>{fmt(row['weights_saved_pct'], 1)}</span> %)</td>"
            f"<td><span id='speed-ratio-{i}'>{fmt(row['speed_ratio'])}</span>×; "
            f"<span id='steady-speed-ratio-{i}'>{fmt(row['steady_speed_ratio'])}</span>×</td>"
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class='data' id='settings'>{header}{''.join(rows)}</table>"


def figure_html(name: str, png: Path) -> str:
    encoded = base64.b64encode(Path(png).read_bytes()).decode()
    return (
        f'<figure id="figure-{name}"><img alt="{name}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>"
    )


def render(
    runs, pairs, gaps, quantisation, perplexity, samples, environment, figures: dict[str, Path], config: dict
) -> str:
    n = headline(runs, pairs)
    quality_header = "".join(f"<th>{kind}: {dataset}</th>" for kind in ("adapter", "merged") for dataset in DATASETS)
    quality_rows = "".join(
        f"<tr><td>{html.escape(row['setting'])}</td><td>{row['seeds']}</td>"
        + "".join(
            f"<td id='ppl-diff-{i}-{kind}-{dataset}'>{interval_text(*row[f'{kind}_{dataset}'])}</td>"
            for kind in ("adapter", "merged")
            for dataset in DATASETS
        )
        + "</tr>"
        for i, row in enumerate(n["settings"])
    )
    summary_columns = ["method", "target_modules", "learning_rate", "quant_type", "double_quant", "seed"]
    summary_columns += ["train_peak_gib", "optimizer_state_gib", "weights_gib", "tokens_per_second"]
    summary_columns += ["steady_tokens_per_second", "gpu_hours", "final_train_loss", "final_loss_steps"]
    summary_columns += ["ppl_adapter_eval_chat_assistant", "ppl_merged_eval_chat_assistant", "merge_max_abs_logit_diff"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>LoRA vs QLoRA report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table.data{border-collapse:collapse;font-size:.8em}table.data td,table.data th{border:1px solid #ccc;"
        "padding:2px 6px}figure{margin:1em 0}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        ".headline td{padding:4px 10px}</style></head><body>",
        "<h1>LoRA vs QLoRA: what does the 4-bit base cost?</h1>",
        f"<p>{len(runs)} training runs ({n['pairs']} LoRA/QLoRA pairs, {n['seeds']} seed(s)) on "
        f"{html.escape(', '.join(environment['devices']))}. Memory measure "
        f"(<span id='memory-measure'>{html.escape(n['memory_measure'])}</span>): "
        f"{html.escape(memory_measure_text(runs))}.</p>",
        "<h2>Answers</h2><table class='headline'>",
        "<tr><th>Quality cost (held-out answers, adapter; QLoRA − LoRA perplexity, mean over seeds)</th>"
        f"<td>{quality_headline(gaps)}</td></tr>",
        f"<tr><th>Merge faithfulness (max |logit diff|, merged vs base+adapter)</th>"
        f"<td><span id='merge-max-diff'>{n['merge_max_abs_logit_diff']:.3g}</span> (precision floor, the unmerged "
        f"model in the merge dtype vs float32: <span id='merge-floor'>{fmt(n['merge_floor_max_abs_logit_diff'], 3)}</span>;"
        f" fold error at most <span id='merge-fold-share'>{fmt(n['merge_fold_error_share_max'], 4)}</span> of the "
        f"adapter's own effect); QLoRA merge gap (4-bit+adapter → merged 16-bit"
        f" perplexity): <span id='merge-gap-pct'>{fmt(n['merge_gap_pct'], 2)}</span> %</td></tr></table>",
        "<h3>Memory and speed per pair setting</h3>",
        settings_table(n),
        gaps_section(gaps),
        "<h3>All data sets, seed intervals only (95 % t-interval across seeds on the fixed eval sets; "
        "the eval-set intervals are in the table above)</h3>"
        f"<table class='data' id='quality'><tr><th>setting</th><th>seeds</th>{quality_header}</tr>{quality_rows}</table>",
        quantisation_section(quantisation, runs, perplexity, config),
        memory_speed_section(runs),
        "<h2>Figures</h2>",
        *(figure_html(name, path) for name, path in figures.items()),
        "<h2>Runs</h2>",
        table_html(runs[summary_columns], "runs-summary"),
        "<details><summary>All columns of runs.csv</summary>",
        table_html(runs, "runs"),
        "</details>",
        "<h2>Perplexity</h2>",
        table_html(perplexity, "perplexity"),
        "<h2>Generation samples</h2>",
        table_html(samples, "samples"),
        "<h2>Configuration</h2><pre id='config'>",
        html.escape(yaml.safe_dump(config, sort_keys=False)),
        "</pre>",
        "<h2>Software and hardware</h2><pre id='environment'>",
        html.escape(json.dumps(environment, indent=2)),
        "</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def main(
    tables_dir: Path, figures: dict[str, Path], config: dict, out_path: Path, log_path: Path | None = None
) -> dict:
    logger = setup_logging(log_path, "report")
    log_arguments(logger, tables_dir=tables_dir, figures=figures, out_path=out_path)
    tables_dir = Path(tables_dir)
    runs, pairs = pd.read_csv(tables_dir / "runs.csv"), pd.read_csv(tables_dir / "pairs.csv")
    page = render(
        runs,
        pairs,
        pd.read_csv(tables_dir / "gaps.csv"),
        pd.read_csv(tables_dir / "quantisation.csv"),
        pd.read_csv(tables_dir / "perplexity.csv"),
        pd.read_csv(tables_dir / "samples.csv"),
        json.loads((tables_dir / "environment.json").read_text()),
        figures,
        config,
    )
    page = downstream_report.add_to_report(page, tables_dir, config)  # evaluate.lm_eval; nothing when off
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(page)
    numbers = headline(runs, pairs)
    logger.info("report -> %s (%d pair settings)", out_path, len(numbers["settings"]))
    return numbers


def _from_snakemake(smk) -> None:
    started = time.time()
    figure_paths = {Path(p).stem: Path(p) for p in smk.input.figures}
    main(Path(smk.input.runs).parent, figure_paths, smk.params.config, Path(smk.output.html), Path(smk.log[0]))
    write_manifest(smk, "report", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    from figures import FIGURES  # the report rule's order (rules/common.smk), so the page is the same bytes

    pngs = {name: a.figures / f"{name}.png" for name in FIGURES if (a.figures / f"{name}.png").is_file()}
    main(a.tables, pngs, yaml.safe_load(a.config.read_text()), a.out)
