"""The learned part of the scoring rule (``model.head``): the dialogue-evidence weights and the generality.

The rule itself (cosine + w·features + weight·g(s)) is :mod:`replugchar.core.scoring`, shared with the exported
:class:`~replugchar.retrieval.retriever.Retriever`; this module holds the trainable numbers and their options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.options import check_ranges
from ..core.scoring import FEATURES, generality_of, query_weight, score_settings


@dataclass(frozen=True)
class HeadOptions:
    """What the scoring head of ``fit`` learns beside (or, with ``model.freeze_encoder``, instead of) the encoder."""

    dialogue_features: bool = True
    """Learn the dialogue-evidence weights of :mod:`replugchar.core.scoring` (similarity of each setting to the
    character's own and the partner's earlier turns); false: no head, the rule is plain similarity."""
    history_window: int = 16
    """Turns of the session before the query that the dialogue features read."""
    generality: bool = False
    """Also learn the generality g(s) = v·e_s of each setting from its embedding (one weight per dimension, so it
    carries to characters never seen) and its per-query weight (a gate on the query's best similarity and on an
    empty history): the term that can lift "cheerful with everyone" for "Hello!". Needs ``dialogue_features``."""
    generality_l2: float = 0.05
    """Penalty on ||v||² added to the loss: v has as many weights as the embedding has dimensions and learns from
    a few hundred greetings."""
    learning_rate: float = 0.05
    """AdamW learning rate of the head (its few weights need a far larger one than the encoder's), no decay."""

    def __post_init__(self) -> None:
        checks = {
            "history_window": self.history_window >= 0,
            "generality_l2": self.generality_l2 >= 0,
            "learning_rate": self.learning_rate > 0,
        }
        check_ranges("model.head", self, checks)
        if self.generality and not self.dialogue_features:
            raise ValueError(
                "model.head.generality: true needs model.head.dialogue_features: true (the head holds it)"
            )


class DialogueHead(torch.nn.Module):
    """The learned numbers of the scoring rule: the dialogue-evidence weights w (one per
    :data:`~replugchar.core.scoring.FEATURES`) and, with ``dim``, the generality vector v of g(s) = v·e_s with
    its per-query weight λ + gate·(best cosine, empty history).

    w and v start at zero, so training begins from plain similarity; λ starts at 1 so that v gets a gradient
    (with v = 0 the score does not depend on λ or the gate, so this changes nothing at the start)."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.zeros(len(FEATURES)))
        self.generality = torch.nn.Parameter(torch.zeros(dim)) if dim else None
        self.prior_weight = torch.nn.Parameter(torch.tensor(1.0)) if dim else None
        self.gate = torch.nn.Parameter(torch.zeros(2)) if dim else None

    def forward(
        self,
        sim: Tensor,
        features: Tensor,
        settings: Tensor | None = None,
        mask: Tensor | None = None,
        history_empty: Tensor | None = None,
    ) -> Tensor:
        """(batch, k) scores from cosines (batch, k), features (batch, k, F) and, for the generality term, the
        candidates' embeddings (batch, k, d), their mask (batch, k) and (batch,) bools: no history yet."""
        if self.generality is None or settings is None:
            return score_settings(sim, features, self.weights)  # (batch, k)
        g = generality_of(settings, self.generality)  # (batch, k)
        best = sim.detach().masked_fill(~mask, float("-inf")).max(-1).values  # (batch,)
        weight = query_weight(best, history_empty, self.prior_weight, self.gate)  # (batch,)
        return score_settings(sim, features, self.weights, g, weight)
