"""The one scoring rule of a character's settings for a dialogue turn, used by training, ``Retriever``, ``chat``
and evaluation alike.

.. math::
    \\mathrm{score}(s) = \\cos(q, s) + \\sum_f w_f\\,\\phi_f(s \\mid h) + \\lambda\\,g(s)

* ``cos(q, s)``: the bi-encoder similarity of the query (the partner's last utterance) and the setting;
* ``φ_f(s | h)``: dialogue evidence from the session so far ``h`` (the last ``history_window`` turns before the
  query), read with the same encoder: how close ``s`` is to what the character itself already said
  (``own_max``: the closest own turn, ``own_last``: its latest turn) and to what the partner said
  (``partner_max``, ``partner_last``). 0 when there is no such turn;
* ``g(s)``: the generality prior (z-normalised per character, see :mod:`replugchar.training.priors`), weight λ.

Why features and not history in the query text: a bi-encoder that sees the history *raises* the similarity of
settings the character already voiced, whereas in human dialogues (ConvAI2) those are rarely what the next reply
needs, and in LLM-written dialogues (Synthetic-Persona-Chat) they often are. Only a learned, signed weight can
express both, and a handful of weights learns from a few hundred turns where a 22M-parameter encoder cannot.
All ``w = 0`` and ``λ = 0`` is plain similarity retrieval, exactly what the FAISS index computes for an empty
history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

FEATURES = ("own_max", "own_last", "partner_max", "partner_last")
"""Dialogue features, in the order of :attr:`ScoringRule.weights`."""


@dataclass(frozen=True)
class ScoringRule:
    """The learned and fitted numbers of the rule; stored in ``retriever.json`` under ``"scoring"``.

    Args:
        weights: one weight per :data:`FEATURES` entry (negative = the evidence makes a setting less likely
            to be what the next reply needs).
        prior_weight: λ, the weight of the generality prior.
        threshold: relevance threshold τ on the score; settings under it are not retrieved (None or -inf:
            keep all).
        history_window: how many turns before the query the features look at.
        generality: the learned generality g(s) = v·e_s as the vector v (one number per embedding dimension;
            empty = none). It is a function of the setting's text alone, so it carries to characters the
            retriever never saw; the index stores G(s) = prior(s) + g(s) as its prior coordinate.
        gate: how much the query says decides how much generality counts: the prior term's weight per query is
            ``prior_weight + gate[0]·max_s cos(q, s) + gate[1]·[no history yet]``. (0, 0) = a constant λ.
    """

    weights: tuple[float, ...] = field(default_factory=lambda: (0.0,) * len(FEATURES))
    prior_weight: float = 0.0
    threshold: float | None = None
    history_window: int = 16
    generality: tuple[float, ...] = ()
    gate: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.weights) != len(FEATURES):
            raise ValueError(f"scoring weights need {len(FEATURES)} values ({', '.join(FEATURES)})")
        if len(self.gate) != 2:
            raise ValueError(f"gate needs 2 values (best similarity, empty history), got {len(self.gate)}")
        numbers = [*self.weights, self.prior_weight, *self.gate, *self.generality]
        if not all(np.isfinite(numbers)):
            raise ValueError(f"scoring weights and prior_weight must be finite, got {numbers}")
        if self.threshold is not None and (np.isnan(self.threshold) or self.threshold == np.inf):
            raise ValueError(f"threshold must be a number (or -inf to keep all), got {self.threshold}")
        if self.history_window < 0:
            raise ValueError(f"history_window must be >= 0, got {self.history_window}")

    @classmethod
    def from_dict(cls, d: dict) -> ScoringRule:
        """The rule as stored in retriever.json, checked whole: a misspelled key or feature name, a missing
        weight or a value of the wrong type is an error, never a silent 0 (that would turn the learned rule
        into plain similarity)."""
        if not isinstance(d, dict):
            raise ValueError(f"the scoring rule must be an object, got {type(d).__name__}")
        known = tuple(cls.__dataclass_fields__)
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        missing = [k for k in ("weights", "prior_weight", "threshold", "history_window") if k not in d]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(map(repr, missing))}")
        weights = d["weights"]
        if isinstance(weights, dict):
            if set(weights) != set(FEATURES):
                odd = sorted(set(weights) ^ set(FEATURES))
                raise ValueError(
                    f"weights must name exactly the features {', '.join(FEATURES)}; "
                    f"unknown or missing: {', '.join(odd)}"
                )
            weights = [weights[f] for f in FEATURES]
        if (
            not isinstance(weights, list | tuple)
            or len(weights) != len(FEATURES)
            or not all(map(_number, weights))
        ):
            raise ValueError(
                f"weights must be {len(FEATURES)} numbers ({', '.join(FEATURES)}), got {weights!r:.80}"
            )
        if not _number(d["prior_weight"]):
            raise ValueError(f"prior_weight must be a number, got {d['prior_weight']!r:.40}")
        tau = d["threshold"]
        if tau is not None and not (_number(tau) or tau == float("-inf")):
            raise ValueError(f"threshold must be a number or null, got {tau!r:.40}")
        hw = d["history_window"]
        if not isinstance(hw, int) or isinstance(hw, bool):
            raise ValueError(f"history_window must be an integer, got {hw!r:.40}")
        extra = {}
        for key, size in (("generality", None), ("gate", 2)):
            if key in d:
                vals = d[key]
                if not isinstance(vals, list | tuple) or not all(map(_number, vals)):
                    raise ValueError(f"{key} must be a list of numbers, got {vals!r:.60}")
                if size is not None and len(vals) != size:
                    raise ValueError(f"{key} must have {size} numbers, got {len(vals)}")
                extra[key] = tuple(float(v) for v in vals)
        return cls(
            weights=tuple(float(w) for w in weights),
            prior_weight=float(d["prior_weight"]),
            threshold=None if tau is None else float(tau),
            history_window=hw,
            **extra,
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["weights"] = dict(zip(FEATURES, self.weights))
        return out

    @property
    def uses_generality(self) -> bool:
        return any(v != 0 for v in self.generality)

    @property
    def uses_gate(self) -> bool:
        return any(g != 0 for g in self.gate)

    def without_generality(self) -> ScoringRule:
        """Today's rule (dialogue evidence and a constant λ on the imported prior): the baseline a fitted
        generality must never be worse than."""
        return dataclasses.replace(self, generality=(), gate=(0.0, 0.0))

    @property
    def uses_history(self) -> bool:
        return any(w != 0 for w in self.weights) and self.history_window > 0


def _number(value) -> bool:
    """A JSON number: ``true`` is not 1.0 and ``"0.5"`` is not 0.5."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def window(history: Sequence, size: int) -> list:
    """The last ``size`` turns (``{"role", "text"}`` dicts or :class:`~replugchar.core.data.Turn`), oldest first."""
    return list(history)[-size:] if size > 0 else []


