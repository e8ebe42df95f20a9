"""A Llama-family decoder's shape, from its ``config.json``: the sizes the memory model
(scripts/memory_model.py) counts in, and the LoRA target sets the grid names."""

import json
from dataclasses import dataclass
from pathlib import Path

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"qv": ("q_proj", "v_proj"), "all_linear": LINEAR_MODULES}
# Modules reading the same input tensor (a folded LoRA dropout keeps it once for all of them).
INPUT_GROUPS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict | str | Path) -> "ModelShape":
        """From a Hugging Face ``config.json`` (a dict, a file or a model folder)."""
        if not isinstance(config, dict):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(in, out) features of one decoder layer's linear module."""
        h, kv, i = self.hidden, self.kv_hidden, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    def linear_parameters(self) -> int:
        return self.layers * sum(a * b for a, b in map(self.linear_shape, LINEAR_MODULES))

    def other_parameters(self) -> int:
        """Embeddings, head (unless tied) and norms: never quantised."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden


def lora_parameters(shape: ModelShape, rank: int, targets: str) -> int:
    return shape.layers * sum(rank * sum(shape.linear_shape(m)) for m in TARGETS[targets])
