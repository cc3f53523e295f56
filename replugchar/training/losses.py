"""The LM-supervised retrieval (LSR) loss of REPLUG (Shi et al., 2023, arXiv:2301.12652, Sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.options import check_ranges

Direction = Literal["lm_to_retriever", "retriever_to_lm"]
MIN_TEMPERATURE = 1e-4
"""Below this, scores/temperature overflow float32 for ordinary scores and both softmaxes are one-hot anyway."""


class LSRLoss(nn.Module):
    r"""KL divergence between the retriever's and the frozen LM's distributions over a query's k candidates.

    .. math::
        P_R(s_i \mid x) = \mathrm{softmax}_i(\mathrm{sim}(x, s_i) / \gamma), \qquad
        Q(s_i \mid x, y) = \mathrm{softmax}_i(\log P_{LM}(y \mid s_i, x) / \beta)

    ``direction="lm_to_retriever"`` (default) computes :math:`\mathrm{KL}(Q \,\|\, P_R)`; ``"retriever_to_lm"``
    computes :math:`\mathrm{KL}(P_R \,\|\, Q)` as written in the REPLUG paper. Both are summed over candidates
    and averaged over queries (``batchmean``: a per-element mean would shrink the loss with k).

    Why KL(Q‖P_R) by default: it is what the public implementations compute (Atlas, LLM-Embedder, and
    sentence-transformers' ``DistillKLDivLoss``, against which ``tests/test_losses.py`` pins it: ours equals
    theirs divided by γ², since they rescale by the student temperature squared). Its gradient w.r.t. the
    similarities is (P_R − Q)/γ: a setting the LM likes but the retriever ranks low (the cheerful trait for
    "Hello!") gets the full push up. KL(P_R‖Q) weighs each candidate's gradient by P_R, so exactly those
    settings get almost none; it is mode-seeking and learns slowly from a cold start.

    Q is a constant: it is computed from detached LM log-likelihoods, the LM never receives a gradient.

    Two options against a weak teacher (LLM-Embedder, Zhang et al. 2023), both off by default:
    ``min_margin`` δ leaves out of the mean every query whose best and second-best LM log-likelihoods differ by less than
    δ (the teacher cannot tell its candidates apart there), and ``top1_weight`` w adds w · CE(P_R, argmax Q), a
    hard push towards the LM's best candidate.

    Args:
        gamma: retriever temperature γ (cosine similarities live in [-1, 1]). Default 0.1: with 0.05 the
            retriever starts far sharper than Q and LSR mostly learns to flatten it (entropy -> ln k, top-1
            agreement down on Synthetic-Persona-Chat; see docs/results.md).
        beta: LM temperature β > 0 applied to log-likelihoods; with mean per-token log-likelihoods the spread
            between settings is ~0.05-0.3 nats, so β well below 1 keeps Q from being flat (default 0.05).
        direction: which KL, see above.
        min_margin: δ >= 0 in the units of ``lm_logp``; 0 keeps every query.
        top1_weight: w >= 0 of the hard top-1 cross-entropy term.

    Shapes: ``sim`` (batch, k), ``lm_logp`` (batch, k), optional ``mask`` (batch, k) bool with True for real
    candidates (characters with fewer than k settings). ``lm_logp`` may hold -inf (a response the LM cannot
    produce under that setting): such a candidate gets Q = 0 (and, for KL(P_R‖Q), leaves both distributions). A row with fewer than one finite candidate is
    left out of the mean; NaN scores raise.
    """

    def __init__(
        self,
        gamma: float = 0.1,
        beta: float = 0.05,
        direction: Direction = "lm_to_retriever",
        min_margin: float = 0.0,
        top1_weight: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("gamma", gamma), ("beta", beta)):
            if not (MIN_TEMPERATURE <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= {MIN_TEMPERATURE}, got {value}")
        if direction not in ("lm_to_retriever", "retriever_to_lm"):
            raise ValueError(f"direction must be 'lm_to_retriever' or 'retriever_to_lm', got {direction!r}")
        for name, value in (("min_margin", min_margin), ("top1_weight", top1_weight)):
            if not (0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.gamma, self.beta, self.direction = gamma, beta, direction
        self.min_margin, self.top1_weight = min_margin, top1_weight

    def distributions(
        self, sim: Tensor, lm_logp: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(log P_R, log Q, valid rows): the two log-distributions over candidates, -inf outside the mask."""
        if torch.isnan(lm_logp).any() or not torch.isfinite(sim).all():
            raise FloatingPointError("LSRLoss got NaN/inf similarities or NaN LM log-likelihoods")
        if (lm_logp == float("inf")).any():
            raise FloatingPointError("LSRLoss got a log-likelihood of +inf (a probability above 1)")
        mask = torch.ones_like(sim, dtype=torch.bool) if mask is None else mask.bool()
        target_ok = mask & torch.isfinite(lm_logp)  # (batch, k)
        if self.direction == "retriever_to_lm":  # KL(P_R||Q) is infinite where Q = 0: drop those candidates
            mask = target_ok
        neg_inf = torch.finfo(sim.dtype).min
        # centre each row on its largest real score before dividing: the softmax is unchanged, no overflow
        sim_c = sim - _row_max(sim.detach(), mask)
        lm_c = lm_logp.detach().masked_fill(~target_ok, 0.0) - _row_max(lm_logp.detach(), target_ok)
        log_pr = torch.log_softmax((sim_c / self.gamma).masked_fill(~mask, neg_inf), dim=-1)
        # a finite but huge negative score (-3e38) would overflow to -inf under 1/β: clamp, it is ~0 anyway
        log_q = torch.log_softmax((lm_c / self.beta).clamp(min=-1e4).masked_fill(~target_ok, neg_inf), dim=-1)
        log_pr = log_pr.masked_fill(~mask, float("-inf"))
        log_q = log_q.masked_fill(~target_ok, float("-inf"))
        valid = target_ok.any(-1)  # (batch,)
        return log_pr, log_q, valid

    def forward(self, sim: Tensor, lm_logp: Tensor, mask: Tensor | None = None) -> Tensor:
        log_pr, log_q, valid = self.distributions(sim, lm_logp, mask)
        if self.direction == "lm_to_retriever":
            p, log_p, log_other = log_q.exp(), log_q, log_pr
        else:
            p, log_p, log_other = log_pr.exp(), log_pr, log_q
        # terms with p = 0 contribute 0 (x log x -> 0); where p > 0, log_other is finite by construction
        zero = p == 0
        terms = p * (log_p.masked_fill(zero, 0.0) - log_other.masked_fill(zero, 0.0))
        per_query = terms.sum(-1)  # (batch,)
        if self.top1_weight:
            best = log_q.argmax(-1, keepdim=True)  # (batch, 1)
            per_query = per_query - self.top1_weight * log_pr.gather(1, best).squeeze(1).clamp(min=-1e4)
        if self.min_margin:
            valid = valid & (lm_margin(lm_logp.detach(), mask) >= self.min_margin)
        if not valid.any():
            return sim.sum() * 0.0
        return per_query[valid].sum() / valid.sum()


