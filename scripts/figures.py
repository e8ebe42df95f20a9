"""Seaborn figures of the study, drawn from the tidy tables alone (no model, no GPU).

    python scripts/figures.py --figure memory --tables results/tables --out results/figures

Figures: ``memory`` (weights, training peak and optimizer state per arm), ``perplexity``
(per setting and arm, 95 % intervals across the seeds of one setting, base models' levels
as dashed lines), ``loss_curves``, ``throughput`` (tokens/s per arm and setting),
``quality_vs_memory`` (perplexity against the training memory measure).

An arm is one base: ``lora (16-bit)`` or ``qlora <quant_type>[+dq]``. A setting is everything
but the seed and the arm: intervals never pool settings (learning rates, targets, ...).
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
from statistics_tables import arm_labels, seed_interval, setting_labels, training_base  # noqa: E402

BASE_LINE_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
DATASET_LABELS = {
    "eval_chat": "held-out chat (all tokens)",
    "eval_chat_assistant": "held-out chat (answers)",
    "wikitext": "WikiText-2 test",
}


def seed_errorbar(values: pd.Series) -> tuple[float, float]:
    """The report's seed interval (95 % t across seeds), not a random bootstrap: deterministic."""
    _, low, high = seed_interval(list(values))
    return (low, high) if low == low else (float(values.iloc[0]), float(values.iloc[0]))


def arms(runs: pd.DataFrame) -> pd.DataFrame:
    """runs with an ``arm`` and a ``setting`` column (labels shared with the report)."""
    return runs.assign(arm=arm_labels(runs), setting=setting_labels(runs))


def palette(frame: pd.DataFrame) -> dict[str, tuple]:
    """A fixed colour per arm: lora first, then the qlora arms sorted."""
    order = sorted(frame.arm.unique(), key=lambda arm: (not arm.startswith("lora"), arm))
    return dict(zip(order, sns.color_palette("deep", len(order)), strict=True))


def memory_label(runs: pd.DataFrame) -> str:
    if (runs.memory_measure == "gpu_train_peak").all():
        return "GPU memory (GiB)"
    return "CPU run: footprint, training-phase peak RSS (GiB)"


def memory(runs: pd.DataFrame, curves: pd.DataFrame, perplexity_table: pd.DataFrame) -> plt.Figure:
    frame = arms(runs)
    phases = {"weights_gib": "weights (after load)", "train_peak_gib": "training peak", "optimizer_state_gib": ""}
    phases["optimizer_state_gib"] = "optimizer state" + (
        " (paged: not in the peak)" if frame.optimizer_paged.any() else ""
    )
    long = frame.melt(id_vars=["arm", "setting"], value_vars=list(phases), var_name="phase", value_name="GiB")
    long["phase"] = long["phase"].map(phases)
    grid = sns.catplot(
        data=long,
        x="arm",
        y="GiB",
        hue="phase",
        col="setting",
        kind="bar",
        order=list(palette(frame)),
        height=4,
        aspect=1.3,
        errorbar=("pi", 100),
    )
    grid.set_axis_labels("arm", memory_label(runs))
    grid.set_titles("{col_name}")
    grid.figure.suptitle("Memory per arm (bars: mean over seeds, whiskers: min to max)", y=1.03)
    return grid.figure


def base_levels(axis, frame: pd.DataFrame, perplexity_table: pd.DataFrame, dataset: str, colours: dict) -> None:
    """Each base model's perplexity on this data set as a line: the 16-bit base in the lora
    colour, each 4-bit base in its qlora arm's colour."""
    bases = perplexity_table[(perplexity_table.model_kind == "base") & (perplexity_table.dataset == dataset)]
    base_arms = {training_base("lora", "none", False): "lora (16-bit)"}
    for (quant_type, double_quant), _ in frame[frame.method == "qlora"].groupby(["quant_type", "double_quant"]):
        row = pd.DataFrame([{"method": "qlora", "quant_type": quant_type, "double_quant": double_quant}])
        base_arms[training_base("qlora", quant_type, double_quant)] = arm_labels(row).iloc[0]
    for style, (base, arm) in zip(BASE_LINE_STYLES * 4, base_arms.items(), strict=False):
        level = bases[bases.model == base].perplexity
        if len(level):
            axis.axhline(float(level.iloc[0]), color=colours.get(arm, "grey"), linestyle=style, linewidth=1)
            axis.annotate(
                base, (0.01, float(level.iloc[0])), xycoords=("axes fraction", "data"), fontsize=6, va="bottom"
            )


