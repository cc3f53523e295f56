"""Fit the prior weight λ and the relevance threshold τ on validation data against the frozen LM.

Both are chosen to maximise the LM likelihood of the gold responses, using the same cached scores as training:
for every validation example we know the gain (nats/token over no setting) of each of its character's settings,
so trying a λ or τ costs a NumPy argmax, not an LM call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class Calibration:
    prior_weight: float
    threshold: float | None
    gain_at_zero: float  # mean top-1 gain (nats/token over no setting) with λ = 0, no threshold
    gain_fitted_weight: float  # ... with the fitted λ
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
) -> Calibration:
    if len(sims) == 0:
        raise ValueError("no validation examples to calibrate on")
    if np.isinf(gains).any() or np.isnan(gains[~np.isnan(sims)]).any():
        raise FloatingPointError("LM gains contain NaN/inf: check the LM scores")
    per_weight = [float(top1_gain(sims, priors, gains, w)[0].mean()) for w in grid]
    best_w = float(grid[int(np.argmax(per_weight))])
    g, s = top1_gain(sims, priors, gains, best_w)
    tau, gain_tau = None, float(g.mean())
    if fit_threshold:
        # quantiles of the top-1 scores, plus one above them all: "never retrieve" is a legitimate answer
        cands = np.append(np.quantile(s, np.linspace(0, 1, 41)), np.nextafter(s.max(), np.inf))
        for cand in np.unique(cands):
            value = float(np.where(s >= cand, g, 0.0).mean())  # below τ: no setting, gain 0
            if value > gain_tau + 1e-9:
                tau, gain_tau = float(cand), value
    return Calibration(
        best_w,
        tau,
        per_weight[0] if grid[0] == 0 else float(top1_gain(sims, priors, gains, 0)[0].mean()),
        float(max(per_weight)),
        gain_tau,
        len(sims),
        tuple(grid),
        tuple(per_weight),
    )
