"""Checks made when the workflow starts, before any job is submitted (rules/common.smk).

Each returns one sentence naming the problem, or None:
- kernels_problem: `train.kernels: liger` needs liger_kernel where the jobs run (this Python,
  or the conda env `--use-conda` builds for the rules);
- polling_problem: the SLURM executor polling with squeue on a site whose MinJobAge drops
  finished jobs before the next poll (the job would look like it runs forever);
- preemption_note (a note, not a refusal): Slurm cancels preempted jobs, which the plugin
  then waits for forever;
- stray_jobs_problem: a live job (e.g. left by a controller that died) already trains a cell
  of this results folder (scripts/cell_lock.py);
and disk_note says what the grid's models will take on disk.
"""

import importlib.util
import subprocess
from pathlib import Path

import yaml

from cell_lock import describe, live_owners
from model_shape import ModelShape

PROJECT = Path(__file__).resolve().parent.parent
ENV_CPU = "envs/pipeline.yaml"
ENV_GPU = "envs/pipeline-gpu.yaml"  # + the GPU extras (requirements-gpu.txt)
# The executor plugin's longest pause between two status polls (plugin 2.8.0, check_active_jobs).
PLUGIN_MAX_POLL_SECONDS = 180
POLL_MARGIN_SECONDS = 60


def uses_liger(config: dict) -> bool:
    """Liger only runs on a GPU: a CPU run (resources.gpu 0) keeps the stock kernels."""
    return config["train"]["kernels"] == "liger" and config["resources"]["gpu"] > 0


def conda_env(config: dict) -> str:
    """The rules' conda env (relative to the project): the GPU one when the recipe needs Liger."""
    return ENV_GPU if uses_liger(config) else ENV_CPU


def env_packages(env_file: Path) -> set[str]:
    env = yaml.safe_load(Path(env_file).read_text())
    pip = next((item["pip"] for item in env["dependencies"] if isinstance(item, dict)), [])
    return {spec.split("==")[0].strip().lower().replace("_", "-") for spec in pip}


def kernels_problem(config: dict, use_conda: bool, python: str) -> str | None:
    if not uses_liger(config):
        return None
    if use_conda:
        env_file = PROJECT / conda_env(config)
        if "liger-kernel" in env_packages(env_file):
            return None
        where = f"the conda env {env_file}"
    else:
        if importlib.util.find_spec("liger_kernel") is not None:
            return None
        where = f"the Python the jobs run ({python})"
    return (
        f"config key 'train.kernels' is liger, but liger-kernel is not installed in {where}: "
        "install requirements-gpu.txt there, run with --use-conda, or set train.kernels: none"
    )


def polling_problem(status_command: str | None, init_seconds: int, min_job_age: int | None) -> str | None:
    """The plugin polls squeue at most every 180 s; Slurm keeps a finished job there for
    MinJobAge. With MinJobAge below 3 x init_seconds the plugin itself switches to sacct."""
    if status_command != "squeue" or min_job_age is None or min_job_age < 3 * init_seconds:
        return None
    if min_job_age >= PLUGIN_MAX_POLL_SECONDS + POLL_MARGIN_SECONDS:
        return None
    return (
        f"this Slurm keeps finished jobs in squeue for MinJobAge={min_job_age} s, less than the "
        f"{PLUGIN_MAX_POLL_SECONDS} s the executor may wait between two status polls, so a job that "
        "ends in between would look like it runs forever: set `slurm-status-command: sacct` in your "
        "profile (a job you scancel then goes unnoticed: stop snakemake and rerun)"
    )


def slurm_setting(name: str) -> str | None:
    """One value of `scontrol show config` (None without Slurm)."""
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    except OSError:
        return None
    for line in shown.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def preemption_note(preempt_mode: str | None) -> str | None:
    if not preempt_mode or "CANCEL" not in preempt_mode.upper():
        return None
    return (
        f"Note: this Slurm cancels preempted jobs (PreemptMode={preempt_mode}) and the executor "
        "plugin then waits for them forever: if sacct shows a job PREEMPTED, stop snakemake and "
        "rerun it (a train job resumes from its last checkpoint)"
    )


def stray_jobs_problem(checkpoints_root: Path) -> str | None:
    owners = live_owners(checkpoints_root)
    if not owners:
        return None
    listed = "; ".join(f"{cell} by {describe(record)}" for cell, record in owners)
    return (
        f"live jobs still train cells of this run ({listed}), perhaps left by a Snakemake that "
        "died: wait for them (squeue --me) or cancel them, then rerun"
    )


def disk_note(model_config: Path, cells: int, merged_bytes_per_parameter: int) -> str:
    """The base model and the merged models the grid keeps (adapters and checkpoints are
    small beside them)."""
    if not Path(model_config).is_file():
        return "disk: known once fetch_model has fetched the base model (the next dry run says)"
    shape = ModelShape.from_config(model_config)
    parameters = shape.linear_parameters() + shape.other_parameters()
    merged = parameters * merged_bytes_per_parameter
    total = merged * cells
    return (
        f"disk: {cells} merged models of {merged / 1e9:.1f} GB each, {total / 1e9:.1f} GB in all "
        f"(results_dir/merged/; a {parameters / 1e9:.2f}B-parameter base), "
        "plus the base model and one adapter per cell"
    )