def perplexity(runs: pd.DataFrame, curves: pd.DataFrame, perplexity_table: pd.DataFrame) -> plt.Figure:
    frame = arms(runs)
    columns = [c for c in runs.columns if c.startswith("ppl_")]
    long = frame.melt(
        id_vars=["arm", "setting", "seed"], value_vars=columns, var_name="measure", value_name="perplexity"
    )
    long["model"] = long["measure"].str.extract(r"ppl_(adapter|merged)_")[0]
    long["dataset"] = long["measure"].str.replace(r"ppl_(adapter|merged)_", "", regex=True)
    colours = palette(frame)
    grid = sns.catplot(
        data=long,
        x="setting",
        y="perplexity",
        hue="arm",
        col="dataset",
        row="model",
        kind="point",
        hue_order=list(colours),
        col_order=[d for d in DATASET_LABELS if d in set(long.dataset)],
        palette=colours,
        errorbar=seed_errorbar,
        dodge=0.4 if len(colours) > 1 else False,  # seaborn divides the dodge among the arms: one arm, none
        linestyle="none",
        sharey=False,
        height=3.2,
        aspect=1.3,
    )
    for (model, dataset), axis in grid.axes_dict.items():
        base_levels(axis, frame, perplexity_table, dataset, colours)
        axis.set_title(f"{model} | {DATASET_LABELS.get(dataset, dataset)}")
        axis.tick_params(axis="x", labelrotation=20, labelsize=7)
    grid.figure.suptitle(
        "Perplexity per setting and arm (95 % interval across seeds of one setting; dashed: base models)", y=1.02
    )
    return grid.figure


def loss_curves(runs: pd.DataFrame, curves: pd.DataFrame, perplexity_table: pd.DataFrame) -> plt.Figure:
    frame = arms(curves)
    grid = sns.relplot(
        data=frame,
        x="step",
        y="loss",
        hue="arm",
        style="seed",
        col="setting",
        kind="line",
        hue_order=list(palette(frame)),
        palette=palette(frame),
        height=3.5,
        aspect=1.2,
        estimator=None,
        units="cell",
    )
    grid.set_titles("{col_name}")
    grid.figure.suptitle("Training loss", y=1.03)
    return grid.figure


def throughput(runs: pd.DataFrame, curves: pd.DataFrame, perplexity_table: pd.DataFrame) -> plt.Figure:
    frame = arms(runs)
    measures = {"tokens_per_second": "whole train() call", "steady_tokens_per_second": "after warm-up"}
    long = frame.melt(id_vars=["arm", "setting"], value_vars=list(measures), var_name="measure", value_name="tokens/s")
    long["measure"] = long["measure"].map(measures)
    grid = sns.catplot(
        data=long,
        x="arm",
        y="tokens/s",
        hue="measure",
        col="setting",
        kind="bar",
        order=list(palette(frame)),
        errorbar=seed_errorbar,
        height=4,
        aspect=1.3,
    )
    grid.set_titles("{col_name}")
    device = ", ".join(sorted(runs.device.unique()))
    grid.figure.suptitle(f"Training throughput ({device}; 95 % interval across seeds of one setting)", y=1.03)
    return grid.figure


def quality_vs_memory(runs: pd.DataFrame, curves: pd.DataFrame, perplexity_table: pd.DataFrame) -> plt.Figure:
    frame = arms(runs)
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    sns.scatterplot(
        data=frame,
        x="train_peak_gib",
        y="ppl_adapter_eval_chat_assistant",
        hue="arm",
        style="setting",
        hue_order=list(palette(frame)),
        palette=palette(frame),
        s=80,
        ax=axis,
    )
    axis.set_xlabel(memory_label(runs))
    base_levels(axis, frame, perplexity_table, "eval_chat_assistant", palette(frame))
    axis.set_ylabel("perplexity, held-out answers (adapter; lines: bases)")
    axis.set_title("Quality vs memory")
    return figure


FIGURES = {f.__name__: f for f in (memory, perplexity, loss_curves, throughput, quality_vs_memory)}


def main(
    figure: str,
    runs_csv: Path,
    loss_curves_csv: Path,
    perplexity_csv: Path,
    out_png: Path,
    out_svg: Path,
    log_path: Path | None = None,
) -> None:
    logger = setup_logging(log_path, "figures")
    log_arguments(
        logger, figure=figure, runs_csv=runs_csv, loss_curves_csv=loss_curves_csv, perplexity_csv=perplexity_csv
    )
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams["svg.hashsalt"] = "qlora-snakemake"  # fixed SVG element ids: the same tables give the same bytes
    drawn = FIGURES[figure](pd.read_csv(runs_csv), pd.read_csv(loss_curves_csv), pd.read_csv(perplexity_csv))
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
        Path(smk.input.perplexity),
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
    parser.add_argument(
        "--tables", type=Path, required=True, help="folder with runs.csv, loss_curves.csv, perplexity.csv"
    )
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    for name in a.figure or sorted(FIGURES):
        tables = [a.tables / "runs.csv", a.tables / "loss_curves.csv", a.tables / "perplexity.csv"]
        main(name, *tables, a.out / f"{name}.png", a.out / f"{name}.svg")
