# Helpers shared by every stage: config validation, paths, the training grid, resources.

import math
import sys
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from config_check import ConfigError, push_settings, validate_config  # noqa: E402
from grid import base_model_description, base_model_names, grid_table  # noqa: E402
from memory_plan import expected_peak  # noqa: E402
from job_resources import LIGHT_MEM_MB, LIGHT_RUNTIME_MIN, train_runtime_min  # noqa: E402
from preemption import sbatch_options  # noqa: E402
from site_check import (  # noqa: E402
    conda_env,
    disk_note,
    kernels_problem,
    polling_problem,
    preemption_note,
    slurm_setting,
    stray_jobs_problem,
)
from runtime import scripts_first_in_jobs  # noqa: E402

# Jobs import the project's scripts before site-packages (a package may share a script's name).
scripts_first_in_jobs(Path(workflow.basedir) / "scripts")

try:
    validate_config(config)
except ConfigError as err:
    raise WorkflowError(f"Invalid configuration: {err}") from None

RESULTS = config["results_dir"].rstrip("/")
RES = config["resources"]
# Local runs may let evaluation/merge jobs share a card (resources.jobs_per_gpu slots, run
# with --resources gpu=<cards x slots>); a training job takes every slot of its cards.
JOBS_PER_GPU = RES.get("jobs_per_gpu", 1)
if JOBS_PER_GPU > 1 and not workflow.local_exec:
    raise WorkflowError(
        "Invalid configuration: config key 'resources.jobs_per_gpu' shares cards between local jobs only; "
        "set it to 1 for a cluster executor, which assigns the GPUs itself"
    )
# A training job's GPU resource (one data-parallel process per card) and CPU threads to match.
TRAIN_GPUS = RES["gpus_per_job"] * JOBS_PER_GPU if RES["gpu"] else 0
TRAIN_THREADS = RES["threads"] * RES["gpus_per_job"]
ENV = f"../{conda_env(config)}"  # with the GPU extras when the recipe needs them
DATASETS = ["train", "eval_chat", "wikitext"]

# The initial adapter of one rank/alpha/dropout/targets/seed (shared by both arms).
INIT_ADAPTER = "init_adapter/r{lora_r}_a{lora_alpha}_d{lora_dropout}_{target_modules}_s{seed}"

# One row per training job; the whole row is the cell's name (results/train/<cell>/).
GRID = Paramspace(grid_table(config["grid"]), filename_params="*", single_wildcard="cell")


# The opt-in Hub upload (config push:, schema defaults filled in).
PUSH = push_settings(config)
if PUSH["cell"] != "best" and PUSH["cell"] not in GRID.instance_patterns:
    raise WorkflowError(f"Invalid configuration: config key 'push.cell': {PUSH['cell']!r} is not a grid cell")


FIGURES = ["memory", "perplexity", "loss_curves", "throughput", "quality_vs_memory"]

# Base models evaluated: the 16-bit base and each distinct 4-bit setting of the qlora arm.
BASE_MODELS = base_model_names(GRID.dataframe)


wildcard_constraints:
    dataset="|".join(DATASETS),
    base="|".join(BASE_MODELS),
    figure="|".join(FIGURES),
    target_modules="qv|all_linear",


def cell_params(wildcards):
    """The grid row (method, lora_r, ..., seed) of one training job, as plain Python values."""
    return {key: getattr(value, "item", lambda: value)() for key, value in GRID.instance(wildcards).items()}


def init_adapter_dir(wildcards):
    """The initial adapter shared by every cell of this rank/alpha/dropout/targets/seed."""
    return f"{RESULTS}/{INIT_ADAPTER.format(**cell_params(wildcards))}"


def train_gpu_mem_mb(wildcards, input):
    """GPU memory (MB) the memory model predicts for this cell, paged optimizer state and the
    headroom of CUDA-graph recorded steps included: `--resources gpu_mem_mb=N` packs cells onto
    a GPU locally, and a SLURM site maps it to a GPU type (profiles/slurm). 0 while the base
    model is not fetched (dry run)."""
    model_config = Path(input.model_dir) / "config.json"
    if not model_config.exists():
        return 0
    kernels = config["train"]["kernels"] if RES["gpu"] else "none"
    cell = cell_params(wildcards)
    graphs = bool(RES["gpu"])  # train.cuda_graphs records steps on a GPU only
    peak = expected_peak(model_config, cell, config["train"], config["data"]["max_length"], kernels, graphs)
    return math.ceil((peak["expected"] + peak["paged_optimizer"]) / 1e6)


def base_description(wildcards):
    """What the evaluated base model is (precision, quantisation) for the perplexity table."""
    return base_model_description(wildcards.base)


def adapter_description(wildcards):
    cell = cell_params(wildcards)
    precision = "4bit" if cell["method"] == "qlora" else "16bit"
    return {"model_kind": "adapter", "model": wildcards.cell, "precision": precision, **cell}


def merged_description(wildcards):
    return {"model_kind": "merged", "model": wildcards.cell, "precision": "16bit", **cell_params(wildcards)}


def evaluation_tables():
    """Every per-model perplexity CSV: the bases, each adapter, each merged model."""
    return (
        expand(f"{RESULTS}/eval/base/{{base}}.csv", base=BASE_MODELS)
        + expand(f"{RESULTS}/eval/adapter/{{cell}}.csv", cell=GRID.instance_patterns)
        + expand(f"{RESULTS}/eval/merged/{{cell}}.csv", cell=GRID.instance_patterns)
    )


