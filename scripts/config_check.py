"""Validate a run's config against config/schema/config.schema.yaml.

Used by rules/common.smk before any job is scheduled, and by the tests. Errors name the
offending key as a dotted path (``train.learning_rate``) so a typo costs seconds, not a
failed job an hour later.
"""

import argparse
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value the schema (or a cross-key rule) rejects; the message names the key."""


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # The unknown key is in the message, not in the path: name it in full.
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(extra[0] if len(extra) == 1 else "{" + ",".join(extra) + "}")
    if error.validator == "required":
        parts.append(str(error.message.split("'")[1]))
    return ".".join(parts) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"unknown key (allowed here: {allowed})"
    if error.validator == "required":
        return "missing required key"
    return error.message


def _cross_key_checks(config: dict) -> None:
    """Rules a JSON schema cannot say simply; each names its key."""
    model = config["model"]
    if model["source"] == "hub" and not (model.get("hub_id") and model.get("revision")):
        raise ConfigError("config key 'model.hub_id'/'model.revision': source hub needs both set")
    if model["source"] == "local" and not model.get("local_path"):
        raise ConfigError("config key 'model.local_path': source local needs a folder")
    for name in ("train", "eval_chat", "wikitext"):
        source = config["data"][name]
        if not source.get("local_path") and not source.get("hub_id"):
            raise ConfigError(f"config key 'data.{name}': set hub_id or local_path")
    if config["data"]["wikitext"]["markup"] != "plain":
        raise ConfigError("config key 'data.wikitext.markup': must be plain")
    for name in ("train", "eval_chat"):
        if config["data"][name]["markup"] == "plain":
            raise ConfigError(f"config key 'data.{name}.markup': chat data needs llama2_inst or human_assistant")
    train = config["train"]
    if train["gradient_accumulation_steps"] % config["resources"]["gpus_per_job"]:
        raise ConfigError(
            "config key 'train.gradient_accumulation_steps': must be a multiple of resources.gpus_per_job "
            "(each GPU accumulates its share of the same global batch)"
        )
    if train["gradient_checkpointing"] == "auto" and train["memory_budget_gib"] is None:
        raise ConfigError("config key 'train.memory_budget_gib': gradient_checkpointing auto needs a budget")
    if train.get("compile", False) and train["kernels"] == "liger":
        raise ConfigError(
            "config key 'train.compile': torch.compile cannot trace Liger's kernels (measured with torch 2.11); "
            "set train.kernels: none with compile, or compile: false"
        )
    if train.get("offload_checkpoints", False) and train.get("compile", False):
        raise ConfigError(
            "config key 'train.offload_checkpoints': not with train.compile (the compiled layer would trace the "
            "host copies; untested); set one of them false"
        )
    if train.get("offload_layers", 0) and train.get("compile", False):
        raise ConfigError(
            "config key 'train.offload_layers': not with train.compile (the compiled layer would trace the "
            "saved-tensor hooks; untested); set offload_layers to 0, or compile false"
        )
    if train.get("cuda_graphs", False):
        if train["gradient_checkpointing"] is True and not train.get("recompute_lora_dropout", False):
            raise ConfigError(
                "config key 'train.cuda_graphs': a recorded step cannot restore the RNG that checkpointed "
                "layers' LoRA dropout needs; set recompute_lora_dropout true, or gradient_checkpointing false or auto"
            )
        if train["padding_free"] or train.get("compile", False):
            key = "padding_free" if train["padding_free"] else "compile"
            raise ConfigError(f"config key 'train.cuda_graphs': not with train.{key} (one or the other)")
        if train.get("cuda_graphs_loop_ahead", 0) and train.get("cuda_graphs_capture", "synchronized") != "ahead":
            raise ConfigError(
                "config key 'train.cuda_graphs_loop_ahead': the loop records ahead of the recorder thread, "
                "which needs train.cuda_graphs_capture ahead; set it, or cuda_graphs_loop_ahead 0"
            )
        coarse, multiple = train.get("cuda_graphs_coarse_multiple"), train.get("pad_to_multiple_of")
        if coarse and multiple and coarse % multiple:
            raise ConfigError(
                f"config key 'train.cuda_graphs_coarse_multiple': {coarse} must be a multiple of "
                f"train.pad_to_multiple_of ({multiple}), so that each coarse shape holds the finer ones below it"
            )
    from grid import grid_table

    try:
        grid_table(config["grid"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    push = push_settings(config)
    if push["enabled"] and not push["repo_id"]:
        raise ConfigError("config key 'push.repo_id': push.enabled needs a Hub repository (owner/name)")
    from lm_eval_tasks import check_config as check_lm_eval  # both import this module
    from trackers import check_config as check_trackers

    check_lm_eval(config)
    check_trackers(config)


def push_settings(config: dict, schema: dict | None = None) -> dict:
    """The push section with the schema's defaults filled in (the section is optional)."""
    properties = (schema or load_schema())["properties"]["push"]["properties"]
    return {key: (config.get("push") or {}).get(key, spec["default"]) for key, spec in properties.items()}


def validate_config(config: dict, schema: dict | None = None) -> None:
    """Raise ConfigError naming the first offending key (the shallowest one)."""
    validator = jsonschema.Draft202012Validator(schema or load_schema())
    errors = sorted(
        validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"config key '{_key_path(first)}': {_describe(first)}{more}")
    _cross_key_checks(config)


def main(config_path: Path) -> None:
    validate_config(yaml.safe_load(config_path.read_text()))
    print(f"{config_path}: valid")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    args = parser.parse_args()
    try:
        main(args.config)
    except ConfigError as err:
        sys.exit(str(err))
