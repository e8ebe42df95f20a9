"""The training recipe: how a cell's model and trainer are built (the train stage and the
GPU benches import this one module).

- Model: the base in its arm's precision (modeling.load_base_model), optional fused kernels
  (``train.kernels``) and NF4 dequantisation kernel (``train.dequantize``, scripts/nf4_dequantize.py),
  the cell's initial adapter, gradient checkpointing layer by layer, optionally each decoder
  layer compiled (``train.compile``).
- Checkpointing (scripts/checkpointing.py): ``true`` = every ``checkpoint_every``-th layer;
  ``auto`` = the memory model's fastest plan that fits ``memory_budget_gib``, re-planned for
  each batch's padded length, so short batches skip the recomputation only long ones need.
- Trainer (``make_trainer``; the subclass in scripts/sft_trainer.py): TRL's SFTTrainer with
  the same example order in every arm and process count, fp32 adapters in both arms, and TRL's
  per-step token metrics (entropy, accuracy, token count) kept on the GPU until a log line
  needs them: three host syncs fewer per step, the same logged values
  (``train.defer_metric_sync``); optionally each step's forward and backward replayed from a
  CUDA graph (``train.cuda_graphs``, scripts/cuda_graphs.py).
- No host sync per step: TRL's metrics as above; the batch's token count and layout read on
  the host before it moves (HostFacts); batches copied asynchronously from pinned memory; no
  NaN filter on the loss (a NaN loss is logged as NaN); each step's loss kept on the GPU
  (``step_losses``). With ``train.optimizer: adamw_torch_fused`` (bitsandbytes' optimizers
  synchronise the device after every parameter) the host queues the next step while the GPU
  runs this one; only a log line (``train.logging_steps``) waits for it.
"""

import dataclasses
import logging
from pathlib import Path

import torch
from lora_addmm import fuse_lora_add

import preemption
from checkpointing import CheckpointPlan, decoder_layers, enable_checkpointing
from cuda_graphs import GraphedSteps
from graph_recorder import Recorder, padded_shapes
from host_facts import HostFacts
from lora_dropout import recompute_lora_dropout, recompute_needs_rng
from memory_model import GIB
from memory_plan import plan_for_cell
from modeling import apply_kernels, load_base_model, resolve_compute_dtype
from nf4_dequantize import install as install_dequantize
from train_metrics import memory_stats

CUDA_ONLY_OPTIMIZERS = {"paged_adamw_32bit", "paged_adamw_8bit"}


def choose_optimizer(requested: str, logger) -> str:
    if requested in CUDA_ONLY_OPTIMIZERS and not torch.cuda.is_available():
        logger.warning("optimizer %s needs CUDA; falling back to adamw_torch on the CPU", requested)
        return "adamw_torch"
    return requested


