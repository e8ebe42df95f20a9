"""What the training step needs to know of each batch, read by the collator while the batch is
still in host memory (scripts/recipe.py wraps the trainer's collator in HostFacts): read from the
batch's GPU copy, each was a device sync per step (tests/test_cuda_graphs.py counts them)."""

import dataclasses

from graph_inputs import right_padded

HOST_FACTS = "host_facts"  # the batch key HostFacts adds and the trainer's step removes


@dataclasses.dataclass(frozen=True)
class BatchFacts:
    tokens: int  # non-padding tokens (the Trainer's num_input_tokens_seen)
    right_padded: bool  # the layout a recorded step needs (graph_inputs.right_padded)


class HostFacts:
    """The collator, with the batch's BatchFacts under HOST_FACTS where it has a mask and labels."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        batch = self.collate(examples)
        if "attention_mask" in batch and "labels" in batch:
            batch[HOST_FACTS] = BatchFacts(int(batch["attention_mask"].sum()), right_padded(batch))
        return batch
