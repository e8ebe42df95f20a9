"""The config schema: shipped configs pass; typos and bad values stop the run naming the key."""

import copy
import json
import re
import subprocess

import pytest
import yaml

from config_check import ConfigError, load_schema, validate_config
from conftest import BIN, PROJECT, TINY_CONFIG, snakemake
from grid import grid_table

SHIPPED = ["config/config.yaml", "config/smollm2-full.yaml", "config/llama2-7b.yaml", "tests/config/config.yaml"]


def load(path: str) -> dict:
    return yaml.safe_load((PROJECT / path).read_text())


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_are_valid(path):
    validate_config(load(path))


def _set(config: dict, dotted: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


@pytest.mark.parametrize(
    "dotted, value, named",
    [
        ("lerning_rate", 1e-4, "lerning_rate"),  # unknown top-level key
        ("train.lerning_rate", 1e-4, "train.lerning_rate"),  # unknown nested key
        ("data.train.max_row", 5, "data.train.max_row"),  # unknown key two levels down
        ("train.warmup_ratio", 2.0, "train.warmup_ratio"),  # out of range
        ("train.batch_size", 0, "train.batch_size"),
        ("grid.lora_r", [0], "grid.lora_r.0"),
        ("grid.method", ["lora", "qlora4"], "grid.method.1"),
        ("data.max_length", "long", "data.max_length"),
        ("model.source", "s3", "model.source"),
        ("data.mirror", [{"hub_id": "x", "path": "y", "sha256": "zz"}], "data.mirror.0.sha256"),
        ("train.gradient_checkpointing", "sometimes", "train.gradient_checkpointing"),
        ("train.kernels", "triton", "train.kernels"),
        ("train.cuda_graphs_attention", "xformers", "train.cuda_graphs_attention"),
        ("train.cuda_graphs_capture", "eager", "train.cuda_graphs_capture"),
        ("train.cuda_graphs_headroom", 0.95, "train.cuda_graphs_headroom"),  # below the model's prediction
        ("train.checkpoint_every", 0, "train.checkpoint_every"),
        ("train.cublas_workspace_config", "4096:8", "train.cublas_workspace_config"),  # no leading colon
    ],
)
def test_schema_names_the_bad_key(dotted, value, named):
    config = _set(load("tests/config/config.yaml"), dotted, value)
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    assert f"'{named}'" in str(raised.value)


def test_missing_key_is_named():
    config = load("tests/config/config.yaml")
    del config["train"]["epochs"]
    with pytest.raises(ConfigError, match="'train.epochs': missing required key"):
        validate_config(config)


def test_coarse_multiple_must_hold_the_collators():
    config = load("tests/config/config.yaml")
    config["train"].update(cuda_graphs=True, pad_to_multiple_of=64, cuda_graphs_coarse_multiple=96)
    with pytest.raises(ConfigError, match=r"'train.cuda_graphs_coarse_multiple': 96 must be a multiple of .*\(64\)"):
        validate_config(config)
    config["train"]["cuda_graphs_coarse_multiple"] = 128
    validate_config(config)


def test_loop_ahead_needs_the_recorder_thread():
    config = load("tests/config/config.yaml")
    config["train"].update(cuda_graphs=True, cuda_graphs_loop_ahead=1)
    with pytest.raises(ConfigError, match=r"'train.cuda_graphs_loop_ahead': .* needs train.cuda_graphs_capture ahead"):
        validate_config(config)
    config["train"]["cuda_graphs_capture"] = "ahead"
    validate_config(config)
    config["train"]["cuda_graphs_loop_ahead"] = -1
    with pytest.raises(ConfigError, match=r"'train.cuda_graphs_loop_ahead'"):
        validate_config(config)


def test_cross_key_rule_hub_source_needs_revision():
    config = _set(_set(load("tests/config/config.yaml"), "model.source", "hub"), "model.revision", None)
    with pytest.raises(ConfigError, match="model.hub_id'/'model.revision"):
        validate_config(config)


def test_cross_key_rule_auto_checkpointing_needs_a_budget():
    config = _set(load("tests/config/config.yaml"), "train.gradient_checkpointing", "auto")
    with pytest.raises(ConfigError, match="'train.memory_budget_gib': gradient_checkpointing auto needs a budget"):
        validate_config(config)
    validate_config(_set(config, "train.memory_budget_gib", 70))


def test_cross_key_rule_accumulation_divides_among_gpus():
    config = _set(load("tests/config/config.yaml"), "resources.gpus_per_job", 2)
    with pytest.raises(ConfigError, match="'train.gradient_accumulation_steps': must be a multiple of"):
        validate_config(config)
    validate_config(_set(config, "train.gradient_accumulation_steps", 4))


def test_every_schema_key_is_documented():
    undocumented = []

    def walk(node: dict, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub and "$ref" not in sub:
                undocumented.append(f"{path}{key}")
            walk(sub, f"{path}{key}.")
        if isinstance(node.get("items"), dict):
            walk(node["items"], path)

    schema = load_schema()
    walk(schema, "")
    for name, definition in schema["$defs"].items():
        walk(definition, f"$defs.{name}.")
    assert not undocumented


def test_every_object_forbids_unknown_keys():
    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, sub in node.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(load_schema(), "schema")


def test_snakemake_stops_before_any_job_naming_the_key(tmp_path):
    bad = _set(load("tests/config/config.yaml"), "train.lerning_rate", 1e-4)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = snakemake("-n", config=path, results_dir=tmp_path / "results", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Invalid configuration: config key 'train.lerning_rate': unknown key" in output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists()


def test_default_dry_run_plans_the_whole_dag(tmp_path):
    result = snakemake("-n", config=PROJECT / "config" / "config.yaml", results_dir=tmp_path)
    for rule in ("fetch_data", "fetch_model", "prepare_data", "init_adapter", "train"):
        assert f"{rule} " in result.stdout, rule
    # Both arms, two seeds: four training jobs in the default study.
    assert "method~qlora" in result.stdout and "method~lora" in result.stdout
    assert "seed~2" in result.stdout


def test_tiny_config_is_what_ci_runs():
    assert TINY_CONFIG.is_file()


@pytest.mark.parametrize(
    "push, named",
    [
        ({"enabled": True}, "push.repo_id"),  # enabled needs a repository
        ({"what": "both"}, "push.what"),
        ({"repo_id": "no-owner"}, "push.repo_id"),
        ({"token": "hf_x"}, "push.token"),  # a token is never a config value
    ],
)
def test_push_section_is_validated_naming_the_key(push, named):
    config = load("tests/config/config.yaml")
    config["push"] = push
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    assert f"'{named}'" in str(raised.value)


def test_push_defaults_are_off_and_private():
    from config_check import push_settings

    settings = push_settings(load("tests/config/config.yaml"))
    assert settings["enabled"] is False and settings["private"] is True and settings["what"] == "merged"
    assert push_settings(load("config/config.yaml")) == settings


def test_grid_exclude_leaves_out_matching_rows_and_rejects_a_typo():
    grid = {
        "method": ["lora", "qlora"],
        "lora_r": [64],
        "lora_alpha": [16],
        "lora_dropout": [0.1],
        "target_modules": ["qv"],
        "learning_rate": [2e-4],
        "quant_type": ["nf4", "fp4"],
        "double_quant": [False, True],
        "seed": [1],
        "exclude": [{"quant_type": "fp4", "double_quant": True}],
    }
    table = grid_table(grid)
    qlora = table[table.method == "qlora"]
    assert sorted(zip(qlora.quant_type, qlora.double_quant, strict=True)) == [
        ("fp4", False),
        ("nf4", False),
        ("nf4", True),
    ]
    assert len(table) == 4  # one lora row
    grid["exclude"] = [{"quant_type": "fp8"}]
    with pytest.raises(ValueError, match=r"config key 'grid.exclude': \{'quant_type': 'fp8'\} matches no grid row"):
        grid_table(grid)


def test_lean_overlay_changes_only_the_memory_settings_of_the_7b_study():
    """config/lean.yaml over config/llama2-7b.yaml, merged as Snakemake merges --configfile files:
    valid, the lean settings and nothing else change, and Snakemake plans the study from both."""
    merged, changed = merged_over_the_7b_study("lean.yaml")
    assert changed == {
        "grid.double_quant",
        "train.optimizer",  # the paged one its rows measured (its state outside the allocator's peak)
        "train.memory_budget_gib",
        "train.offload_checkpoints",
        "train.offload_layers",  # none, as its rows measured (the 7B config keeps every 3rd layer whole)
        "train.cublas_workspace_config",
    }
    # its batch-4 rows: every guanaco batch (4 x 1,024 tokens at most) recorded, one memory pool;
    # 2,048 x 4 blocks eager (measured faster and smaller than recorded)
    assert 4 * merged["data"]["max_length"] <= merged["train"]["cuda_graphs_max_tokens"] < 4 * 2048
    assert_plans_the_7b_study_with("lean.yaml")


EVERY_JOB = ("seed_epoch_b1", "epoch_b4", "block_2048x4")


@pytest.mark.parametrize(
    "sitting, jobs",
    [
        ("epochs_h200_unsloth_same.json", EVERY_JOB),
        ("epochs_h200_unsloth_current.json", EVERY_JOB),
        ("epochs_h200_offload_unsloth.json", ("block_2048x4",)),  # the offloaded inputs prefetched
    ],
)
def test_lean_overlay_leads_unsloth_on_every_job_of_one_sitting(sitting, jobs):
    """bench/results/epochs_h200_unsloth_*.json, config/lean.yaml against unsloth on one card in
    one sitting (two sittings on every job, the second with the code as it was then; the blocks
    again once the offloaded inputs came back ahead of their recomputation): each lean row
    trained lean.yaml's settings (the budget set to unsloth's peak on the blocks and at batch 1)
    and is, by the medians, at or above unsloth's tokens/s at or below both of its peaks."""
    overlay = load("config/lean.yaml")
    report = json.loads((PROJECT / "bench" / "results" / sitting).read_text())
    lean = dict(overlay["train"], double_quant=overlay["grid"]["double_quant"][0])
    assert lean.pop("offload_layers") == 0  # the default its rows ran with, before the key existed
    for row in (r for r in report["rows"] if r["recipe"].startswith("lean_yaml")):
        assert row["status"] == "ok" and row["train"] == dict(lean, memory_budget_gib=row["train"]["memory_budget_gib"])
        assert row.get("offload_prefetch", False) is (sitting == "epochs_h200_offload_unsloth.json")  # recorded since
    rows = (row for row in report["table"] if row["recipe"] == "unsloth" or row["recipe"].startswith("lean_yaml"))
    table = {(row["recipe"] == "unsloth", row["job"]): row for row in rows}
    assert {job for _, job in table} == set(jobs)
    for job in jobs:
        ours, theirs = table[False, job], table[True, job]
        assert ours["status"] == theirs["status"] == "ok"
        assert ours["tokens_per_second"] >= theirs["tokens_per_second"], job
        assert ours["peak_allocated_gib"] <= theirs["peak_allocated_gib"], job
        assert ours["peak_reserved_gib"] <= theirs["peak_reserved_gib"], job
        if job != "block_2048x4":  # epochs: the same rows, so the same tokens
            assert ours["epoch_seconds"] < theirs["epoch_seconds"], job


def test_batch4_overlay_is_the_measured_batch4_recipe_over_the_7b_study():
    """config/batch4.yaml over config/llama2-7b.yaml: valid, batch 4 and the recorder's settings
    and nothing else change, and they are the train settings of the rows its comment quotes (the
    batch4 rows of bench/results/epochs_h200_revision4.json at 3.22x the tutorial's; before the memory
    model's revision 4, at a graph headroom of 1.05, those of epochs_h200_outside.json and _2, at 3.00x
    and 3.18x on two machines, and the fastest batch-4 epoch of epochs_h200_loop_ahead.json, at 2.90x in
    that sitting, the overlay without cuda_graphs_loop_ahead 2.88x, and 2.86x with it on a second
    machine); Snakemake plans the study."""
    base, overlay = load("config/llama2-7b.yaml"), load("config/batch4.yaml")
    merged, changed = merged_over_the_7b_study("batch4.yaml")
    assert changed == {
        "train.batch_size",
        "train.cuda_graphs_capture",
        "train.cuda_graphs_loop_ahead",
        "train.cuda_graphs_coarse_multiple",
        "train.cuda_graphs_coarse_steps",
    }
    assert overlay["train"]["cuda_graphs_headroom"] == base["train"]["cuda_graphs_headroom"] == 1.02  # revision 4
    assert base["train"]["pad_to_multiple_of"] == merged["train"]["pad_to_multiple_of"] == 64  # stated in both
    assert base["train"]["fuse_lora_add"] is True
    assert merged["results_dir"] != base["results_dir"]
    results = PROJECT / "bench" / "results"
    report = json.loads((results / "epochs_h200_loop_ahead.json").read_text())
    table = {row["recipe"]: row for row in report["table"] if row["job"] == "epoch_b4"}
    fastest = min((r for r in table.values() if r["recipe"] != "tutorial"), key=lambda r: r["epoch_seconds"])
    assert fastest["recipe"] == "batch4_ahead2" and fastest["vs_tutorial"] == 2.9
    assert table["batch4"]["vs_tutorial"] == 2.88
    assert fastest["peak_allocated_gib"] <= merged["train"]["memory_budget_gib"]
    shipped = {k: v for k, v in overlay["train"].items() if k != "batch_size"}
    report = json.loads((results / "epochs_h200_revision4.json").read_text())
    measured = [row["train"] for row in report["rows"] if row["recipe"] == "batch4"]
    assert len(measured) == 2 and all(m == shipped for m in measured)
    (row,) = (r for r in report["table"] if r["recipe"] == "batch4")
    assert row["vs_tutorial"] == 3.22 and row["peak_allocated_gib"] <= merged["train"]["memory_budget_gib"]
    shipped = dict(shipped, cuda_graphs_headroom=1.05)  # the rows before revision 4 (its plan at 1.05)
    for name in ("epochs_h200_loop_ahead.json", "epochs_h200_loop_ahead_2.json"):
        rows = json.loads((results / name).read_text())["rows"]
        measured = [row["train"] for row in rows if row["recipe"] == "batch4_ahead2"]
        assert measured and all(m == shipped for m in measured), name
    second = {
        row["recipe"]: row for row in json.loads((results / "epochs_h200_loop_ahead_2.json").read_text())["table"]
    }
    assert second["batch4_ahead2"]["vs_tutorial"] == 2.86
    for name, ratio in (("epochs_h200_outside.json", 3.0), ("epochs_h200_outside_2.json", 3.18)):
        report = json.loads((results / name).read_text())
        measured = [row["train"] for row in report["rows"] if row["recipe"] == "batch4"]
        assert len(measured) == 2 and all(m == shipped for m in measured), name
        (row,) = (r for r in report["table"] if r["recipe"] == "batch4")
        assert row["vs_tutorial"] == ratio and row["peak_allocated_gib"] <= merged["train"]["memory_budget_gib"]
    assert overlay["train"]["batch_size"] == 4
    assert_plans_the_7b_study_with("batch4.yaml")


def merged_over_the_7b_study(overlay: str) -> tuple[dict, set[str]]:
    """config/llama2-7b.yaml with the overlay merged as Snakemake merges --configfile files, validated,
    and the grid and train keys the overlay changed."""
    from snakemake.utils import update_config

    base, merged = load("config/llama2-7b.yaml"), load("config/llama2-7b.yaml")
    update_config(merged, load(f"config/{overlay}"))
    validate_config(merged)
    return merged, {f"{s}.{k}" for s in ("grid", "train") for k in merged[s] if merged[s][k] != base[s].get(k)}


def assert_plans_the_7b_study_with(overlay: str) -> None:
    """Snakemake plans the 7B study from config/llama2-7b.yaml and the overlay (stock kernels: no
    Liger on a CPU)."""
    configs = [str(PROJECT / "config" / name) for name in ("llama2-7b.yaml", overlay)]
    done = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--configfile",
            *configs,
            "--config",
            "train={kernels: none}",
            "-n",
            "--quiet",
            "rules",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^train\s+8$", done.stdout, flags=re.M)  # 2 methods x 2 lr x 2 seeds