def turn_role(turn) -> str:
    role = turn["role"] if isinstance(turn, dict) else turn.role
    if role not in ("user", "character"):
        raise ValueError(f"history turn role must be 'user' or 'character', got {role!r}")
    return role


def turn_text(turn) -> str:
    return turn["text"] if isinstance(turn, dict) else turn.text


def dialogue_features(settings: Tensor, turns: Tensor, own: Tensor) -> Tensor:
    """(n, F) features of ``settings`` (n, d) given the embedded history ``turns`` (t, d), oldest first, and
    ``own`` (t,) bool: True for the character's own turns. Unit-norm embeddings: dot products are cosines."""
    n = settings.shape[0]
    out = settings.new_zeros((n, len(FEATURES)))
    if turns.shape[0] == 0:
        return out
    sims = settings @ turns.T  # (n, t)
    for col, mask in ((0, own), (2, ~own)):
        if mask.any():
            picked = sims[:, mask]  # (n, t_role)
            out[:, col] = picked.max(-1).values
            out[:, col + 1] = picked[:, -1]
    return out


def score_settings(
    sim: Tensor,
    features: Tensor,
    weights: Tensor,
    priors: Tensor | None = None,
    prior_weight: float | Tensor = 0.0,
) -> Tensor:
    """(..., n) scores from cosine similarities (..., n), features (..., n, F), weights (F,), priors G(s)
    (..., n) and the prior term's weight: a number, or one per query (...,) from :func:`query_weight`."""
    score = sim + features @ weights.to(features.dtype)
    if priors is not None:
        if isinstance(prior_weight, Tensor):
            score = score + prior_weight.unsqueeze(-1) * priors
        elif prior_weight:
            score = score + prior_weight * priors
    return score


def query_weight(
    best_sim: Tensor, history_empty: Tensor, prior_weight: float | Tensor, gate: Tensor
) -> Tensor:
    """(...,) weight of the prior term per query: λ + gate[0]·(the query's best cosine) + gate[1]·[no history].
    A greeting matches no setting well and opens a session: generality should count most there."""
    return prior_weight + gate[0] * best_sim + gate[1] * history_empty.to(best_sim.dtype)


def generality_of(settings: Tensor, vector: Sequence[float] | Tensor) -> Tensor:
    """(..., n) learned generality g(s) = v·e_s of unit-norm setting embeddings (..., n, d)."""
    v = torch.as_tensor(vector, dtype=settings.dtype, device=settings.device)
    return settings @ v


def rank_numpy(
    query: np.ndarray,
    settings: np.ndarray,
    turns: np.ndarray,
    own: Sequence[bool],
    rule: ScoringRule,
    priors: np.ndarray | None = None,
    history_empty: bool = True,
) -> np.ndarray:
    """NumPy front of the rule for inference: (n,) scores of unit-norm ``settings`` (n, d) for ``query`` (d,).
    ``priors`` is G(s), the whole prior coordinate (imported prior + learned generality)."""
    s = torch.from_numpy(np.asarray(settings, dtype=np.float32))
    q = torch.from_numpy(np.asarray(query, dtype=np.float32).reshape(-1))
    h = torch.from_numpy(np.asarray(turns, dtype=np.float32).reshape(-1, s.shape[1]))
    feats = dialogue_features(s, h, torch.as_tensor(list(own), dtype=torch.bool))
    p = None if priors is None else torch.from_numpy(np.asarray(priors, dtype=np.float32))
    w = torch.tensor(rule.weights, dtype=torch.float32)
    sim = s @ q  # (n,)
    weight = query_weight(
        sim.max(),
        torch.tensor(history_empty),
        rule.prior_weight,
        torch.tensor(rule.gate, dtype=torch.float32),
    )
    return score_settings(sim, feats, w, p, weight).double().numpy()