def sample_files():
    """Greedy generations of every evaluated model."""
    return (
        expand(f"{RESULTS}/samples/base/{{base}}.jsonl", base=BASE_MODELS)
        + expand(f"{RESULTS}/samples/adapter/{{cell}}.jsonl", cell=GRID.instance_patterns)
        + expand(f"{RESULTS}/samples/merged/{{cell}}.jsonl", cell=GRID.instance_patterns)
    )


def push_models():
    """The models push_to_hub may upload: push.cell's, or every cell's when it picks the best."""
    cells = list(GRID.instance_patterns) if PUSH["cell"] == "best" else [PUSH["cell"]]
    if PUSH["what"] == "adapter":
        return expand(f"{RESULTS}/train/{{cell}}/adapter", cell=cells)
    return expand(f"{RESULTS}/merged/{{cell}}/model", cell=cells)


def final_targets():
    """What `snakemake` with no target builds (grows with each stage); the push only when enabled."""
    return [
        f"{RESULTS}/data/stats.json",
        f"{RESULTS}/model/tokenizer_audit.json",
        expand(f"{RESULTS}/train/{{cell}}/metrics.json", cell=GRID.instance_patterns),
        f"{RESULTS}/tables/perplexity.csv",
        f"{RESULTS}/report/report.html",
    ] + ([f"{RESULTS}/hub/upload.json"] if PUSH["enabled"] else [])


# What each job asks of the scheduler (scripts/job_resources.py): sized per rule, doubled on a retry.
def per_attempt(amount):
    """A resource that doubles on each retry (after OUT_OF_MEMORY or TIMEOUT)."""
    return lambda wildcards, attempt: amount * attempt


# merge and evaluate load the model on one GPU: they never ask for more.
MODEL_GPUS = min(RES["gpu"], 1)


def train_runtime(wildcards, input, attempt):
    """The train job's time limit: from its tokens and the measured throughput when given."""
    return train_runtime_min(config, Path(input.stats), attempt)


def train_sbatch_options(wildcards, input, attempt):
    """Slurm's warning signal before that limit (a checkpoint is saved on it), requeueable."""
    return sbatch_options(train_runtime(wildcards, input, attempt))


# Site checks before any job is submitted (scripts/site_check.py), in the controller only.
if workflow.is_main_process:
    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    problems = [kernels_problem(config, USE_CONDA, sys.executable)]
    if workflow.executor_plugin is not None and workflow.executor_plugin.name.endswith("slurm"):
        from snakemake_executor_plugin_slurm.job_status_query import get_min_job_age

        settings = workflow.executor_settings
        problems.append(
            polling_problem(settings.status_command, settings.init_seconds_before_status_checks, get_min_job_age())
        )
        if note := preemption_note(slurm_setting("PreemptMode")):
            print(note, file=sys.stderr)
    for problem in filter(None, problems):
        raise WorkflowError(f"Cannot start: {problem}.")
    # Printed: Snakemake's logger shows nothing this early. Merged weights: 2 bytes a parameter
    # on a GPU (bf16/fp16), 4 on the CPU (float32).
    print(
        disk_note(Path(RESULTS) / "model/base/config.json", len(GRID.dataframe), 2 if RES["gpu"] else 4),
        file=sys.stderr,
    )


# Before the first job of a real run (not a dry run): no live job, e.g. one left by a
# Snakemake that died, already trains a cell of this results folder.
onstart:
    if workflow.is_main_process and (stray := stray_jobs_problem(Path(RESULTS) / "checkpoints")):
        raise WorkflowError(f"Cannot start: {stray}.")


# ---- Downstream tasks (evaluate.lm_eval, rules/downstream.smk); nothing when disabled.
from lm_eval_tasks import PIPELINE_DATA, TASKS_DIR, pipeline_inputs, settings as lm_eval_settings  # noqa: E402

LM_EVAL = lm_eval_settings(config)
LM_EVAL_DATA = pipeline_inputs(config, RESULTS) if LM_EVAL["enabled"] else {}
LM_EVAL_TASK_FILES = sorted(str(p) for p in TASKS_DIR.glob("*.yaml"))


def downstream_tables():
    """Every per-model downstream CSV: the bases, each adapter, each merged model."""
    return (
        expand(f"{RESULTS}/downstream/base/{{base}}.csv", base=BASE_MODELS)
        + expand(f"{RESULTS}/downstream/adapter/{{cell}}.csv", cell=GRID.instance_patterns)
        + expand(f"{RESULTS}/downstream/merged/{{cell}}.csv", cell=GRID.instance_patterns)
    )


def downstream_report_inputs():
    """What the report adds when evaluate.lm_eval is enabled: the tables and their figure."""
    if not LM_EVAL["enabled"]:
        return []
    return [
        f"{RESULTS}/tables/downstream.csv",
        f"{RESULTS}/tables/downstream_diff.csv",
        f"{RESULTS}/figures/downstream.png",
    ]


# ---- Experiment trackers (train.report_to, rules/track.smk); nothing for TensorBoard alone.
from trackers import trainer_report_to  # noqa: E402

TRACKED = trainer_report_to(config["train"]) != "none"


def tracker_records():
    """One record per cell of the numbers rule track_evaluation added to its tracker runs."""
    return expand(f"{RESULTS}/trackers/{{cell}}.json", cell=GRID.instance_patterns) if TRACKED else []


def cell_downstream_tables(wildcards):
    """The cell's downstream CSVs (adapter, merged) when evaluate.lm_eval is enabled."""
    if not LM_EVAL["enabled"]:
        return []
    return [f"{RESULTS}/downstream/{kind}/{wildcards.cell}.csv" for kind in ("adapter", "merged")]
