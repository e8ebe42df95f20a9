"""Downstream tasks of one model with EleutherAI's lm-evaluation-harness (``evaluate.lm_eval``).

The model is the one the perplexity stage scores, built by the same code
(scripts/perplexity.py ``load_model``: the 16-bit or 4-bit base, an adapter on its training
base, a merged model) and handed to lm-eval's ``HFLM`` as an already-built model; each
configured task runs through ``lm_eval.simple_evaluate`` with its own few-shot count and
limit, and lm-eval's seeds (``fewshot_seed`` from the config, lm-eval's defaults for the
rest).

Task names and data are resolved before the model is loaded (scripts/lm_eval_tasks.py): a
task whose data cannot be had stops the job with one sentence naming task and data set.

Outputs: a tidy CSV (one row per task and metric: value, stderr, samples, few-shot, limit,
plus the model's description) and lm-eval's own results JSON (configs, versions, seeds).
"""

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

import perplexity
from grid import GRID_COLUMNS
from lm_eval_tasks import TaskDataError, dataset_of, needs_builtin_tasks, settings, task_manager, task_specs
from runtime import log_arguments, setup_logging, write_manifest, write_provenance

CSV_COLUMNS = [
    "model_kind",
    "model",
    "precision",
    *GRID_COLUMNS,
    "task",
    "metric",
    "filter",
    "value",
    "stderr",
    "n_samples",
    "num_fewshot",
    "limit",
    "fewshot_seed",
]


def pipeline_nll_on_lm_eval_windows(model, ids: list[int], max_length: int, prefix_token_id: int) -> tuple[float, int]:
    """Total NLL and token count of ``ids`` by the pipeline's own evaluator
    (perplexity.sliding_window_nll) on exactly the windows of lm-eval's rolling log-likelihood.

    lm-eval (``loglikelihood_rolling``, context_len 1) cuts a text of N tokens into windows
    of L = max_length predictions: the first predicts tokens 0..L-1 from the prefix token
    (BOS, else EOS) and the tokens before each; every further window predicts the next L
    tokens and sees only the last token of the window before (no overlap); the last, shorter
    window of p = N mod L tokens is shifted left to a full L-token input, so it sees up to L
    earlier tokens. The pipeline's sliding window (context C, stride S, each token scored
    once) over [prefix] + ids with C = L + 1 and S = L scores the same tokens from the same
    inputs for every full window. The last partial window is the pipeline's NLL of the last
    L tokens (input: the last L + 1 tokens) minus that of their first L - p: a causal model
    scores a prefix the same whether more tokens follow or not. (The pipeline's own WikiText
    windows, evaluate.wikitext_context/stride, overlap and give every token more context:
    a different, lower number; this function is for the like-for-like comparison only.)
    """
    sliding_window_nll = perplexity.sliding_window_nll
    length, count = max_length, len(ids)
    if count <= length:
        return sliding_window_nll(model, [prefix_token_id, *ids], length + 1, length)
    partial = count % length
    total, scored = sliding_window_nll(model, [prefix_token_id, *ids[: count - partial]], length + 1, length)
    if partial:
        last = ids[count - length - 1 :]
        with_all, n_all = sliding_window_nll(model, last, length + 1, length + 1)
        without, n_without = sliding_window_nll(model, last[: length + 1 - partial], length + 1, length + 1)
        total, scored = total + with_all - without, scored + n_all - n_without
    return total, scored


def load_tasks(lm_eval: dict, data: dict, pipeline_files: dict[str, str], logger) -> list[tuple[dict, dict]]:
    """(configured task, lm-eval's loaded tasks) per configured task; data read now, no model yet."""
    specs = task_specs(lm_eval, data, pipeline_files)  # missing data: one sentence, nothing loaded yet
    manager = task_manager(include_defaults=needs_builtin_tasks(lm_eval))
    loaded = []
    for task, spec in specs:
        try:
            loaded.append((task, manager.load([spec])))
        except Exception as err:  # datasets raises many classes (connection, missing file, config)
            dataset = dataset_of(task["name"], spec)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskDataError(
                f"lm-eval task {task['name']!r}: data set {dataset} could not be loaded ({reason})"
            ) from err
        logger.info("task %s: %s", task["name"], ", ".join(sorted(loaded[-1][1]["tasks"])))
    return loaded


def tidy_rows(results: dict, task: dict, description: dict, fewshot_seed: int) -> list[dict]:
    """One row per (task or group, metric, filter) of lm-eval's results, with its stderr."""
    rows = []
    n_samples = results.get("n-samples", {})
    for name, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            # "metric,filter" keys only (alias, name and sample_len are not scores)
            if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            row = {column: description.get(column) for column in CSV_COLUMNS}
            row.update(
                task=name,
                metric=metric,
                filter=filter_name,
                value=float(value),
                stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                n_samples=_samples(name, results, n_samples),
                num_fewshot=results.get("n-shot", {}).get(name, task["num_fewshot"]),
                limit=task["limit"],
                fewshot_seed=fewshot_seed,
            )
            rows.append(row)
    return rows


