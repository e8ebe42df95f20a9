"""The pipeline's SFTTrainer (scripts/recipe.py builds it in ``make_trainer``).

TRL's SFTTrainer with the pipeline's corrections: the same example order for any process count,
the per-batch checkpointing plan, TRL 1.16's token metrics kept on the device until a log line
needs them (``train.defer_metric_sync``), an eager forward without the padding mask's host read
(``train.sync_free_forward``), each micro-batch's loss kept on the device, and with
``train.cuda_graphs`` each batch shape's step replayed from its recording (scripts/cuda_graphs.py).
Imported when a trainer is built: importing TRL takes seconds.
"""

import functools

import torch
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

import python_gc
from checkpointing import CheckpointPlan
from graph_attention import forward_as_recorded
from host_facts import HOST_FACTS


class PipelineSFTTrainer(SFTTrainer):
    """Orders the examples by the global batch and a seeded generator, so N data-parallel
    processes see, step by step, the examples one process sees with N x the accumulation
    (transformers groups lengths by the per-process batch and draws from the global RNG)."""

    def __init__(
        self,
        *args,
        plan: CheckpointPlan | None = None,
        defer_metric_sync: bool = False,
        sync_free_forward: bool = False,
        gc_freeze: bool = False,
        **kwargs,
    ):
        self.metric_sync_deferred = defer_metric_sync  # TRL 1.16's loss mirrored, its metrics kept on the device
        self.sync_free_forward = sync_free_forward  # an eager forward as a recorded one (graph_attention)
        self.gc_freeze = gc_freeze  # python_gc.during_training
        self.plan = plan  # the per-batch checkpointing plan (scripts/checkpointing.py), or None
        super().__init__(*args, **kwargs)
        self._pending_metrics = []  # per step: TRL's metric tensors, read back at the next log
        self.graphs = None
        self.collections = None  # python_gc.CollectionTimes of the last train()
        self.step_losses = []  # each micro-batch's loss, on the device (read with step_losses_on_host)
        self._host_facts = None  # the current batch's BatchFacts

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if isinstance(sampler, LengthGroupedSampler):
            sampler.batch_size = (
                self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            )
            sampler.generator = torch.Generator().manual_seed(seed)
        elif isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(seed)
        return sampler

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._host_facts = inputs.pop(HOST_FACTS, None)
        loss = self._training_step(model, inputs, num_items_in_batch)
        self.step_losses.append(loss.detach())
        return loss

    def _training_step(self, model, inputs, num_items_in_batch):
        if self.graphs is None:
            if self.plan is not None:
                self.plan.apply(inputs["input_ids"])
            return super().training_step(model, inputs, num_items_in_batch)
        batch, seq = inputs["input_ids"].shape[0], inputs["input_ids"].shape[-1]
        checkpointed = self.plan is not None and bool(self.plan.layers_for(batch, seq))
        model.train()
        inputs = self._prepare_inputs(inputs)
        loss_fn = functools.partial(self._graph_loss, model)
        layout = self._host_facts is not None and self._host_facts.right_padded  # None: no mask, no labels
        replayed = self.graphs.step(inputs, num_items_in_batch, loss_fn, checkpointed, layout)
        if replayed is not None:  # its recording set the plan's layers (GraphedSteps.prepare)
            if self.plan is not None:
                self.plan.count(batch, seq)
            loss, metrics = replayed
            self._pending_metrics.append(metrics)
            return loss
        with self.graphs.exclusive():  # the model is the recorder thread's while it records
            if self.plan is not None:
                self.plan.apply(inputs["input_ids"])
            return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        with python_gc.during_training(self.gc_freeze) as self.collections:
            try:
                return super().train(*args, **kwargs)
            finally:
                if self.graphs is not None:
                    self.graphs.stop()  # no recording beside what the caller does with the model next

    def _save_checkpoint(self, model, trial):
        if self.graphs is None:
            return super()._save_checkpoint(model, trial)
        with self.graphs.exclusive():  # the RNG state it saves, never a background recording's
            return super()._save_checkpoint(model, trial)

    def _track_num_input_tokens(self, inputs):
        """The collator's count (HostFacts), where the Trainer would read it from the GPU."""
        facts, counts = self._host_facts, self.args.include_num_input_tokens_seen
        if facts is None or counts != "non_padding" or self.args.world_size > 1:
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += facts.tokens

    def step_losses_on_host(self) -> list[float]:
        """Every micro-batch's loss so far, in one read (a log line averages logging_steps of them)."""
        return torch.stack(self.step_losses).float().tolist() if self.step_losses else []

    def _graph_loss(self, model, static: dict):
        """The deferred branch below on fixed buffers, without the padding mask (see cuda_graphs)."""
        with self.compute_loss_context_manager(), forward_as_recorded():
            outputs = model(input_ids=static["input_ids"], labels=static["labels"], use_cache=False, fused_lm_head=True)
            num_tokens = static["num_items"] if "num_items" in static else outputs.label_mask.sum()
            loss = -outputs.log_probs.sum() / num_tokens.clamp(min=1)
        mask = static["attention_mask"]
        return loss, (outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum(), mask.sum())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.metric_sync_deferred and self._plain_training_loss(inputs, return_outputs)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL 1.16's plain branch, word for word, with its metrics kept as tensors.
        inputs["use_cache"] = False
        facts = self._host_facts
        if self.sync_free_forward and facts is not None and facts.right_padded and "position_ids" not in inputs:
            with forward_as_recorded():  # the padding mask stays for the token count below
                outputs = model(**{k: v for k, v in inputs.items() if k != "attention_mask"}, fused_lm_head=True)
        else:
            outputs = model(**inputs, fused_lm_head=True)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        gather = self.accelerator.gather_for_metrics
        self._pending_metrics.append(
            (
                gather(outputs.label_mask.sum()).sum(),
                gather(outputs.entropy.detach().sum()).sum(),
                gather(outputs.is_top1.sum()).sum(),
                gather(inputs["attention_mask"].sum()).sum(),
            )
        )
        return loss

    def _plain_training_loss(self, inputs, return_outputs) -> bool:
        return (
            self.model.training
            and not return_outputs
            and "attention_mask" in inputs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and self.args.loss_type == "nll"
            and getattr(self.accelerator, "parallelism_config", None) is None
        )

    def log(self, logs, start_time=None):
        metrics = self._metrics["train"]
        for num_valid, entropy_sum, num_correct, num_tokens in self._pending_metrics:  # as TRL computes them
            metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
            self._total_train_tokens += num_tokens.item() // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
        self._pending_metrics.clear()
        super().log(logs, start_time)