def sft_config(
    train: dict,
    cell: dict,
    checkpoint_dir: Path,
    compute_dtype: torch.dtype,
    optimizer: str,
    max_length: int,
    logger,
    autocast: bool = True,
    run_name: str | None = None,
):
    """SFTConfig from the config's train section; options this transformers lacks are logged, not lost silently.

    autocast=False reproduces the tutorial (fp16=bf16=False); it must be set here, not on the
    finished SFTConfig, whose __post_init__ already told accelerate the mixed precision."""
    from trl import SFTConfig

    import trackers

    wanted = dict(
        output_dir=str(checkpoint_dir),
        num_train_epochs=train["epochs"],
        max_steps=train["max_steps"],
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        optim=optimizer,
        learning_rate=cell["learning_rate"],
        lr_scheduler_type=train["lr_scheduler"],
        warmup_steps=train["warmup_ratio"],  # transformers 5: a float below 1 is a ratio
        max_grad_norm=train["max_grad_norm"],
        weight_decay=train["weight_decay"],
        train_sampling_strategy="group_by_length" if train["group_by_length"] else "random",
        gradient_checkpointing=False,  # enabled layer by layer in prepare_model
        bf16=autocast and compute_dtype == torch.bfloat16,
        fp16=autocast and compute_dtype == torch.float16,
        logging_steps=train["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train["save_steps"],
        save_total_limit=2,
        seed=cell["seed"],
        data_seed=cell["seed"],
        max_length=max_length,
        dataset_text_field="text",
        packing=False,
        pad_to_multiple_of=train["pad_to_multiple_of"],
        include_num_input_tokens_seen="non_padding",
        report_to=trackers.trainer_report_to(train),  # train.report_to (scripts/trackers.py)
        run_name=run_name,
        disable_tqdm=True,
        # a NaN loss is logged as NaN, not replaced by the running mean: the filter reads every
        # step's loss on the host (a device sync per step)
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient each step
        use_cpu=not torch.cuda.is_available(),
    )
    if torch.cuda.is_available():  # batches (pinned: the Trainer's default) copied without waiting for the GPU
        wanted["accelerator_config"] = {"non_blocking": True}
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    dropped = sorted(set(wanted) - known)
    if dropped:
        logger.warning("this transformers/TRL has no %s; running without", dropped)
    return SFTConfig(**{k: v for k, v in wanted.items() if k in known}), dropped


def compile_layers(model) -> int:
    """torch.compile every decoder layer with dynamic shapes: one graph serves every layer
    and every padded length, with the layer's elementwise work fused into few kernels
    (fewer launches: the small-batch step is bound by them, not by arithmetic)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def prepare_model(model_dir: Path, cell: dict, train: dict, init_adapter_dir: Path, max_length: int, logger):
    """The trainable PEFT model of one cell and what was decided on the way.

    The train rule and the benches (bench/gpu_recipes.py, bench/epochs.py) build their model here."""
    from peft import PeftModel

    compute_dtype = resolve_compute_dtype(train["compute_dtype"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_base_model(model_dir, cell["method"], compute_dtype, cell["quant_type"], cell["double_quant"])
    details = {
        "compute_dtype": compute_dtype,
        "model_footprint_bytes": model.get_memory_footprint(),
        **memory_stats("load"),
        "kernels": apply_kernels(model, train["kernels"], logger),
        "kernels_requested": train["kernels"],
        # the same values bit for bit (tests/test_nf4_dequantize.py); what ran, or why not
        "dequantize": install_dequantize(logger) if train.get("dequantize") == "triton" else "bitsandbytes",
    }
    model = PeftModel.from_pretrained(model, str(init_adapter_dir), is_trainable=True)
    model.train()  # gradient checkpointing silently does nothing in eval mode
    # train.recompute_lora_dropout: the same numbers, 0.47 GiB less at 1,024 tokens (7B, q/v)
    details["folded_lora_dropouts"] = recompute_lora_dropout(model) if train.get("recompute_lora_dropout") else 0
    # train.fuse_lora_add: LoRA's product added to the base output by one addmm (scripts/lora_addmm.py)
    details["fused_lora_adds"] = fuse_lora_add(model) if train.get("fuse_lora_add") else 0
    every, prediction = plan_for_cell(model_dir, cell, train, max_length, details["kernels"])
    per_batch = train["gradient_checkpointing"] == "auto"
    details["checkpoint_every"] = every
    details["checkpoint_per_batch"] = per_batch
    offload = bool(train.get("offload_checkpoints", False))
    multiple = train.get("pad_to_multiple_of") or 1
    longest = train["batch_size"] * -(-max_length // multiple) * multiple  # tokens of the longest batch
    prefetch = bool(train.get("offload_prefetch", True))
    details["checkpointed_layers"] = enable_checkpointing(model, every, per_batch, offload, longest, prefetch)
    details["offloaded_checkpoints"] = offload
    details["offload_prefetch"] = offload and prefetch
    details["predicted_host_offload_bytes"] = prediction["host_offload"]
    details["predicted_peak_bytes"] = prediction["total"]
    details["predicted_paged_optimizer_bytes"] = prediction["paged_optimizer"]
    details["compiled_layers"] = compile_layers(model) if train.get("compile", False) else 0
    logger.info(
        "gradient checkpointing: every %s layer(s) (%d checkpointed)%s%s; predicted peak %.2f GiB; "
        "%d layers compiled; %d LoRA dropouts folded, %d LoRA adds fused",
        every or "no",
        details["checkpointed_layers"],
        ", re-planned per batch length" if per_batch else "",
        f", inputs in host memory ({prediction['host_offload'] / GIB:.2f} GiB)" if offload else "",
        prediction["total"] / GIB,
        details["compiled_layers"],
        details["folded_lora_dropouts"],
        details["fused_lora_adds"],
    )
    return model, details


def graphs_off_reason(args, checkpoint_every: int, deferred: bool, recompute_rng: bool = True) -> str | None:
    """Why ``train.cuda_graphs`` cannot serve this run (None: it can). ``recompute_rng``: a
    checkpointed layer's recomputation replays random numbers (an unfolded dropout), which
    needs the RNG state read and set on the host: no recording holds that."""
    if not deferred:
        return "the graph step mirrors TRL 1.16's loss (defer_metric_sync true, TRL 1.16)"
    if args.world_size > 1:
        return "one process only (data-parallel gradient hooks are not recorded)"
    if args.fp16:
        return "fp16 needs a loss scaler between forward and backward"
    if checkpoint_every and recompute_rng:
        return (
            f"the memory budget needs checkpointing (every {checkpoint_every}) at the longest batch, whose "
            "recomputation replays random numbers (a dropout not folded: train.recompute_lora_dropout)"
        )
    return None


def skip_final_checkpoint():
    """A Trainer callback: no checkpoint after the last step. The Trainer saves one there
    (save_strategy "steps", since transformers#30160 in 2024: the 2023 tutorial's trainer did not),
    and the train stage deletes the cell's checkpoints once its adapter is written: that save (the
    adapter, the optimizer's state, the tokenizer; 0.42-0.59 s of a 39-40 s batch-4 epoch on one
    H200, bench/results/epochs_h200_outside) only delayed the outputs. A save Slurm's warning asked
    for at that step stays (preemption.save_on_warning)."""
    from transformers import TrainerCallback

    class SkipFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and not preemption.stopped_at(state.global_step):
                control.should_save = False
            return control

    return SkipFinalCheckpoint()


def make_trainer(
    model,
    tokenizer,
    dataset,
    args,
    train: dict,
    callbacks: list,
    plan: CheckpointPlan | None = None,
    checkpoint_every: int = 0,
):
    """SFTTrainer with the pipeline's corrections: adapters stay fp32 in both arms, the same
    example order for any process count, an optional padding-free collator, the per-batch
    checkpointing plan, TRL's token metrics synced only when logged, and with
    ``train.cuda_graphs`` each batch shape's step recorded once and replayed
    (``checkpoint_every``: the plan at the longest batch; graphs record checkpointed layers
    only where their recomputation draws no random numbers: folded LoRA dropouts)."""
    import trl
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_trainer import PipelineSFTTrainer

    # PipelineSFTTrainer.compute_loss mirrors TRL 1.16's; other TRL versions keep their own.
    defer = train.get("defer_metric_sync", True) and trl.__version__.startswith("1.16.")
    trainer = PipelineSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        plan=plan,
        defer_metric_sync=defer,
        sync_free_forward=train.get("sync_free_forward", False),
        gc_freeze=train.get("gc_freeze", False),
    )
    trainer.add_callback(skip_final_checkpoint())  # after the Trainer's own, which asks for that save
    # TRL casts a quantised model's adapters to bf16 (and not a 16-bit one's): that would make
    # the arms differ in more than the base's precision, so both keep PEFT's fp32 adapters.
    for parameter in trainer.model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    if train.get("cuda_graphs", False):
        recompute_rng = recompute_needs_rng(trainer.model)
        off = graphs_off_reason(args, checkpoint_every, defer, recompute_rng)
        trainer.graphs = GraphedSteps(
            trainer.model.parameters(),
            off,
            logging.getLogger("recipe"),
            # an unfolded dropout: the recomputation reads and sets the RNG state on the host
            "checkpointed batch (its recomputation replays random numbers)" if recompute_rng else None,
            train.get("cuda_graphs_max_tokens"),
            train.get("cuda_graphs_attention", "cudnn"),
            train.get("cuda_graphs_capture", "synchronized"),
            train.get("cuda_graphs_coarse_multiple"),
            train.get("cuda_graphs_coarse_steps", 100),
        )
        trainer.graphs.prepare = plan.select if plan is not None else None
        if trainer.graphs.capture == "ahead" and not train["padding_free"]:  # the shapes this epoch's rows make
            lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
            batch, coarse = args.per_device_train_batch_size, train.get("cuda_graphs_coarse_multiple")
            shapes = padded_shapes(lengths, batch, train["pad_to_multiple_of"], args.max_length)
            if coarse:  # the coarse shapes first: the epoch's first batches replay them
                first = padded_shapes(lengths, batch, coarse, args.max_length)
                shapes = first + [shape for shape in shapes if shape not in first]
            loop_ahead = train.get("cuda_graphs_loop_ahead", 0)
            trainer.graphs.recorder = Recorder(trainer.graphs, shapes, loop_ahead)
    if plan is not None and (trainer.graphs is None or trainer.graphs.off_reason):
        plan.without_recordings()  # the eager step's budget
    if train["padding_free"]:
        # Sequences concatenated into one row with restarting position_ids: transformers
        # masks attention per example, so the maths is that of the padded batch.
        trainer.data_collator = DataCollatorForLanguageModeling(
            pad_token_id=tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=train["pad_to_multiple_of"]
        )
    trainer.data_collator = HostFacts(trainer.data_collator)
    return trainer
