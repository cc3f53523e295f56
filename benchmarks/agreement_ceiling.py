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
from typing import NamedTuple

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


class ProbeData(NamedTuple):
    """Everything the probes are fitted and scored on, one row per example: frozen embeddings, the LM's
    log-likelihoods and its best setting, and the groups (dialogues) and folds (characters) of the evaluation."""

    q: torch.Tensor  # (n, d) query embeddings
    s: torch.Tensor  # (n, k, d) setting embeddings
    lm: torch.Tensor  # (n, k) LM log-likelihoods, as the loss uses them (mean or sum)
    best: np.ndarray  # (n,) the LM's best setting
    mean_lp: np.ndarray  # (n, k) per-token log P of each setting over a random candidate's
    groups: np.ndarray  # (n,) dialogue ids: the bootstrap resamples whole dialogues
    folds: np.ndarray  # (n,) the fold of each example's character
    n_chars: int
    k: int

    def gain(self, top: np.ndarray) -> np.ndarray:
        """Per-token LM gain of the setting each example picked (``top``) over a random candidate."""
        return self.mean_lp[np.arange(len(top)), top]


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """The probe's own options; the rest of the command line goes to :func:`load_run` as fit-config overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_known_args()


def character_folds(examples: list, n_folds: int) -> tuple[np.ndarray, int]:
    """Each example's fold, by character (seeded shuffle): as the training split, no character is in both the
    fitted and the scored part; and the number of characters."""
    chars = sorted({e.character_id for e in examples})
    random.Random(0).shuffle(chars)
    fold_of = {c: i % n_folds for i, c in enumerate(chars)}
    return np.array([fold_of[e.character_id] for e in examples]), len(chars)


def probe_data(module, dm, n_folds: int) -> ProbeData:
    """Score every (example, own setting) pair with the LM (through the cache) and embed queries and settings
    with the untrained encoder; every character is cut to the smallest number of settings, k."""
    examples = [*dm.train_examples, *dm.val_examples]
    settings = [dm.characters[e.character_id].settings for e in examples]
    k = min(len(s) for s in settings)
    if k < 2:
        raise SystemExit("every character needs at least 2 settings for an agreement probe")
    settings = [s[:k] for s in settings]  # characters with more settings: their first k (all of them in SPC)
    requests = [LoglikRequest(e, (t,)) for e, ss in zip(examples, settings) for t in ss]
    logliks = module.likelihood.loglik(requests)
    module.flush_logliks()
    values = logliks.logp_mean if module.loss_options.lm_loglik == "mean" else logliks.logp_sum
    lm = torch.as_tensor(values, dtype=torch.float32).view(len(examples), k)  # (n, k)
    q = torch.as_tensor(module.encode_all(module.query_strings(examples), queries=True))  # (n, d)
    s = torch.as_tensor(module.encode_all([t for ss in settings for t in ss])).view(len(examples), k, -1)
    mean_lp = logliks.logp_mean.reshape(len(examples), k)
    mean_lp = mean_lp - mean_lp.mean(1, keepdims=True)  # gain of each setting over a random candidate
    folds, n_chars = character_folds(examples, n_folds)
    return ProbeData(
        q=q,
        s=s,
        lm=lm,
        best=lm.argmax(1).numpy(),
        mean_lp=mean_lp,
        groups=np.array([e.dialogue_id for e in examples]),
        folds=folds,
        n_chars=n_chars,
        k=k,
    )


def cross_validated_top(
    kind: str, data: ProbeData, loss_fn: LSRLoss, l2: float, n_folds: int, steps: int
) -> np.ndarray:
    """Each example's top-1 setting under a probe fitted on the other folds' characters."""
    top = np.zeros(len(data.best), dtype=int)
    for f in range(n_folds):
        train, test = data.folds != f, data.folds == f
        score = fit_probe(kind, data.q[train], data.s[train], data.lm[train], loss_fn, l2, steps)
        with torch.no_grad():
            top[test] = score(data.q[test], data.s[test]).argmax(1).numpy()
    return top


def probe_rows(args: argparse.Namespace, data: ProbeData, loss_fn: LSRLoss) -> list[dict]:
    """Plain similarity's row, then one per probe and l2: agreement with the LM's best setting and its paired
    difference from similarity, with a 95% interval that resamples whole dialogues."""
    base_top = torch.einsum("bd,bkd->bk", data.q, data.s).argmax(1).numpy()
    base_hit = (base_top == data.best).astype(float)
    rows = [
        {
            "probe": "similarity (untrained encoder)",
            "agreement": base_hit.mean(),
            "gain": data.gain(base_top).mean(),
        }
    ]
    for kind in PROBES:
        for l2 in args.l2:
            top = cross_validated_top(kind, data, loss_fn, l2, args.folds, args.steps)
            hit = (top == data.best).astype(float)
            diff = hit - base_hit
            lo, hi = bootstrap_ci(diff, data.groups, n_boot=2000, seed=0)
            rows.append(
                {
                    "probe": f"{kind} (l2={l2:g})",
                    "agreement": hit.mean(),
                    "diff": diff.mean(),
                    "lo": lo,
                    "hi": hi,
                    "gain": data.gain(top).mean(),
                }
            )
    return rows


def print_report(args: argparse.Namespace, module, data: ProbeData, rows: list[dict]) -> None:
    """The set-up line and the Markdown table of every probe against similarity."""
    loss, k = module.loss_options, data.k
    print(
        f"\n{len(data.best)} examples, {data.n_chars} characters, k={k}, {args.folds}-fold CV by character; "
        f"chance = {1 / k:.3f}; LM {module.lm_options.name}, encoder {module.hparams.encoder}, γ={loss.gamma}, β={loss.beta}\n"
    )
    print(
        "| probe | top-1 agreement (CV) | vs similarity [95% CI] | top-1 LM gain (nats/token) |\n|---|---|---|---|"
    )
    for r in rows:
        ci = f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]" if "diff" in r else "–"
        print(f"| {r['probe']} | {r['agreement']:.4f} | {ci} | {r['gain']:+.4f} |")


def main() -> None:
    """Load the fit config's data and models, fit and score every probe, print the table (and the JSON)."""
    args, rest = parse_args()
    torch.manual_seed(0)
    module, dm = load_run(rest)
    loss = module.loss_options
    data = probe_data(module, dm, args.folds)
    loss_fn = LSRLoss(gamma=loss.gamma, beta=loss.beta, direction=loss.direction)
    rows = probe_rows(args, data, loss_fn)
    print_report(args, module, data, rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"n": len(data.best), "k": data.k, "folds": args.folds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
