"""The training grid as a table: one row per training job.

Every combination of the config's ``grid`` lists is one row, except those matching an
entry of ``grid.exclude``. Quantisation settings mean
nothing for the 16-bit ``lora`` arm, so its rows carry ``quant_type: none`` and
``double_quant: False`` and duplicates are collapsed: the two arms differ only in the
base model's precision.
"""

import itertools

import pandas as pd

GRID_COLUMNS = [
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "quant_type",
    "double_quant",
    "seed",
]
# What the LoRA initialisation depends on: both arms of one seed load the same initial adapter.
INIT_COLUMNS = ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "seed"]


def grid_table(grid: dict) -> pd.DataFrame:
    rows = []
    for values in itertools.product(*(grid[column] for column in GRID_COLUMNS)):
        row = dict(zip(GRID_COLUMNS, values, strict=True))
        if row["method"] == "lora":
            row.update(quant_type="none", double_quant=False)
        rows.append(row)
    for entry in grid.get("exclude") or []:
        matching = [r for r in rows if all(r[k] == v for k, v in entry.items())]
        if not matching:
            raise ValueError(f"config key 'grid.exclude': {entry} matches no grid row")
        rows = [r for r in rows if r not in matching]
    table = pd.DataFrame(rows, columns=GRID_COLUMNS).drop_duplicates(ignore_index=True)
    return table.astype(
        {
            "lora_r": int,
            "lora_alpha": float,
            "lora_dropout": float,
            "learning_rate": float,
            "double_quant": bool,
            "seed": int,
        }
    )


def base_model_names(table: pd.DataFrame) -> list[str]:
    """The 16-bit base plus one 4-bit base per distinct (quant_type, double_quant) of the qlora rows."""
    qlora = table[table.method == "qlora"][["quant_type", "double_quant"]].drop_duplicates()
    return ["base-16bit"] + [f"base-4bit-{q}-dq{int(d)}" for q, d in qlora.itertuples(index=False)]


def base_model_description(name: str) -> dict:
    if name == "base-16bit":
        return {"model_kind": "base", "model": name, "precision": "16bit", "method": "lora"}
    _, _, quant_type, double_quant = name.split("-")
    return {
        "model_kind": "base",
        "model": name,
        "precision": "4bit",
        "method": "qlora",
        "quant_type": quant_type,
        "double_quant": double_quant == "dq1",
    }