@dataclass(frozen=True)
class LossOptions:
    """The LSR loss of ``fit`` (``model.loss``): the two temperatures, the KL direction, the LM target and the
    two guards against a weak teacher (see :class:`LSRLoss` for the formula)."""

    gamma: float = 0.1
    """Retriever temperature γ in softmax(sim/γ)."""
    beta: float = 0.05
    """LM temperature β in softmax(log P_LM/β)."""
    direction: Direction = "lm_to_retriever"
    """``lm_to_retriever`` = KL(Q‖P_R) (default, see :class:`LSRLoss`) or ``retriever_to_lm`` = KL(P_R‖Q) as
    written in REPLUG."""
    lm_loglik: Literal["mean", "sum"] = "mean"
    """LM target per candidate: mean per-token log-likelihood of the gold reply, or the sum."""
    min_margin: float = 0.0
    """Train only on turns whose LM best-vs-second margin (log-likelihood per token for ``lm_loglik: mean``) is
    at least this (LLM-Embedder's filter against a weak teacher); 0 keeps all."""
    top1_weight: float = 0.0
    """Weight of a hard cross-entropy term on the LM's best candidate beside the KL."""

    def __post_init__(self) -> None:
        inf = float("inf")
        checks = {
            "gamma": 0 < self.gamma < inf,
            "beta": 0 < self.beta < inf,
            "min_margin": self.min_margin >= 0,
            "top1_weight": self.top1_weight >= 0,
        }
        check_ranges("model.loss", self, checks)

    def build(self) -> LSRLoss:
        return LSRLoss(
            gamma=self.gamma,
            beta=self.beta,
            direction=self.direction,
            min_margin=self.min_margin,
            top1_weight=self.top1_weight,
        )


def lm_margin(lm_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """(batch,) best minus second-best finite LM log-likelihood per query; 0 for a query with fewer than two."""
    ok = torch.isfinite(lm_logp) & (
        torch.ones_like(lm_logp, dtype=torch.bool) if mask is None else mask.bool()
    )
    top2 = lm_logp.masked_fill(~ok, float("-inf")).topk(min(2, lm_logp.shape[-1]), dim=-1).values
    if top2.shape[-1] < 2:
        return torch.zeros(lm_logp.shape[0], device=lm_logp.device)
    gap = top2[:, 0] - top2[:, 1]
    return torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap))


def _row_max(x: Tensor, mask: Tensor) -> Tensor:
    """(batch, 1) max of each row over its masked-in entries; 0 for a row with none."""
    neg_inf = torch.finfo(x.dtype).min
    top = x.masked_fill(~mask, neg_inf).amax(-1, keepdim=True)
    return torch.where(mask.any(-1, keepdim=True), top, torch.zeros_like(top))


def entropy(log_p: Tensor) -> Tensor:
    """Entropy in nats per row of a log-distribution that may hold -inf; (batch, k) -> (batch,)."""
    p = log_p.exp()
    return -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)
