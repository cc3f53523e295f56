"""How much can any per-setting generality add at greetings? The hindsight ceiling against what carries.

A generality is one number per setting, the same at every greeting of its character. Its best case is known in
hindsight: each setting's mean LM gain over the character's *other* greeting dialogues (leave-one-dialogue-out,
so no turn's own reply informs its ranking). A generality learned from text can at most approach that. This
script puts, on the test characters' greeting turns of each fit config (and pooled), with a 95% interval that
resamples whole dialogues, the change in top-1 gain over plain similarity of:

- ``hindsight``: similarity + b·(LOO per-character utility), b chosen on the validation characters, and
  ``hindsight@test`` with b chosen on the test turns themselves (optimistic: the family's upper bound);
- ``ridge``: similarity + b·(w·e_s), w a ridge regression from the setting's MiniLM embedding to that utility on
  the training characters of every config given (so SPC can learn from ConvAI2 and back), ridge strength and b
  chosen on validation characters;
- ``lm_bank`` (``--lm_bank N``): similarity + b·(the setting's mean gain on N greeting turns of *other*
  training characters), which the small LM can compute for a new character at index time, without its
  dialogues. This one calls the LM (about N·(settings of the val + test characters) pairs).

It reads the log-likelihood cache: fill it first with ``replugchar loglik --config C --split every --data.query_types
'[greeting]' --data.max_train_examples null --data.max_val_examples null``.

    python benchmarks/generality_ceiling.py --configs configs/convai2.yaml configs/spc.yaml --lm_bank 6
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from replugchar.core.atomic import write_text
from replugchar.core.scoring import ScoringRule
from replugchar.evaluation.metrics import bootstrap_ci
from replugchar.lm.gains import lm_table
from replugchar.lm.likelihood import NO_SETTING, LoglikRequest
from replugchar.training.run import load_run

SCALES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
RIDGE = (1.0, 10.0, 100.0)
GREETINGS_ONLY = ["--data.query_types", "[greeting]"]
UNCAPPED = ["--data.max_train_examples", "null", "--data.max_val_examples", "null"]


@dataclass
class Split:
    """One split's greeting turns: per turn its character, dialogue, LM gains and cosines of its settings."""

    chars: list[str]
    dialogues: list[str]
    gains: list[np.ndarray]
    sims: list[np.ndarray]

    def top1(self, extra: list[np.ndarray] | None = None, scale: float = 0.0) -> np.ndarray:
        """(n,) gain of the top-1 setting under similarity + scale·extra."""
        if extra is None or scale == 0.0:
            return np.array([g[np.argmax(s)] for g, s in zip(self.gains, self.sims)])
        return np.array([g[np.argmax(s + scale * x)] for g, s, x in zip(self.gains, self.sims, extra)])

    def groups(self) -> np.ndarray:
        return np.array([zlib.crc32(d.encode()) for d in self.dialogues])


@dataclass
class DataSet:
    name: str
    settings: dict[str, tuple[str, ...]]
    embedding: dict[str, np.ndarray]
    splits: dict[str, Split] = field(default_factory=dict)
    bank: dict[str, float] = field(default_factory=dict)


def load(config: str, lm_bank: int) -> DataSet:
    module, dm = load_run(["--config", config, *GREETINGS_ONLY, *UNCAPPED])
    chars = dm.characters
    retriever = module.as_retriever(ScoringRule(history_window=module.rule.history_window))
    texts = sorted({s for c in chars.values() for s in c.settings})
    data = DataSet(
        Path(config).stem,
        {c: ch.settings for c, ch in chars.items()},
        dict(zip(texts, retriever.embed_settings(texts))),
    )
    for name, examples in (
        ("train", dm.train_examples),
        ("val", dm.val_examples),
        ("test", dm.test_examples),
    ):
        table = lm_table(examples, chars, module.likelihood)
        sims = [retriever.rank_example(e, chars[e.character_id].settings) for e in examples]
        data.splits[name] = Split(
            [e.character_id for e in examples], [e.dialogue_id for e in examples], table.gains, sims
        )
    if lm_bank:
        data.bank = bank_generality(module, dm, lm_bank)
    module.flush_logliks()
    return data


def bank_generality(module, dm, n: int) -> dict[str, float]:
    """Each val/test setting's mean gain (nats/token) on ``n`` greeting turns of training characters."""
    pool = [e for e in dm.train_examples if 3 <= len(e.response.split()) <= 30]
    bank = random.Random(0).sample(pool, min(n, len(pool)))
    wanted = {e.character_id for e in dm.val_examples + dm.test_examples}
    texts = sorted({s for c in wanted for s in dm.characters[c].settings})
    requests = [LoglikRequest(b, NO_SETTING) for b in bank]
    requests += [LoglikRequest(b, (s,)) for s in texts for b in bank]
    means = module.likelihood.loglik(requests).logp_mean
    gains = means[len(bank) :].reshape(len(texts), len(bank)) - means[: len(bank)]
    return dict(zip(texts, gains.mean(1).tolist()))


