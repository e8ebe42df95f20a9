"""Downstream scores (lm-eval) in the tidy tables, the LoRA − QLoRA difference, a figure and
the report's section. Only when ``evaluate.lm_eval`` is enabled (rules/downstream.smk).

    python scripts/downstream_report.py --tables results/tables --figures results/figures

- ``tables/downstream.csv``: every model's rows (scripts/downstream.py), one per task and metric;
- ``tables/downstream_diff.csv``: for adapters and merged models, LoRA − QLoRA of each metric,
  paired like tables/pairs.csv (same rank, alpha, dropout, targets, learning rate, seed),
  averaged over seeds with a 95 % t-interval across seeds (none with one seed);
- ``figures/downstream.png``: those differences with their intervals.
"""

import argparse
import html
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from grid import GRID_COLUMNS  # noqa: E402
from runtime import log_arguments, setup_logging, write_manifest  # noqa: E402

PAIR_KEYS = [c for c in GRID_COLUMNS if c not in ("method", "quant_type", "double_quant")]
METRIC_KEYS = ["model_kind", "task", "metric", "filter"]


def downstream_table(paths: list[Path]) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def diff_table(scores: pd.DataFrame) -> pd.DataFrame:
    """LoRA − QLoRA per task and metric, per setting, mean over seeds with its interval."""
    from report import mean_interval  # report.py imports this module

    trained = scores[scores.model_kind.isin(["adapter", "merged"])]
    lora = trained[trained.method == "lora"].set_index([*METRIC_KEYS, *PAIR_KEYS])["value"]
    pairs = []
    for row in trained[trained.method == "qlora"].itertuples(index=False):
        key = tuple(getattr(row, k) for k in [*METRIC_KEYS, *PAIR_KEYS])
        if key in lora.index:
            pairs.append({**row._asdict(), "lora": float(lora.loc[key]), "qlora": row.value})
    if not pairs:
        return pd.DataFrame(columns=[*METRIC_KEYS, "seeds", "lora_mean", "qlora_mean", "diff_mean", "diff_ci95"])
    pairs = pd.DataFrame(pairs)
    pairs["diff"] = pairs["lora"] - pairs["qlora"]
    settings = [c for c in PAIR_KEYS if c != "seed"] + ["quant_type", "double_quant"]
    rows = []
    for values, group in pairs.groupby([*METRIC_KEYS, *settings], sort=True, dropna=False):
        mean, half = mean_interval(list(group["diff"]))
        half = math.nan if half is None else half
        rows.append(
            {
                **dict(zip([*METRIC_KEYS, *settings], values, strict=True)),
                "seeds": len(group),
                "lora_mean": group["lora"].mean(),
                "qlora_mean": group["qlora"].mean(),
                "diff_mean": mean,
                "diff_ci95": half,
            }
        )
    return pd.DataFrame(rows)


def setting_label(diff: pd.DataFrame) -> pd.Series:
    """The grid settings that vary across rows, as one label ("all cells" when none do)."""
    varying = [c for c in PAIR_KEYS + ["quant_type", "double_quant"] if c in diff and c != "seed"]
    varying = [c for c in varying if diff[c].nunique() > 1]
    if not varying:
        return pd.Series("all cells", index=diff.index)
    return diff[varying].astype(str).radd([f"{c}=" for c in varying]).agg(", ".join, axis=1)


def figure(diff: pd.DataFrame) -> plt.Figure:
    """LoRA − QLoRA with 95 % intervals across seeds: one panel per task metric (its own
    scale) and model kind (adapter, merged), one point per setting."""
    diff = diff.assign(label=setting_label(diff), panel=diff.task + ": " + diff.metric)
    panels, kinds = sorted(diff.panel.unique()), sorted(diff.model_kind.unique())
    height = 0.9 + 0.35 * diff.label.nunique()
    fig, axes = plt.subplots(
        max(1, len(panels)),
        max(1, len(kinds)),
        figsize=(5 * max(1, len(kinds)), height * max(1, len(panels))),
        squeeze=False,
    )
    for row, panel in enumerate(panels):
        for column, kind in enumerate(kinds):
            ax, part = axes[row][column], diff[(diff.panel == panel) & (diff.model_kind == kind)]
            positions = range(len(part))
            ax.errorbar(part.diff_mean, positions, xerr=part.diff_ci95.fillna(0), fmt="o", color=sns.color_palette()[0])
            ax.set_yticks(list(positions), list(part.label))
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set_title(f"{kind}: {panel}", fontsize=9)
            ax.set_xlabel("LoRA − QLoRA (95 % CI across seeds)" if row == len(panels) - 1 else "")
    fig.tight_layout()
    return fig


