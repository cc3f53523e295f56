"""The optimiser options ``fit`` and ``finetune-lm`` share (``model.optimizer``): AdamW and a linear warmup."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.options import check_ranges


@dataclass(frozen=True)
class OptimizerOptions:
    """AdamW over the trainable weights, after a linear learning-rate warmup. ``fit`` keeps the rate constant
    after the warmup (its scoring head has a rate of its own, ``model.head.learning_rate``); ``finetune-lm``
    decays it linearly to 0 at the last step."""

    learning_rate: float = 1e-4
    """AdamW (peak) learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup from 0."""

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": 0 < self.learning_rate < float("inf"),
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
        }
        check_ranges("model.optimizer", self, checks)

    def warmup(self, step: int) -> float:
        """Learning-rate factor at ``step`` (from 0): rises linearly to 1 over ``warmup_steps``, then 1."""
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
