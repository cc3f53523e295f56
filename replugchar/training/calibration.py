"""Fit the final mixing of the scoring rule on validation characters against the frozen LM: the scale α of the
learned dialogue-evidence term, the prior weight λ and the relevance threshold τ.

All are chosen to maximise the LM likelihood of the gold responses, using the same cached log-likelihoods as training:
for every validation example we know the gain (nats/token over no setting) of each of its character's settings,
so trying a λ or τ costs a NumPy argmax, not an LM call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
DIALOGUE_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
"""α = 0 is in the grid: the exported rule is never worse than the encoder's plain similarity on validation."""


@dataclass(frozen=True)
class Calibration:
    dialogue_scale: float  # α: the exported dialogue weights are α · (learned weights)
    prior_weight: float
    threshold: float | None
    gain_at_zero: float  # mean top-1 gain (nats/token over no setting) with α = λ = 0, no threshold
    gain_fitted_weight: float  # ... with the fitted α and λ
    gain_fitted: float  # ... with the fitted λ and τ
    n_examples: int
    grid: tuple[float, ...]
    gains_by_weight: tuple[float, ...]


def top1_gain(
    sims: np.ndarray, priors: np.ndarray, gains: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: gain of the top-1 setting under score = sim + weight·prior, and that score.

    Shapes: sims, priors, gains (n, max_settings) with NaN where a character has fewer settings.
    """
    scores = np.where(np.isnan(sims), -np.inf, sims + weight * np.nan_to_num(priors))
    best = scores.argmax(1)
    rows = np.arange(len(best))
    return gains[rows, best], scores[rows, best]


def fit(
    sims: np.ndarray,
    priors: np.ndarray,
    gains: np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    fit_threshold: bool = True,
    dialogue: np.ndarray | None = None,
    scales: Sequence[float] = DIALOGUE_SCALES,
) -> Calibration:
    """``dialogue`` (n, max_settings) is the learned dialogue-evidence term Σ w_f φ_f of each setting; the
    fitted rule scores sims + α·dialogue + λ·prior. Ties keep the smallest α and λ (closest to similarity)."""
    if len(sims) == 0:
        raise ValueError("no validation examples to calibrate on")
    if np.isinf(gains).any() or np.isnan(gains[~np.isnan(sims)]).any():
        raise FloatingPointError("LM gains contain NaN/inf: check the LM log-likelihoods")
    dialogue = np.zeros_like(sims) if dialogue is None else np.nan_to_num(dialogue)
    scales = (0.0,) if not dialogue.any() else tuple(scales)
    table = {
        (a, w): float(top1_gain(sims + a * dialogue, priors, gains, w)[0].mean())
        for a in scales
        for w in grid
    }
    best_a, best_w = max(table, key=lambda key: (table[key] - 1e-12 * (key[0] + key[1]), -key[0], -key[1]))
    per_weight = [table[(best_a, w)] for w in grid]
    g, s = top1_gain(sims + best_a * dialogue, priors, gains, best_w)
    tau, gain_tau = None, float(g.mean())
    if fit_threshold:
        # quantiles of the top-1 scores, plus one above them all: "never retrieve" is a legitimate answer
        cands = np.append(np.quantile(s, np.linspace(0, 1, 41)), np.nextafter(s.max(), np.inf))
        for cand in np.unique(cands):
            value = float(np.where(s >= cand, g, 0.0).mean())  # below τ: no setting, gain 0
            if value > gain_tau + 1e-9:
                tau, gain_tau = float(cand), value
    return Calibration(
        float(best_a),
        best_w,
        tau,
        float(top1_gain(sims, priors, gains, 0)[0].mean()),
        table[(best_a, best_w)],
        gain_tau,
        len(sims),
        tuple(grid),
        tuple(per_weight),
    )


def validation_matrices(module, examples, chars, table=None):
    """(sims, priors, gains, dialogue), each (n_val, max_settings): the inputs of α / λ / τ calibration, for
    ``module`` (an :class:`~replugchar.training.module.LSRModule`) on validation ``examples``.

    ``dialogue`` is the learned dialogue-evidence term of each setting, scored through
    :meth:`~replugchar.retrieval.retriever.Retriever.rank_example` (the inference path). A validation character the prior
    table does not cover (LM-utility priors come from training dialogues, and the split is by character) gets
    its leave-one-dialogue-out LM-utility prior from its other validation dialogues, so no example's own reply
    informs its prior.
    """
    from ..core.scoring import ScoringRule
    from ..lm.gains import lm_table, loo_priors

    width = max(len(chars[e.character_id].settings) for e in examples)
    lookup = {(p.character_id, p.index_in_character): p.prior for p in table or []}
    lm = lm_table(examples, chars, module.likelihood)
    loo = loo_priors(examples, lm.gains)
    learned = module.rule
    retriever = module.as_retriever(learned)
    plain = ScoringRule(history_window=learned.history_window)
    today = learned.without_generality()  # the learned generality has its own scale, see fit_generality
    sims, prior_m, dialogue = (np.full((len(examples), width), np.nan) for _ in range(3))
    for row, e in enumerate(examples):
        settings = chars[e.character_id].settings
        n = len(settings)
        sims[row, :n] = retriever.rank_example(e, settings, rule=plain)
        dialogue[row, :n] = retriever.rank_example(e, settings, rule=today) - sims[row, :n]
        covered = all((e.character_id, i) in lookup for i in range(n))
        prior_m[row, :n] = [lookup[(e.character_id, i)] for i in range(n)] if covered else loo[row]
    return sims, prior_m, lm.gain_matrix(), dialogue


def generality_matrix(module, examples, chars) -> np.ndarray:
    """(n, max_settings) the learned generality's part of each setting's score, w(x, h)·g(s), through
    :meth:`~replugchar.retrieval.retriever.Retriever.rank_example` (the inference path); NaN past a character's
    settings. It is linear in g, so scaling the generality vector by β scales this matrix by β."""
    learned = module.rule
    retriever = module.as_retriever(learned)
    today = learned.without_generality()
    width = max(len(chars[e.character_id].settings) for e in examples)
    out = np.full((len(examples), width), np.nan)
    for row, e in enumerate(examples):
        settings = chars[e.character_id].settings
        out[row, : len(settings)] = retriever.rank_example(e, settings) - retriever.rank_example(
            e, settings, rule=today
        )
    return out


@dataclass(frozen=True)
class GeneralityFit:
    scale: float  # β: the exported generality vector is β · (learned vector)
    gains: dict[float, tuple[float, float]]  # β -> (mean top-1 gain on all turns, on greetings)
    rows: np.ndarray  # (n, 3): top-1 gain with β = 0, with the fitted β, is-greeting (0/1)


def fit_generality(
    base: np.ndarray,
    generality: np.ndarray,
    gains: np.ndarray,
    greeting: np.ndarray,
    scales: Sequence[float] = DIALOGUE_SCALES,
) -> GeneralityFit:
    """β for the learned generality on validation characters: the best mean top-1 gain over all turns among
    the β that are not worse than β = 0 (today's rule, ``base`` = its scores) on all turns *and* on the
    greetings alone. β = 0 always qualifies, so the export is never worse than today's rule there."""
    gen = np.nan_to_num(generality)
    greeting = np.asarray(greeting, dtype=bool)
    table, per = {}, {}
    for b in scales:
        g, _ = top1_gain(base + b * gen, np.zeros_like(base), gains, 0.0)
        per[b] = g
        table[b] = (float(g.mean()), float(g[greeting].mean()) if greeting.any() else 0.0)
    zero = table[0.0]
    ok = [b for b in scales if table[b][0] >= zero[0] - 1e-12 and table[b][1] >= zero[1] - 1e-12]
    best = max(ok, key=lambda b: (table[b][0] - 1e-12 * b, -b))
    rows = np.stack([per[0.0], per[best], greeting.astype(float)], axis=1)
    return GeneralityFit(float(best), table, rows)
