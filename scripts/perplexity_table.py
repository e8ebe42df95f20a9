"""Combine the per-model perplexity CSVs into results/tables/perplexity.csv (one row per
evaluated model and data set: model kind, the cell's hyperparameters, seed, data set,
tokens, mean nll, perplexity) and their per-example companions into
results/tables/perplexity_examples.csv (one row per model, data set and held-out example:
tokens and summed nll; the eval-set intervals are drawn from it)."""

import argparse
import time
from pathlib import Path

import pandas as pd

from runtime import log_arguments, setup_logging, write_manifest


def combine(paths: list[Path], order: list[str]) -> pd.DataFrame:
    combined = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    combined["model_kind"] = pd.Categorical(combined["model_kind"], ["base", "adapter", "merged"], ordered=True)
    return combined.sort_values(order)


def main(
    tables: list[Path], out_path: Path, log_path: Path | None = None, out_examples: Path | None = None
) -> pd.DataFrame:
    logger = setup_logging(log_path, "perplexity_table")
    log_arguments(logger, tables=tables, out_path=out_path, out_examples=out_examples)
    combined = combine(tables, ["model_kind", "model", "dataset"])
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    combined.to_csv(out_path, index=False)
    logger.info("%d rows from %d models -> %s", len(combined), len(tables), out_path)
    if out_examples:
        examples = combine([example_table(p) for p in tables], ["model_kind", "model", "dataset", "example"])
        examples.to_csv(out_examples, index=False)
        logger.info("%d per-example rows -> %s", len(examples), out_examples)
    return combined


def example_table(table: Path) -> Path:
    """The per-example companion of one evaluation CSV (perplexity.py writes both)."""
    return Path(table).with_name(Path(table).name.removesuffix(".csv") + ".examples.csv")


def _from_snakemake(smk) -> None:
    started = time.time()
    main([Path(p) for p in smk.input.tables], Path(smk.output.table), Path(smk.log[0]), Path(smk.output.examples))
    write_manifest(smk, "perplexity_table", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tables", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--out-examples", type=Path, help="also combine the *.examples.csv beside each table")
    a = parser.parse_args()
    main(a.tables, a.out, out_examples=a.out_examples)
