"""Greetings on test characters: does the learned generality help where similarity cannot?

For the test characters of a fit config (neither training nor the validation fit saw them), every greeting turn
and a seeded sample of the other turns are scored by the frozen LM (through the shared log-likelihood cache), and the
exported retriever's rule is compared with plain similarity and with today's rule (the same export without its
learned generality). Each row: the mean top-1 gain over no setting (nats/token) and the paired change against
similarity with a 95% interval that resamples whole dialogues. Also prints the learned g's top and bottom
settings and the gate's mean prior weight by query type.

    python benchmarks/greetings.py --config configs/convai2.yaml --retriever runs/convai2/retriever
"""

from __future__ import annotations

import argparse
import json
import zlib

import numpy as np

from replugchar.core.atomic import write_text
from replugchar.core.data import Character, Example
from replugchar.core.scoring import ScoringRule
from replugchar.evaluation.metrics import bootstrap_ci
from replugchar.lm.gains import lm_table
from replugchar.retrieval.retriever import Retriever
from replugchar.training.datamodule import _cap
from replugchar.training.run import load_run


def top1_gains(
    retriever: Retriever,
    examples: list[Example],
    chars: dict[str, Character],
    gains: list[np.ndarray],
    rule: ScoringRule,
) -> np.ndarray:
    """Per example, the LM gain of the setting ``rule`` ranks first among its character's settings."""
    out = []
    for e, g in zip(examples, gains):
        scores = retriever.rank_example(e, chars[e.character_id].settings, rule=rule)
        out.append(g[int(np.argmax(scores))])
    return np.asarray(out)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's own options; any others (--data.data_dir ..., --model.X ...) override the fit config."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", required=True, help="the fit config (data split, LM, template, log-likelihood cache)"
    )
    p.add_argument("--retriever", required=True, help="its export folder")
    p.add_argument("--max_other", type=int, default=100, help="non-greeting test turns (seeded sample)")
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--json", help="write the figures here")
    return p


def pick_test_turns(dm, max_other: int) -> tuple[list[Example], list[Example]]:
    """Every greeting turn of the test characters (the validation ones when the split has no test part) and a
    seeded sample of ``max_other`` of their other turns: greetings are few, and they are the question."""
    test = dm.test_examples or dm.val_examples
    greet = [e for e in test if e.query_type == "greeting"]
    other = _cap([e for e in test if e.query_type != "greeting"], max_other, dm.split.seed)
    return greet, other


def compare_rules(
    retriever: Retriever,
    examples: list[Example],
    chars: dict[str, Character],
    gains: list[np.ndarray],
    groups: np.ndarray,
    n_boot: int,
    result: dict,
) -> None:
    """Top-1 gain of similarity, today's rule and the rule with its learned generality, per subset, against
    similarity with a dialogue-resampling 95% interval; prints each row and adds it to ``result["rows"]``."""
    full = retriever.rule
    rules = {
        "similarity": ScoringRule(history_window=full.history_window),
        "rule (today)": full.without_generality(),
        "rule + g": full,
    }
    per = {name: top1_gains(retriever, examples, chars, gains, rule) for name, rule in rules.items()}
    is_greet = np.array([e.query_type == "greeting" for e in examples])
    print(f"{'method':<14} {'subset':<9} {'gain':>8}  {'vs similarity [95% CI]':<28}")
    for subset, keep in (("greeting", is_greet), ("other", ~is_greet)):
        for name, g in per.items():
            diff = g[keep] - per["similarity"][keep]
            lo, hi = bootstrap_ci(diff, groups[keep], n_boot=n_boot, seed=0)
            result["rows"][f"{name}|{subset}"] = {
                "gain": float(g[keep].mean()),
                "vs_similarity": float(diff.mean()),
                "ci": [lo, hi],
                "values": g[keep].tolist(),
            }
            print(f"{name:<14} {subset:<9} {g[keep].mean():+8.4f}  {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")


def report_generality(
    retriever: Retriever, examples: list[Example], chars: dict[str, Character], result: dict
) -> None:
    """What the learned generality g(s) favours on the test characters' settings (top and bottom), and how much
    weight the gate gives it by query type; printed and added to ``result``."""
    full = retriever.rule
    v = np.asarray(full.generality)
    texts = sorted({s for e in examples for s in chars[e.character_id].settings})
    g = retriever.embed_settings(texts) @ v
    order = np.argsort(-g)
    print("learned generality g(s), test characters' settings: top 5 / bottom 5")
    for i in [*order[:5], *order[-5:]]:
        print(f"  {g[i]:+.3f}  {texts[i]}")
    result["top"] = [texts[i] for i in order[:10]]
    result["bottom"] = [texts[i] for i in order[-10:]]
    weights: dict[str, list] = {}
    for e in examples:
        sims = (
            retriever.embed_settings(chars[e.character_id].settings) @ retriever.embed_queries([e.query])[0]
        )
        w = full.prior_weight + full.gate[0] * sims.max() + full.gate[1] * (len(e.dialogue) == 0)
        weights.setdefault(e.query_type, []).append(w)
    print(
        "gate: mean weight of the generality term by query type: "
        + ", ".join(f"{t} {np.mean(w):+.3f} ({len(w)})" for t, w in sorted(weights.items()))
    )
    result["gate"] = {t: float(np.mean(w)) for t, w in weights.items()}


def main(argv: list[str] | None = None) -> dict:
    """Score the test turns with the frozen LM, compare the three rules, report the generality; returns the figures."""
    args, overrides = build_parser().parse_known_args(argv)
    module, dm = load_run(["--config", args.config, *overrides])
    chars = dm.characters
    greet, other = pick_test_turns(dm, args.max_other)
    examples = greet + other
    table = lm_table(examples, chars, module.likelihood)
    module.flush_logliks()
    retriever = Retriever.load(args.retriever)
    groups = np.array([zlib.crc32(e.dialogue_id.encode()) for e in examples])
    is_greet = np.array([e.query_type == "greeting" for e in examples])
    result: dict = {
        "n_greeting": int(is_greet.sum()),
        "n_other": int((~is_greet).sum()),
        "groups": groups.tolist(),
        "is_greeting": is_greet.tolist(),
        "rows": {},
    }
    print(
        f"{args.config}: {len(greet)} greeting + {len(other)} other test turns, {len(set(groups))} dialogues"
    )
    compare_rules(retriever, examples, chars, table.gains, groups, args.n_boot, result)
    if retriever.rule.uses_generality:
        report_generality(retriever, examples, chars, result)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
