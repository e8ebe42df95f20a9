"""What each job asks of Slurm (rules/*.smk resources): right-sized, and more on a retry.

Snakemake passes ``attempt`` (1, then 2 after a failure with ``retries``) to callable
resources: a job that ran out of memory (OUT_OF_MEMORY) or time (TIMEOUT) asks for twice
as much on its retry, and the train job resumes from its checkpoint (scripts/preemption.py).
"""

import json
import math
from pathlib import Path

# Jobs that load no model weights (data, tables, figures, report, audits); the request
# leaves room for the full guanaco and WikiText sets.
LIGHT_MEM_MB = 4000
LIGHT_RUNTIME_MIN = 30
DEFAULT_RUNTIME_MARGIN = 2.0


def train_tokens(config: dict, stats: dict) -> int:
    """Tokens one training job processes: the epochs over the truncated rows, or fewer when
    max_steps stops it first (at most max_length tokens per example)."""
    train = config["train"]
    epochs = stats["train"]["tokens_after_truncation"] * train["epochs"]
    if train["max_steps"] <= 0:
        return math.ceil(epochs)
    per_step = train["batch_size"] * train["gradient_accumulation_steps"] * config["data"]["max_length"]
    return min(math.ceil(epochs), train["max_steps"] * per_step)


def train_runtime_min(config: dict, stats_file: Path, attempt: int = 1) -> int:
    """The train job's time limit in minutes, times the attempt.

    With resources.train_tokens_per_second (a measured throughput of this recipe on the
    site's GPU): train_runtime_min (start-up, model load, final save) plus runtime_margin
    times the time the cell's tokens take. Without it, or before prepare_data has counted
    the tokens (a dry run): train_runtime_min alone."""
    resources = config["resources"]
    minutes = resources["train_runtime_min"]
    throughput = resources.get("train_tokens_per_second")
    if throughput and Path(stats_file).is_file():
        tokens = train_tokens(config, json.loads(Path(stats_file).read_text()))
        margin = resources.get("runtime_margin", DEFAULT_RUNTIME_MARGIN)
        minutes += math.ceil(margin * tokens / throughput / 60)
    return minutes * attempt
