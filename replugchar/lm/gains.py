"""The frozen LM's table of a set of examples: the log-likelihood of each gold reply with no setting and with each of
its character's settings, the gains (nats/token over no setting) and the leave-one-dialogue-out prior read from
them. Evaluation, calibration and the LM-utility priors all read this one table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..core.data import Character, Example
from .likelihood import NO_SETTING, LoglikRequest
from .loglik_cache import CachedLikelihood


def _znorm(values: Sequence[float]) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    sd = v.std()
    return ((v - v.mean()) / sd).tolist() if sd > 1e-12 else [0.0] * len(v)


@dataclass
class LMTable:
    """Per example: log-likelihood of the gold response (nats/token) with no setting and with each setting."""

    none: np.ndarray  # (n,)
    per_setting: list[np.ndarray]  # n arrays of (n_settings,)
    sums: list[np.ndarray]  # summed log-likelihoods (n_settings,), for the ensemble
    n_tokens: np.ndarray  # (n,)

    @property
    def gains(self) -> list[np.ndarray]:
        return [s - z for s, z in zip(self.per_setting, self.none)]

    def gain_matrix(self) -> np.ndarray:
        """(n, max_settings) gains, NaN where a character has fewer settings."""
        gains = self.gains
        out = np.full((len(gains), max(len(g) for g in gains)), np.nan)
        for row, g in enumerate(gains):
            out[row, : len(g)] = g
        return out


def lm_table(
    examples: Sequence[Example],
    characters: dict[str, Character],
    likelihood: CachedLikelihood,
    chunk: int = 64,
) -> LMTable:
    requests = []
    for e in examples:
        requests.append(LoglikRequest(e, NO_SETTING))
        requests += [LoglikRequest(e, (s,)) for s in characters[e.character_id].settings]
    means, sums, ntok = [], [], []
    for i in tqdm(range(0, len(requests), chunk), desc="LM log-likelihoods", unit="chunk", leave=False):
        sc = likelihood.loglik(requests[i : i + chunk])
        means.append(sc.logp_mean)
        sums.append(sc.logp_sum)
        ntok.append(sc.n_tokens)
        likelihood.flush()
    means, sums, ntok = np.concatenate(means), np.concatenate(sums), np.concatenate(ntok)
    none, per, per_sum, n_tok, pos = [], [], [], [], 0
    for e in examples:
        n = len(characters[e.character_id].settings)
        none.append(means[pos])
        n_tok.append(ntok[pos])
        per.append(means[pos + 1 : pos + 1 + n])
        per_sum.append(sums[pos + 1 : pos + 1 + n])
        pos += 1 + n
    return LMTable(np.array(none), per, per_sum, np.array(n_tok))


def loo_priors(examples: Sequence[Example], gains: list[np.ndarray]) -> list[np.ndarray]:
    """Per example, the LM-utility prior of its character's settings from the character's other dialogues."""
    by_char: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_char[e.character_id].append(i)
    out: list[np.ndarray] = [np.zeros_like(g) for g in gains]
    for rows in by_char.values():
        for i in rows:
            others = [j for j in rows if examples[j].dialogue_id != examples[i].dialogue_id]
            if others:
                out[i] = np.asarray(_znorm(np.mean([gains[j] for j in others], axis=0)))
    return out
