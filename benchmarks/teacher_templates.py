"""Is the prefix-shared template as good a teacher? Settings before the dialogue (default) vs after it.

On the validation turns of a fit config, both templates score every (turn, setting) pair with the same frozen LM
(through the shared cache). Printed: how often the LM-best setting agrees between the templates (with a 95%
dialogue-bootstrap interval), each template's median best-vs-second margin (nats/token), and how often each
template's LM-best setting agrees with similarity. The held-out gain of the rule trained under each template is
measured separately with benchmarks/greetings.py under the default template (the reader's prompt).

    python benchmarks/teacher_templates.py --config configs/convai2.yaml
"""

from __future__ import annotations

import argparse
import json
import zlib

import numpy as np

from replugchar.core.atomic import write_text
from replugchar.core.scoring import ScoringRule
from replugchar.evaluation.metrics import bootstrap_ci
from replugchar.lm.gains import lm_table
from replugchar.training.run import load_run


def margins(gains: list[np.ndarray]) -> np.ndarray:
    return np.array([np.sort(g)[-1] - np.sort(g)[-2] for g in gains])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    out: dict = {}
    tables = {}
    for position in ("before", "after"):
        module, dm = load_run(["--config", args.config, "--model.template.settings_position", position])
        examples, chars = dm.val_examples, dm.characters
        tables[position] = lm_table(examples, chars, module.likelihood).gains
        module.flush_logliks()
    retriever = module.as_retriever(ScoringRule())
    sim_best = np.array(
        [int(np.argmax(retriever.rank_example(e, chars[e.character_id].settings))) for e in examples]
    )
    groups = np.array([zlib.crc32(e.dialogue_id.encode()) for e in examples])
    best = {pos: np.array([int(np.argmax(g)) for g in t]) for pos, t in tables.items()}
    agree = (best["before"] == best["after"]).astype(float)
    lo, hi = bootstrap_ci(agree, groups, n_boot=args.n_boot, seed=0)
    print(f"{args.config}: {len(examples)} validation turns, {len(set(groups))} dialogues")
    print(f"LM-best setting agrees between templates: {agree.mean():.3f} [{lo:.3f}, {hi:.3f}]")
    out["agreement"] = {"mean": float(agree.mean()), "ci": [lo, hi]}
    greet = np.array([e.query_type == "greeting" for e in examples])
    for pos, t in tables.items():
        m = margins(t)
        with_sim = (best[pos] == sim_best).astype(float)
        slo, shi = bootstrap_ci(with_sim, groups, n_boot=args.n_boot, seed=0)
        print(
            f"  {pos:<6} median margin {np.median(m):.4f} (greetings {np.median(m[greet]):.4f}); "
            f"LM-best == similarity's top-1 {with_sim.mean():.3f} [{slo:.3f}, {shi:.3f}]; "
            f"oracle gain {np.mean([g.max() for g in t]):+.4f}"
        )
        out[pos] = {
            "median_margin": float(np.median(m)),
            "median_margin_greeting": float(np.median(m[greet])),
            "agree_similarity": float(with_sim.mean()),
            "agree_similarity_ci": [slo, shi],
        }
    if args.json:
        write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
