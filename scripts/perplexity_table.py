"""Combine the per-model perplexity CSVs into results/tables/perplexity.csv (one row per
evaluated model and data set: model kind, the cell's hyperparameters, seed, data set,
tokens, mean nll, perplexity)."""

import argparse
import time
from pathlib import Path

import pandas as pd

from runtime import log_arguments, setup_logging, write_manifest


def main(tables: list[Path], out_path: Path, log_path: Path | None = None) -> pd.DataFrame:
    logger = setup_logging(log_path, "perplexity_table")
    log_arguments(logger, tables=tables, out_path=out_path)
    combined = pd.concat([pd.read_csv(path) for path in tables], ignore_index=True)
    combined["model_kind"] = pd.Categorical(combined["model_kind"], ["base", "adapter", "merged"], ordered=True)
    combined = combined.sort_values(["model_kind", "model", "dataset"])
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    combined.to_csv(out_path, index=False)
    logger.info("%d rows from %d models -> %s", len(combined), len(tables), out_path)
    return combined


def _from_snakemake(smk) -> None:
    started = time.time()
    main([Path(p) for p in smk.input.tables], Path(smk.output.table), Path(smk.log[0]))
    write_manifest(smk, "perplexity_table", started)


if "snakemake" in globals():  # run by Snakemake's script directive
    _from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tables", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    main(a.tables, a.out)