def html_section(tables_dir: Path, figure_png: Path | None) -> str:
    """The report's downstream section, or "" when tables/downstream.csv is absent (feature off)."""
    from report import figure_html, table_html

    tables_dir = Path(tables_dir)
    if not (tables_dir / "downstream.csv").is_file():
        return ""
    scores = pd.read_csv(tables_dir / "downstream.csv")
    diff = pd.read_csv(tables_dir / "downstream_diff.csv")
    parts = [
        "<h2 id='downstream'>Downstream tasks (lm-evaluation-harness)</h2>",
        f"<p>{scores.task.nunique()} task(s) on {scores.model.nunique()} model(s); few-shot seed "
        f"{html.escape(', '.join(map(str, sorted(scores.fewshot_seed.unique()))))}. "
        "LoRA − QLoRA per task and metric, mean over seeds with a 95 % t-interval across seeds:</p>",
        table_html(diff, "downstream-diff"),
    ]
    if figure_png is not None and Path(figure_png).is_file():
        parts.append(figure_html("downstream", Path(figure_png)))
    parts += ["<h3>All downstream scores</h3>", table_html(scores, "downstream")]
    return "\n".join(parts)


def add_to_report(page: str, tables_dir: Path, config: dict, figures_dir: Path | None = None) -> str:
    """The report page with the downstream section before its software section, when the
    config enables evaluate.lm_eval (tables of an earlier run never sneak in)."""
    if not ((config.get("evaluate") or {}).get("lm_eval") or {}).get("enabled"):
        return page
    figures_dir = Path(figures_dir) if figures_dir else Path(tables_dir).parent / "figures"
    section = html_section(tables_dir, figures_dir / "downstream.png")
    if not section:
        return page
    anchor = "<h2>Software and hardware</h2>"
    return (
        page.replace(anchor, section + "\n" + anchor, 1)
        if anchor in page
        else page.replace("</body>", section + "</body>")
    )


def write_tables(table_paths: list[Path], out_table: Path, out_diff: Path) -> pd.DataFrame:
    scores = downstream_table(table_paths)
    scores.to_csv(out_table, index=False)
    diff = diff_table(scores)
    diff.to_csv(out_diff, index=False)
    return diff


def write_figure(diff_csv: Path, out_png: Path, out_svg: Path) -> None:
    fig = figure(pd.read_csv(diff_csv))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata (as figures.py): the same tables give byte-identical files.
    fig.savefig(out_png, dpi=120, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(out_svg, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


def _from_snakemake(smk) -> None:
    started = time.time()
    logger = setup_logging(smk.log[0], smk.rule)
    log_arguments(logger, inputs=list(smk.input), outputs=list(smk.output))
    if smk.rule == "downstream_table":
        diff = write_tables([Path(p) for p in smk.input.tables], Path(smk.output.table), Path(smk.output.diff))
        logger.info("%d LoRA − QLoRA rows -> %s", len(diff), smk.output.diff)
    else:
        write_figure(Path(smk.input.diff), Path(smk.output.png), Path(smk.output.svg))
    write_manifest(smk, smk.rule, started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=Path, required=True, help="results/tables (downstream_diff.csv)")
    parser.add_argument("--figures", type=Path, required=True)
    a = parser.parse_args()
    write_figure(a.tables / "downstream_diff.csv", a.figures / "downstream.png", a.figures / "downstream.svg")
