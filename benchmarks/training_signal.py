"""Which LSR training signal survives a weak teacher? Variants of the dialogue head's loss, cross-validated.

With a frozen encoder the head's inputs are fixed: cosine similarities S, dialogue features F and the LM's gains G
of every setting of every training turn (G from the log-likelihood cache, so nothing is scored twice). Each variant of
:class:`~replugchar.training.losses.LSRLoss` (β, the margin filter δ, the hard top-1 term) trains the four weights with
minibatch AdamW as ``fit`` does, on half of the training characters, and is tested on the other half (2 folds by
character): the held-out top-1 gain over similarity, alone and with a λ·prior (leave-one-dialogue-out LM utility),
with 95% dialogue-bootstrap intervals. Features come from :meth:`Retriever.rank_example`, the inference path.

    python benchmarks/training_signal.py --config configs/convai2.yaml
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from replugchar.core.scoring import FEATURES, ScoringRule, score_settings
from replugchar.evaluation.metrics import bootstrap_ci
from replugchar.lm.gains import lm_table, loo_priors
from replugchar.training.losses import LSRLoss
from replugchar.training.run import load_run

VARIANTS = {
    "β=0.05 (default)": {},
    "β=0.02": {"beta": 0.02},
    "β=0.2": {"beta": 0.2},
    "margin δ=0.02": {"min_margin": 0.02},
    "margin δ=0.05": {"min_margin": 0.05},
    "top-1 CE w=1": {"top1_weight": 1.0},
    "margin δ=0.02 + CE": {"min_margin": 0.02, "top1_weight": 1.0},
}


def turn_features(module, examples, characters) -> tuple[np.ndarray, np.ndarray]:
    """(S, F): (n, width) cosines and (n, width, F) features, NaN / 0 past a character's settings."""
    retriever = module.as_retriever()
    window = module.head_options.history_window
    width = max(len(characters[e.character_id].settings) for e in examples)
    sims = np.full((len(examples), width), np.nan)
    feats = np.zeros((len(examples), width, len(FEATURES)))
    for row, e in enumerate(examples):
        settings = characters[e.character_id].settings
        base = retriever.rank_example(e, settings, rule=ScoringRule(history_window=window))
        sims[row, : len(settings)] = base
        for j in range(len(FEATURES)):
            unit = ScoringRule(
                weights=tuple(float(i == j) for i in range(len(FEATURES))), history_window=window
            )
            feats[row, : len(settings), j] = retriever.rank_example(e, settings, rule=unit) - base
    return sims, feats


def train_head(
    sims, feats, gains, rows, loss_fn, epochs: int, lr: float, batch: int, seed: int
) -> torch.Tensor:
    """The four weights, trained as ``fit`` trains the head (AdamW, no weight decay, shuffled minibatches)."""
    s, f = torch.tensor(np.nan_to_num(sims, nan=-1e4)).float(), torch.tensor(feats).float()
    g = torch.tensor(np.nan_to_num(gains, nan=-np.inf)).float()
    mask = torch.tensor(~np.isnan(sims))
    w = torch.zeros(len(FEATURES), requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.as_tensor(rows)
    for _ in range(epochs):
        for b in idx[torch.randperm(len(idx), generator=gen)].split(batch):
            loss = loss_fn(score_settings(s[b], f[b], w), g[b], mask[b])  # (batch, width)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: the config's model.head.learning_rate")
    p.add_argument("--prior_weight", type=float, default=0.2)
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument("--json", help="write the rows here")
    args, rest = p.parse_known_args()
    module, dm = load_run(["--config", args.config, *rest])
    examples, chars = dm.train_examples, dm.characters
    table = lm_table(examples, chars, module.likelihood)
    gains = table.gain_matrix()
    sims, feats = turn_features(module, examples, chars)
    priors = np.zeros_like(sims)
    for row, p_ in enumerate(loo_priors(examples, table.gains)):
        priors[row, : len(p_)] = p_
    dialogues = np.array([e.dialogue_id for e in examples])
    ids = sorted({e.character_id for e in examples})
    fold_of = {cid: i % 2 for i, cid in enumerate(ids)}
    fold = np.array([fold_of[e.character_id] for e in examples])
    loss = module.loss_options
    lr = args.lr or module.head_options.learning_rate
    n = np.arange(len(examples))
    plain_sims = np.where(np.isnan(sims), -np.inf, sims)
    out = []
    print(f"{len(examples)} training turns of {len(ids)} characters, 2 folds by character\n")
    print(
        "| variant | held-out Δ top-1 gain vs similarity | Δ with λ·prior (vs similarity + λ·prior) | weights (fold 0) |"
    )
    print("|---|---|---|---|")
    for name, options in VARIANTS.items():
        loss_fn = LSRLoss(
            gamma=loss.gamma,
            beta=options.get("beta", loss.beta),
            **{k: v for k, v in options.items() if k != "beta"},
        )
        diff, diff_p, weights = np.zeros(len(n)), np.zeros(len(n)), []
        for f in (0, 1):
            w = train_head(
                sims, feats, gains, n[fold != f], loss_fn, args.epochs, lr, dm.hparams.batch_size, f
            )
            weights.append(w.tolist())
            rule = plain_sims + feats @ w.numpy()
            test = fold == f
            for target, extra in ((diff, 0.0), (diff_p, args.prior_weight)):
                mine = gains[n, np.argmax(rule + extra * priors, 1)]
                ref = gains[n, np.argmax(plain_sims + extra * priors, 1)]
                target[test] = (mine - ref)[test]
        ci = bootstrap_ci(diff, dialogues, args.n_boot, 0)
        ci_p = bootstrap_ci(diff_p, dialogues, args.n_boot, 0)
        row = {"variant": name, "delta": diff.mean(), "ci": ci, "delta_prior": diff_p.mean(), "ci_prior": ci_p,
               "weights": weights, "n": len(n)}  # fmt: skip
        out.append(row)
        w0 = ", ".join(f"{x:+.2f}" for x in weights[0])
        print(f"| {name} | {diff.mean():+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] | "
              f"{diff_p.mean():+.4f} [{ci_p[0]:+.4f}, {ci_p[1]:+.4f}] | {w0} |")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