def _samples(name: str, results: dict, n_samples: dict) -> int | None:
    """Documents scored: the task's own count, or its members' sum for a group."""
    if name in n_samples:
        return int(n_samples[name]["effective"])
    members = results.get("group_subtasks", {}).get(name, [])
    counts = [_samples(member, results, n_samples) for member in members]
    return sum(c for c in counts if c is not None) if counts else None


def main(
    model_dir: Path,
    description: dict,
    lm_eval: dict,
    data: dict,
    pipeline_files: dict[str, str],
    out_csv: Path,
    out_json: Path,
    adapter_dir: Path | None = None,
    compute_dtype: str = "auto",
    threads: int = 2,
    provenance_path: Path | None = None,
    log_path: Path | None = None,
) -> list[dict]:
    started = time.time()
    logger = setup_logging(log_path, "downstream")
    log_arguments(
        logger,
        model_dir=model_dir,
        description=description,
        adapter_dir=adapter_dir,
        lm_eval=lm_eval,
        pipeline_files=pipeline_files,
        compute_dtype=compute_dtype,
        threads=threads,
    )
    torch.set_num_threads(threads)
    loaded = load_tasks(lm_eval, data, pipeline_files, logger)  # before the model: data problems fail fast

    import lm_eval as harness
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from modeling import resolve_compute_dtype

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = perplexity.load_model(
        model_dir,
        description["precision"],
        resolve_compute_dtype(compute_dtype),
        description.get("quant_type") or "nf4",
        bool(description.get("double_quant")),
        adapter_dir,
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm_eval["batch_size"], max_length=lm_eval["max_length"])
    rows, raw = [], {}
    for task, tasks in loaded:
        results = harness.simple_evaluate(
            model=lm,
            tasks=[*tasks["groups"].values()] or [*tasks["tasks"].values()],
            num_fewshot=task["num_fewshot"],
            limit=task["limit"],
            bootstrap_iters=lm_eval["bootstrap_iters"],
            fewshot_random_seed=lm_eval["fewshot_seed"],
            log_samples=False,
            task_manager=task_manager(include_defaults=needs_builtin_tasks(lm_eval)),
        )
        raw[task["name"]] = {k: v for k, v in results.items() if k != "samples"}
        rows += tidy_rows(results, task, description, lm_eval["fewshot_seed"])
    for row in rows:
        logger.info("%s %s (%s): %.6g ± %s", row["task"], row["metric"], row["filter"], row["value"], row["stderr"])
    if not rows or not all(math.isfinite(r["value"]) for r in rows):
        raise RuntimeError(f"lm-eval returned no finite scores for {description['model']}: see {log_path}")
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with Path(out_csv).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    Path(out_json).write_text(json.dumps(raw, indent=2, default=str) + "\n")
    if provenance_path:
        write_provenance(
            provenance_path,
            "downstream",
            started,
            description=description,
            lm_eval=lm_eval,
            lm_eval_version=importlib.metadata.version("lm_eval"),
            max_length=lm.max_length,
            prefix_token_id=lm.prefix_token_id,
        )
    return rows


def _from_snakemake(smk) -> None:
    started = time.time()
    main(
        model_dir=Path(smk.input.model_dir),
        description=dict(smk.params.description),
        lm_eval=smk.params.lm_eval,
        data=smk.params.data,
        pipeline_files={name: str(getattr(smk.input, f"data_{name}")) for name in smk.params.pipeline_data},
        out_csv=Path(smk.output.table),
        out_json=Path(smk.output.results),
        adapter_dir=Path(smk.input.adapter_dir) if "adapter_dir" in smk.input.keys() else None,
        compute_dtype=smk.params.compute_dtype,
        threads=smk.threads,
        provenance_path=Path(smk.output.provenance),
        log_path=Path(smk.log[0]),
    )
    write_manifest(smk, "downstream", started)


def _run_from_snakemake(smk) -> None:
    """One sentence, not a traceback, when a task's data cannot be had."""
    try:
        _from_snakemake(smk)
    except TaskDataError as err:
        raise SystemExit(str(err)) from None


def cli_main(config: dict, model_dir: Path, data_dir: Path, out_dir: Path, adapter_dir=None, precision="16bit"):
    """main() for the command line: settings from a pipeline config, one sentence on bad data."""
    try:
        return main(
            model_dir,
            {"model_kind": "cli", "model": str(model_dir), "precision": precision},
            settings(config),
            config["data"],
            {"wikitext": str(Path(data_dir) / "wikitext.txt")},
            Path(out_dir) / "downstream.csv",
            Path(out_dir) / "downstream.json",
            adapter_dir,
            config["train"]["compute_dtype"],
        )
    except TaskDataError as err:
        raise SystemExit(str(err)) from None


if "snakemake" in globals():  # run by Snakemake's script directive
    _run_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="pipeline config (evaluate.lm_eval, data)")
    perplexity.add_model_arguments(parser)
    a = parser.parse_args()
    cli_main(yaml.safe_load(a.config.read_text()), a.model_dir, a.data_dir, a.out_dir, a.adapter_dir, a.precision)
