"""The recipes of one ``bench/epochs.py run`` call: named recipes and ``--variant`` specs
(``NAME:[@OVERLAY.yaml,]KEY=VALUE,...``) into each recipe's kind and settings, and a variant's
settings split into the grid cell's, the train section's and its process's environment."""

from pathlib import Path

import yaml

# The stock path: no Liger, every layer checkpointed, eager steps, PEFT's own dropout.
REFERENCE = dict(
    kernels="none", gradient_checkpointing=True, checkpoint_every=1, cuda_graphs=False, recompute_lora_dropout=False
)
CELL_KEYS = ("double_quant",)  # variant keys for the grid cell, not the train section


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE strings (YAML values: 8, true, auto, null) for the train section."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"train override {item!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def split_cell_keys(overrides: dict) -> tuple[dict, dict]:
    """A variant's settings: (those of the grid cell (CELL_KEYS), those of the train section)."""
    return (
        {k: v for k, v in overrides.items() if k in CELL_KEYS},
        {k: v for k, v in overrides.items() if k not in CELL_KEYS},
    )


def split_environment(settings: dict) -> tuple[dict, dict]:
    """A recipe's settings: (the train section's, environment variables of its process). Upper-case
    keys are variables (CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8), set before the child starts."""
    return (
        {k: v for k, v in settings.items() if not k.isupper()},
        {k: str(v) for k, v in settings.items() if k.isupper()},
    )


def recipe_specs(recipes: list[str], overrides: dict, variants: list[str]) -> dict:
    """name -> (kind, train overrides) for every recipe of the call."""
    specs = {}
    for name in recipes:
        if name == "tutorial" or name == "unsloth":
            specs[name] = (name, {})
        else:
            specs[name] = ("pipeline", dict(overrides, **(REFERENCE if name == "reference" else {})))
    for variant in variants:
        name, sep, items = variant.partition(":")
        if not sep or not name:
            raise SystemExit(f"--variant {variant!r} is not NAME:[@OVERLAY.yaml,]KEY=VALUE,KEY=VALUE")
        items = items.split(",")
        settings = overlay_settings(Path(items.pop(0)[1:])) if items[0].startswith("@") else {}
        settings.update(parse_overrides(items))  # KEY=VALUE after an overlay: over its settings
        specs[name] = ("pipeline", dict(overrides, **settings))
    return specs


def overlay_settings(path: Path) -> dict:
    """A config overlay's settings as a variant's (``NAME:@config/batch4.yaml``): its train section
    but the batch size (the job's), and its grid's single-valued cell keys."""
    if not path.is_file():
        raise SystemExit(f"--variant overlay {path} is not a file")
    overlay = yaml.safe_load(path.read_text()) or {}
    settings = {k: v for k, v in (overlay.get("train") or {}).items() if k != "batch_size"}
    for key, values in (overlay.get("grid") or {}).items():
        if key in CELL_KEYS:
            if not isinstance(values, list) or len(values) != 1:
                raise SystemExit(f"--variant overlay {path}: grid.{key} must be a list of one value for a bench row")
            settings[key] = values[0]
    return settings
