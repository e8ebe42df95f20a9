"""Seaborn figures of the study, drawn from the tidy tables alone (no model, no GPU).

    python scripts/figures.py --figure memory --tables results/tables --out results/figures

Figures: ``memory`` (weights vs training peak by method), ``perplexity`` (by method and
rank, 95 % intervals across seeds), ``loss_curves``, ``throughput`` (tokens/s by method),
``quality_vs_memory`` (perplexity against training peak memory).
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from runtime import log_arguments, setup_logging, write_manifest  # noqa: E402

METHOD_ORDER = ["lora", "qlora"]
PALETTE = {"lora": "#4C72B0", "qlora": "#DD8452"}
DATASET_LABELS = {
    "eval_chat": "held-out chat (all tokens)",
    "eval_chat_assistant": "held-out chat (answers)",
    "wikitext": "WikiText-2 test",
}


def memory_label(runs: pd.DataFrame) -> str:
    if (runs.memory_measure == "gpu_train_peak").all():
        return "GPU peak allocated (GiB)"
    return "CPU run: footprint and process peak RSS (GiB)"


def memory(runs: pd.DataFrame, curves: pd.DataFrame) -> plt.Figure:
    long = runs.melt(
        id_vars=["method"], value_vars=["weights_gib", "train_peak_gib"], var_name="phase", value_name="GiB"
    )
    long["phase"] = long["phase"].map({"weights_gib": "weights (after load)", "train_peak_gib": "training peak"})
    grid = sns.catplot(
        data=long,
        x="method",
        y="GiB",
        hue="phase",
        kind="bar",
        order=METHOD_ORDER,
        height=4,
        aspect=1.3,
        errorbar=("pi", 100),
    )
    grid.set_axis_labels("method", memory_label(runs))
    grid.figure.suptitle("Peak memory by method", y=1.02)
    return grid.figure


def perplexity(runs: pd.DataFrame, curves: pd.DataFrame) -> plt.Figure:
    columns = [c for c in runs.columns if c.startswith("ppl_")]
    long = runs.melt(
        id_vars=["method", "lora_r", "seed", "learning_rate"],
        value_vars=columns,
        var_name="measure",
        value_name="perplexity",
    )
    long["model"] = long["measure"].str.extract(r"ppl_(adapter|merged)_")[0]
    long["dataset"] = long["measure"].str.replace(r"ppl_(adapter|merged)_", "", regex=True).map(DATASET_LABELS)
    long["rank"] = "r=" + long["lora_r"].astype(str)
    grid = sns.catplot(
        data=long,
        x="rank",
        y="perplexity",
        hue="method",
        col="dataset",
        row="model",
        kind="point",
        hue_order=METHOD_ORDER,
        palette=PALETTE,
        errorbar=("ci", 95),
        dodge=0.3,
        sharey=False,
        height=3,
        aspect=1.1,
    )
    grid.set_titles("{row_name} | {col_name}")
    grid.figure.suptitle("Perplexity by method and rank (95 % interval across seeds and cells)", y=1.02)
    return grid.figure


def loss_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> plt.Figure:
    curves = curves.assign(peak_lr=curves["learning_rate"].map("peak lr {:g}".format))
    grid = sns.relplot(
        data=curves,
        x="step",
        y="loss",
        hue="method",
        style="seed",
        col="peak_lr",
        kind="line",
        hue_order=METHOD_ORDER,
        palette=PALETTE,
        height=3.5,
        aspect=1.2,
        estimator=None,
        units="cell",
    )
    grid.set_titles("{col_name}")
    grid.figure.suptitle("Training loss", y=1.03)
    return grid.figure


def throughput(runs: pd.DataFrame, curves: pd.DataFrame) -> plt.Figure:
    long = runs.melt(
        id_vars=["method"],
        value_vars=["tokens_per_second", "steady_tokens_per_second"],
        var_name="measure",
        value_name="tokens/s",
    )
    long["measure"] = long["measure"].map({"tokens_per_second": "whole run", "steady_tokens_per_second": "median step"})
    figure, axis = plt.subplots(figsize=(5.5, 4))
    sns.barplot(data=long, x="method", y="tokens/s", hue="measure", order=METHOD_ORDER, errorbar=("ci", 95), ax=axis)
    axis.set_title(f"Training throughput ({', '.join(sorted(runs.device.unique()))})")
    return figure


def quality_vs_memory(runs: pd.DataFrame, curves: pd.DataFrame) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(5.5, 4))
    sns.scatterplot(
        data=runs,
        x="train_peak_gib",
        y="ppl_adapter_eval_chat_assistant",
        hue="method",
        style="learning_rate",
        hue_order=METHOD_ORDER,
        palette=PALETTE,
        s=80,
        ax=axis,
    )
    axis.set_xlabel(memory_label(runs))
    axis.set_ylabel("perplexity, held-out answers (adapter)")
    axis.set_title("Quality vs memory")
    return figure


FIGURES = {f.__name__: f for f in (memory, perplexity, loss_curves, throughput, quality_vs_memory)}


def main(
    figure: str, runs_csv: Path, loss_curves_csv: Path, out_png: Path, out_svg: Path, log_path: Path | None = None
) -> None:
    logger = setup_logging(log_path, "figures")
    log_arguments(logger, figure=figure, runs_csv=runs_csv, loss_curves_csv=loss_curves_csv, out_png=out_png)
    sns.set_theme(style="whitegrid", context="notebook")
    drawn = FIGURES[figure](pd.read_csv(runs_csv), pd.read_csv(loss_curves_csv))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: the same tables give byte-identical files.
    drawn.savefig(out_png, dpi=120, bbox_inches="tight", metadata={"Software": None})
    drawn.savefig(out_svg, bbox_inches="tight", metadata={"Date": None})
    plt.close(drawn)
    logger.info("%s -> %s, %s", figure, out_png, out_svg)


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        smk.wildcards.figure,
        Path(smk.input.runs),
        Path(smk.input.loss_curves),
        Path(smk.output.png),
        Path(smk.output.svg),
        Path(smk.log[0]),
    )
    write_manifest(smk, "figure", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figure", choices=sorted(FIGURES), action="append", help="default: all")
    parser.add_argument("--tables", type=Path, required=True, help="folder with runs.csv and loss_curves.csv")
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    for name in a.figure or sorted(FIGURES):
        main(name, a.tables / "runs.csv", a.tables / "loss_curves.csv", a.out / f"{name}.png", a.out / f"{name}.svg")
