"""The study's report: one self-contained HTML file (figures embedded) built from the tidy
tables and figures alone, answering how much memory QLoRA saves, what it costs in quality
and speed, and how faithful merging is.

    python scripts/report.py --tables results/tables --figures results/figures \\
        --config config/config.yaml --out results/report/report.html

Headline numbers carry element ids (``memory-saved-gib``, ...) so tests can check them.
"""

import argparse
import base64
import html
import json
import math
import statistics
import time
from pathlib import Path

import pandas as pd
import yaml

import downstream_report
from grid import GRID_COLUMNS
from runtime import log_arguments, setup_logging, write_manifest

# Two-sided 95 % Student t quantiles by degrees of freedom (beyond 30: the normal 1.96).
T_975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
FIGURE_CAPTIONS = {
    "memory": "Peak memory by method: after loading the weights and during training.",
    "perplexity": "Perplexity of adapters (on their training base) and merged models, 95 % interval across cells.",
    "loss_curves": "Training loss per step, one line per cell.",
    "throughput": "Training tokens per second: whole run and median step.",
    "quality_vs_memory": "Held-out answer perplexity against training peak memory.",
}
DATASETS = ["eval_chat_assistant", "eval_chat", "wikitext"]


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % t-interval (None with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def headline(runs: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """The numbers the report opens with, all from paired LoRA/QLoRA runs."""
    numbers = {
        "pairs": len(pairs),
        "seeds": int(runs.seed.nunique()),
        "memory_measure": ", ".join(sorted(runs.memory_measure.unique())),
    }
    saved = pairs.lora_train_peak_gib - pairs.qlora_train_peak_gib
    numbers["memory_saved_gib"] = float(saved.mean())
    numbers["memory_saved_pct"] = float((saved / pairs.lora_train_peak_gib).mean() * 100)
    weights_saved = pairs.lora_weights_gib - pairs.qlora_weights_gib
    numbers["weights_saved_gib"] = float(weights_saved.mean())
    numbers["weights_saved_pct"] = float((weights_saved / pairs.lora_weights_gib).mean() * 100)
    numbers["speed_ratio"] = float((pairs.qlora_tokens_per_second / pairs.lora_tokens_per_second).mean())
    # Quality: per setting (everything but the seed), the mean paired difference across seeds.
    settings = [c for c in pairs.columns if c in GRID_COLUMNS and c != "seed"]
    numbers["quality"] = []
    for values, group in pairs.groupby(settings, sort=True):
        label = ", ".join(f"{k}={v}" for k, v in zip(settings, values, strict=True) if pairs[k].nunique() > 1)
        row = {"setting": label or "all cells", "seeds": len(group)}
        for kind in ("adapter", "merged"):
            for dataset in DATASETS:
                row[f"{kind}_{dataset}"] = mean_interval(list(group[f"diff_ppl_{kind}_{dataset}"]))
        numbers["quality"].append(row)
    numbers["merge_max_abs_logit_diff"] = float(runs.merge_max_abs_logit_diff.max())
    gap = runs.loc[runs.method == "qlora", "merge_gap_rel_ppl"].dropna()
    numbers["merge_gap_pct"] = float(gap.mean() * 100) if len(gap) else None
    return numbers


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def interval_text(mean: float, half: float | None) -> str:
    return f"{mean:+.3f}" + (f" (95 % CI ± {half:.3f})" if half is not None else " (one seed: no interval)")


def table_html(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(
        index=False, table_id=table_id, classes="data", float_format=lambda v: f"{v:.4g}", na_rep="", escape=True
    )


def figure_html(name: str, png: Path) -> str:
    encoded = base64.b64encode(Path(png).read_bytes()).decode()
    return (
        f'<figure id="figure-{name}"><img alt="{name}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>"
    )


def render(runs, pairs, perplexity, samples, environment, figures: dict[str, Path], config_text: str) -> str:
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
        for i, row in enumerate(n["quality"])
    )
    headline_quality = "<br>".join(
        f"{html.escape(row['setting'])}: <span id='quality-cost-{i}'>{interval_text(*row['adapter_eval_chat_assistant'])}</span>"
        for i, row in enumerate(n["quality"])
    )
    summary = runs[
        [
            "method",
            "learning_rate",
            "seed",
            "train_peak_gib",
            "weights_gib",
            "tokens_per_second",
            "final_train_loss",
            "ppl_adapter_eval_chat_assistant",
            "ppl_merged_eval_chat_assistant",
            "merge_max_abs_logit_diff",
        ]
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>LoRA vs QLoRA report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table.data{border-collapse:collapse;font-size:.8em}table.data td,table.data th{border:1px solid #ccc;"
        "padding:2px 6px}figure{margin:1em 0}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        ".headline td{padding:4px 10px}</style></head><body>",
        "<h1>LoRA vs QLoRA: what does the 4-bit base cost?</h1>",
        f"<p>{len(runs)} training runs ({n['pairs']} LoRA/QLoRA pairs, {n['seeds']} seed(s)) on "
        f"{html.escape(', '.join(environment['devices']))}. Memory measure: {html.escape(n['memory_measure'])}.</p>",
        "<h2>Answers</h2><table class='headline'>",
        f"<tr><th>Memory QLoRA saves (training peak)</th><td><span id='memory-saved-gib'>{fmt(n['memory_saved_gib'])}</span> GiB"
        f" (<span id='memory-saved-pct'>{fmt(n['memory_saved_pct'], 1)}</span> %)</td></tr>",
        f"<tr><th>Memory QLoRA saves (weights)</th><td><span id='weights-saved-gib'>{fmt(n['weights_saved_gib'])}</span> GiB"
        f" (<span id='weights-saved-pct'>{fmt(n['weights_saved_pct'], 1)}</span> %)</td></tr>",
        f"<tr><th>Quality cost (held-out answers, adapter; QLoRA − LoRA perplexity, paired by seed)</th>"
        f"<td>{headline_quality}</td></tr>",
        f"<tr><th>Speed (QLoRA / LoRA tokens/s)</th><td><span id='speed-ratio'>{fmt(n['speed_ratio'])}</span>×</td></tr>",
        f"<tr><th>Merge faithfulness (max |logit diff|, merged vs base+adapter)</th>"
        f"<td><span id='merge-max-diff'>{n['merge_max_abs_logit_diff']:.3g}</span>; QLoRA merge gap (4-bit+adapter → merged 16-bit"
        f" perplexity): <span id='merge-gap-pct'>{fmt(n['merge_gap_pct'], 2)}</span> %</td></tr></table>",
        "<h3>Perplexity difference QLoRA − LoRA (mean over seeds, 95 % t-interval across seeds)</h3>"
        f"<table class='data' id='quality'><tr><th>setting</th><th>seeds</th>{quality_header}</tr>{quality_rows}</table>",
        "<h2>Figures</h2>",
        *(figure_html(name, path) for name, path in figures.items()),
        "<h2>Runs</h2>",
        table_html(summary, "runs-summary"),
        "<details><summary>All columns of runs.csv</summary>",
        table_html(runs, "runs"),
        "</details>",
        "<h2>Perplexity</h2>",
        table_html(perplexity, "perplexity"),
        "<h2>Generation samples</h2>",
        table_html(samples, "samples"),
        "<h2>Configuration</h2><pre id='config'>",
        html.escape(config_text),
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
        pd.read_csv(tables_dir / "perplexity.csv"),
        pd.read_csv(tables_dir / "samples.csv"),
        json.loads((tables_dir / "environment.json").read_text()),
        figures,
        yaml.safe_dump(config, sort_keys=False),
    )
    page = downstream_report.add_to_report(page, tables_dir, config)  # evaluate.lm_eval; nothing when off
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(page)
    numbers = headline(runs, pairs)
    logger.info(
        "report -> %s (memory saved %.3f GiB, speed ratio %.3f)",
        out_path,
        numbers["memory_saved_gib"],
        numbers["speed_ratio"],
    )
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
    main(a.tables, {p.stem: p for p in sorted(a.figures.glob("*.png"))}, yaml.safe_load(a.config.read_text()), a.out)