def loo_utility(split: Split) -> list[np.ndarray]:
    """Per turn: its character's settings' mean (turn-centred) gain over the character's other dialogues."""
    by_char: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(split.chars):
        by_char[c].append(i)
    out = []
    for i, c in enumerate(split.chars):
        others = [j for j in by_char[c] if split.dialogues[j] != split.dialogues[i]]
        centred = [split.gains[j] - split.gains[j].mean() for j in others]
        out.append(np.mean(centred, 0) if centred else np.zeros_like(split.gains[i]))
    return out


def setting_utility(data: DataSet) -> dict[str, float]:
    """Training characters: each setting's mean turn-centred gain over all its character's greetings."""
    acc: dict[str, list[float]] = defaultdict(list)
    split = data.splits["train"]
    for c, g in zip(split.chars, split.gains):
        for s, v in zip(data.settings[c], g - g.mean()):
            acc[s].append(float(v))
    return {s: float(np.mean(v)) for s, v in acc.items()}


def ridge(x: np.ndarray, y: np.ndarray, strength: float) -> np.ndarray:
    xc = x - x.mean(0)
    return np.linalg.solve(xc.T @ xc + strength * np.eye(x.shape[1]), xc.T @ (y - y.mean()))


def per_turn(data: DataSet, split: str, value) -> list[np.ndarray]:
    """A per-setting value laid out as one array per turn (the turn's character's settings)."""
    return [np.array([value(s) for s in data.settings[c]]) for c in data.splits[split].chars]


def choose(val: Split, extra: list[np.ndarray]) -> tuple[float, float]:
    """(scale, validation change vs similarity): the best scale on validation, ties to the smallest."""
    base = val.top1().mean()
    table = {b: float(val.top1(extra, b).mean() - base) for b in SCALES}
    best = max(SCALES, key=lambda b: (table[b] - 1e-12 * b, -b))
    return best, table[best]


def methods(data: DataSet, w_by_strength: dict[float, np.ndarray]) -> dict[str, tuple[float, np.ndarray]]:
    """name -> (chosen scale, per-test-turn change vs similarity)."""
    val, test = data.splits["val"], data.splits["test"]
    out = {}
    b, _ = choose(val, loo_utility(val))
    out["hindsight"] = (b, test.top1(loo_utility(test), b) - test.top1())
    # the same with the scale picked on the test turns themselves: optimistic, an upper bound of the family
    best = max(SCALES, key=lambda s: test.top1(loo_utility(test), s).mean())
    out["hindsight@test"] = (best, test.top1(loo_utility(test), best) - test.top1())
    picks = []
    for strength, w in w_by_strength.items():
        g = {s: float(e @ w) for s, e in data.embedding.items()}
        b, gain = choose(val, per_turn(data, "val", g.get))
        picks.append((gain, -strength, b, g))
    _, _, b, g = max(picks, key=lambda p: (p[0], p[1]))
    out["ridge"] = (b, test.top1(per_turn(data, "test", g.get), b) - test.top1())
    if data.bank:
        b, _ = choose(val, per_turn(data, "val", data.bank.get))
        out["lm_bank"] = (b, test.top1(per_turn(data, "test", data.bank.get), b) - test.top1())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", required=True, help="fit configs (their split, LM and cache)")
    p.add_argument(
        "--lm_bank", type=int, default=0, help="greeting turns in the LM bank (0: skip; calls the LM)"
    )
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    sets = [load(c, args.lm_bank) for c in args.configs]
    utility = {s: u for d in sets for s, u in setting_utility(d).items()}
    embedding = {s: e for d in sets for s, e in d.embedding.items()}
    keys = sorted(utility)
    x, y = np.stack([embedding[s] for s in keys]), np.array([utility[s] for s in keys])
    w_by_strength = {r: ridge(x, y, r) for r in RIDGE}
    print(f"ridge: {len(keys)} training settings of {', '.join(d.name for d in sets)}")
    result: dict = {}
    pooled: dict[str, list] = defaultdict(list)
    for d in sets:
        groups = d.splits["test"].groups()
        base = d.splits["test"].top1().mean()
        print(f"{d.name}: {len(groups)} test greetings, similarity top-1 gain {base:+.4f}")
        for name, (scale, diff) in methods(d, w_by_strength).items():
            lo, hi = bootstrap_ci(diff, groups, n_boot=args.n_boot, seed=0)
            print(f"  {name:<14} b={scale:<5} vs similarity {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")
            result[f"{d.name}|{name}"] = {"scale": scale, "change": float(diff.mean()), "ci": [lo, hi]}
            pooled[name].append((diff, groups))
    for name, parts in pooled.items():
        diff = np.concatenate([p[0] for p in parts])
        groups = np.concatenate([p[1] for p in parts])
        lo, hi = bootstrap_ci(diff, groups, n_boot=args.n_boot, seed=0)
        print(
            f"pooled {name:<14} ({len(diff)} turns) vs similarity {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"
        )
        result[f"pooled|{name}"] = {"change": float(diff.mean()), "ci": [lo, hi], "n": len(diff)}
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
