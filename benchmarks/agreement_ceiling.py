"""Can a retriever learn the LM's per-turn choice of setting at all? A cross-validated probe on frozen embeddings.

LSR's target, the LM's best setting for a turn, is picked with the gold reply in view; the retriever sees only the
query. Before spending LM calls and training time, this checks whether the teacher's choice is predictable beyond
query-setting similarity on a given data set, teacher and budget. Three probes on the untrained encoder's
embeddings are fitted with the package's own :class:`~replugchar.training.losses.LSRLoss` (same γ, β, KL direction):

    gen    cos(q, s) + γ·(w · s)          a learned per-setting "generality" direction (what a prior adds)
    diag   cos(q ⊙ (1 + D), s)            a re-weighted similarity (what fine-tuning can bend)
    both   the two together

They are scored by top-1 agreement with the LM's best setting under K-fold cross-validation *by character*
(as the training split), against plain similarity on the same examples, with a 95% interval of the paired
difference that resamples whole dialogues. A probe that cannot beat similarity says the LM-best label is noise
at this budget for a linear head; full fine-tuning has more capacity, and docs/results.md reports both.

LM log-likelihoods come from the log-likelihood cache (filled by ``replugchar loglik`` or ``replugchar fit`` with the same config);
missing pairs are scored by the frozen LM. Options after the probe's own are fit-config overrides.

    python benchmarks/agreement_ceiling.py --config configs/spc.yaml \\
        --data.max_train_examples 1200 --data.max_val_examples 240
    python benchmarks/agreement_ceiling.py --folds 3 --config configs/debug.yaml        # smoke run, tiny models
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from replugchar.evaluation.metrics import bootstrap_ci
from replugchar.lm.likelihood import LoglikRequest
from replugchar.training.losses import LSRLoss
from replugchar.training.run import load_run

PROBES = {"gen": (True, False), "diag": (False, True), "both": (True, True)}


def fit_probe(
    kind: str, q: torch.Tensor, s: torch.Tensor, lm: torch.Tensor, loss_fn: LSRLoss, l2: float, steps: int
):
    """Fit one probe on (n, d) queries, (n, k, d) settings and (n, k) LM log-likelihoods; returns its scoring function."""
    use_gen, use_diag = PROBES[kind]
    d = q.shape[1]
    w = torch.zeros(d, requires_grad=True)
    diag = torch.zeros(d, requires_grad=True)

    def score(qx: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        qw = torch.nn.functional.normalize(qx * (1 + diag), dim=-1) if use_diag else qx
        sim = torch.einsum("bd,bkd->bk", qw, sx)  # (n, k)
        return sim + loss_fn.gamma * (sx @ w) if use_gen else sim

    opt = torch.optim.Adam([w, diag], lr=0.01)
    for _ in range(steps):
        loss = loss_fn(score(q, s), lm) + l2 * (w.square().sum() + diag.square().sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return score


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", help="also write the figures here")
    args, rest = parser.parse_known_args()
    torch.manual_seed(0)
    module, dm = load_run(rest)
    loss = module.loss_options
    examples = [*dm.train_examples, *dm.val_examples]
    settings = [dm.characters[e.character_id].settings for e in examples]
    k = min(len(s) for s in settings)
    if k < 2:
        raise SystemExit("every character needs at least 2 settings for an agreement probe")
    settings = [s[:k] for s in settings]  # characters with more settings: their first k (all of them in SPC)
    requests = [LoglikRequest(e, (t,)) for e, ss in zip(examples, settings) for t in ss]
    logliks = module.likelihood.loglik(requests)
    module.flush_logliks()
    values = logliks.logp_mean if loss.lm_loglik == "mean" else logliks.logp_sum
    lm = torch.as_tensor(values, dtype=torch.float32).view(len(examples), k)  # (n, k)
    q = torch.as_tensor(module.encode_all(module.query_strings(examples), queries=True))  # (n, d)
    s = torch.as_tensor(module.encode_all([t for ss in settings for t in ss])).view(len(examples), k, -1)
    best = lm.argmax(1).numpy()
    mean_lp = logliks.logp_mean.reshape(len(examples), k)
    mean_lp = mean_lp - mean_lp.mean(1, keepdims=True)  # gain of each setting over a random candidate

    def gain(top: np.ndarray) -> np.ndarray:
        return mean_lp[np.arange(len(top)), top]

    groups = np.array([e.dialogue_id for e in examples])

    chars = sorted({e.character_id for e in examples})
    random.Random(0).shuffle(chars)
    fold_of = {c: i % args.folds for i, c in enumerate(chars)}
    folds = np.array([fold_of[e.character_id] for e in examples])
    loss_fn = LSRLoss(gamma=loss.gamma, beta=loss.beta, direction=loss.direction)

    base_top = torch.einsum("bd,bkd->bk", q, s).argmax(1).numpy()
    base_hit = (base_top == best).astype(float)
    rows = [
        {
            "probe": "similarity (untrained encoder)",
            "agreement": base_hit.mean(),
            "gain": gain(base_top).mean(),
        }
    ]
    for kind in PROBES:
        for l2 in args.l2:
            top = np.zeros(len(examples), dtype=int)
            for f in range(args.folds):
                train, test = folds != f, folds == f
                score = fit_probe(kind, q[train], s[train], lm[train], loss_fn, l2, args.steps)
                with torch.no_grad():
                    top[test] = score(q[test], s[test]).argmax(1).numpy()
            hit = (top == best).astype(float)
            diff = hit - base_hit
            lo, hi = bootstrap_ci(diff, groups, n_boot=2000, seed=0)
            rows.append(
                {
                    "probe": f"{kind} (l2={l2:g})",
                    "agreement": hit.mean(),
                    "diff": diff.mean(),
                    "lo": lo,
                    "hi": hi,
                    "gain": gain(top).mean(),
                }
            )

    print(
        f"\n{len(examples)} examples, {len(chars)} characters, k={k}, {args.folds}-fold CV by character; "
        f"chance = {1 / k:.3f}; LM {module.lm_options.name}, encoder {module.hparams.encoder}, γ={loss.gamma}, β={loss.beta}\n"
    )
    print(
        "| probe | top-1 agreement (CV) | vs similarity [95% CI] | top-1 LM gain (nats/token) |\n|---|---|---|---|"
    )
    for r in rows:
        ci = f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]" if "diff" in r else "–"
        print(f"| {r['probe']} | {r['agreement']:.4f} | {ci} | {r['gain']:+.4f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"n": len(examples), "k": k, "folds": args.folds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
