"""The batch a recorded step takes (scripts/cuda_graphs.py): its keys, the right-padded layout
under which the padding mask can stay out of the graph, and padding further to a coarser shape
(train.cuda_graphs_coarse_multiple) with the same numbers."""

import torch

GRAPH_KEYS = {"input_ids", "attention_mask", "labels"}
# what a batch padded further on the right holds there (cuda_graphs_coarse_multiple): masked out
# of attention's mask and of the loss, as the collator's own padding is
PAD_FILL = {"input_ids": 0, "attention_mask": 0, "labels": -100}


def right_padded(inputs: dict) -> bool:
    """Every row's mask is ones then zeros, and every masked position has label -100."""
    mask, labels = inputs["attention_mask"], inputs["labels"]
    ordered = (mask[:, 1:] <= mask[:, :-1]).all()
    return bool(ordered & ((mask == 1) | (labels == -100)).all())


def padded_to(inputs: dict, seq: int) -> dict:
    """The batch's graph inputs padded further on the right to ``seq`` positions (PAD_FILL): the
    same loss and gradients, the positions added masked as the collator's padding is."""
    extra = seq - inputs["input_ids"].shape[-1]
    if extra <= 0:
        return inputs
    return {
        name: torch.nn.functional.pad(value, (0, extra), value=PAD_FILL[name]) if name in GRAPH_KEYS else value
        for name, value in inputs.items()
    }
