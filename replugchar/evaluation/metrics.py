"""Does the retriever make the frozen LM's gold replies likelier? Metrics, baselines, intervals, tables, plots.

Every method ranks the settings of the example's character. All LM numbers come from one
:class:`~replugchar.lm.loglik_cache.CachedLikelihood` (the frozen LM training used): for each example the gold response's
log-likelihood is computed once with no setting and once with each setting, so top-1 NLL, hit@1 of the LM-best setting, MRR and
nDCG of every method are lookups. Only the top-k *concatenated* prompt costs extra LM calls (``concat_k``).

Priors for an evaluated character come from that character's *other* dialogues (leave one dialogue out), never
from the dialogue being scored.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_file, write_text
from ..core.data import Character, Example
from ..lm.gains import LMTable, lm_table, loo_priors  # noqa: F401  (re-exported: the evaluation API)

METHODS = (
    "none",
    "random",
    "bm25",
    "base",
    "base+prior",
    "trained",
    "trained+prior",
    "dialogue",
    "dialogue+prior",
    "oracle",
)
"""Rows of ``replugchar evaluate``: no setting, random, BM25, the untrained encoder (base), the exported encoder
alone (trained), the exported scoring rule with its dialogue evidence (dialogue), each +prior, and the LM's own
best setting (oracle)."""
QUERY_GROUPS = ("all", "greeting", "closing", "other")
HEADLINE = ("nll_top1", "hit1_lm_best", "ndcg", "mrr")


def bm25_rank(documents: Sequence[str], queries: Sequence[str], language: str = "en") -> list[np.ndarray]:
    """BM25 (bm25s) scores of ``documents`` for each query; all zeros for a query made only of stopwords.

    Japanese and Chinese have no spaces between words, so their texts are indexed as character bigrams.
    """
    import logging

    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    stop = "en" if language == "en" else None
    if language in ("ja", "zh"):
        documents, queries = [_bigrams(d) for d in documents], [_bigrams(q) for q in queries]
    r = bm25s.BM25()
    r.index(bm25s.tokenize(list(documents), stopwords=stop, show_progress=False), show_progress=False)
    out = []
    for q in queries:
        tokens = bm25s.tokenize([q], stopwords=stop, return_ids=False, show_progress=False)[0]
        out.append(np.asarray(r.get_scores(tokens), dtype=np.float64) if tokens else np.zeros(len(documents)))
    return out


def _bigrams(text: str) -> str:
    chars = [c for c in text if c.isalnum()]
    return " ".join(a + b for a, b in itertools.pairwise(chars))


def bm25_scores(examples: Sequence[Example], characters: dict[str, Character]) -> list[np.ndarray]:
    by_char: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_char[e.character_id].append(i)
    out: list[np.ndarray] = [np.zeros(0)] * len(examples)
    for cid, rows in by_char.items():
        char = characters[cid]
        for i, s in zip(rows, bm25_rank(char.settings, [examples[i].query for i in rows], char.language)):
            out[i] = s
    return out


# ----------------------------------------------------------------------------------------------- metrics
def example_metrics(
    scores: np.ndarray | None, lm: LMTable, i: int, k: int, shown: Sequence[int] | None, temperature: float
) -> dict[str, float]:
    gains, none = lm.gains[i], lm.none[i]
    if scores is None:  # no setting
        return {"nll_top1": -none, "nll_ensemble": -none}
    order = np.argsort(-scores, kind="stable")
    top1 = order[0]
    best = int(np.argmax(gains))
    rank_best = int(np.where(order == best)[0][0]) + 1
    rel = np.maximum(gains, 0.0)
    kk = min(k, len(order))
    disc = 1.0 / np.log2(np.arange(2, kk + 2))
    ideal = float((np.sort(rel)[::-1][:kk] * disc).sum())
    ndcg = float((rel[order[:kk]] * disc).sum() / ideal) if ideal > 0 else 1.0
    top = order[:kk]
    w = np.exp((scores[top] - scores[top].max()) / temperature)
    w /= w.sum()
    ens = float(np.log(np.sum(w * np.exp(lm.sums[i][top] - lm.sums[i][top].max()))) + lm.sums[i][top].max())
    out = {
        "nll_top1": -(none + gains[top1]),
        "nll_ensemble": -ens / max(int(lm.n_tokens[i]), 1),
        "hit1_lm_best": float(top1 == best),
        "mrr": 1.0 / rank_best,
        "ndcg": ndcg,
    }
    if shown:
        out["recall_shown"] = len(set(top.tolist()) & set(shown)) / len(shown)
    return out


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling whole dialogues."""
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    means = sums[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class EvalResult:
    table: dict = field(default_factory=dict)  # method -> group -> metric -> {mean, lo, hi, n}
    paired: dict = field(default_factory=dict)  # "a vs b" -> group -> metric -> {diff, lo, hi, p_better}
    pool: dict = field(default_factory=dict)  # method -> {hit1_lm_best, mrr} with distractors
    meta: dict = field(default_factory=dict)


def aggregate(
    per_method: dict[str, list[dict]],
    examples: Sequence[Example],
    n_boot: int,
    seed: int,
    pairs: Sequence[tuple[str, str]],
) -> tuple[dict, dict]:
    """(table, paired): per method, group and metric the mean with its 95% dialogue-bootstrap interval; per pair
    of methods the mean paired difference of the headline metrics with its interval."""
    dialogues = np.array([e.dialogue_id for e in examples])
    qtypes = np.array([e.query_type for e in examples])
    table: dict = {}
    for method, rows in per_method.items():
        values = {m: _column(rows, m) for m in sorted({m for r in rows for m in r})}
        table[method] = {
            group: {m: {"mean": mean, "lo": lo, "hi": hi, "n": n} for m, (mean, lo, hi, n) in stats.items()}
            for group, stats in _by_group(values, qtypes, dialogues, n_boot, seed).items()
        }
    paired: dict = {}
    for a, b in pairs:
        if a not in per_method or b not in per_method:
            continue
        diffs = {m: _column(per_method[a], m) - _column(per_method[b], m) for m in HEADLINE}
        paired[f"{a} vs {b}"] = {
            group: {m: {"diff": mean, "lo": lo, "hi": hi} for m, (mean, lo, hi, _) in stats.items()}
            for group, stats in _by_group(diffs, qtypes, dialogues, n_boot, seed).items()
        }
    return table, paired


def _column(rows: Sequence[dict], metric: str) -> np.ndarray:
    """One metric over the examples, NaN where it is not defined (e.g. a metric of greetings only)."""
    return np.array([r.get(metric, np.nan) for r in rows])


def _by_group(values: dict[str, np.ndarray], qtypes, dialogues, n_boot: int, seed: int) -> dict:
    """group -> metric -> (mean, lo, hi, n) over the group's examples where the metric is defined; a group
    with no example and a metric with no value there are left out."""
    out: dict = {}
    for group in QUERY_GROUPS:
        mask = np.ones(len(qtypes), bool) if group == "all" else qtypes == group
        if not mask.any():
            continue
        out[group] = {}
        for metric, vals in values.items():
            sel = mask & ~np.isnan(vals)
            if sel.any():
                lo, hi = bootstrap_ci(vals[sel], dialogues[sel], n_boot, seed)
                out[group][metric] = (float(vals[sel].mean()), lo, hi, int(sel.sum()))
    return out


def markdown_table(result: EvalResult, groups: Sequence[str] = ("all", "greeting")) -> str:
    def fmt(cell: dict | None, scale: float = 1.0) -> str:
        if not cell:
            return "–"
        return f"{cell['mean'] * scale:.3f} [{cell['lo'] * scale:.3f}, {cell['hi'] * scale:.3f}]"

    head = ["method"] + [f"{m} ({g})" for g in groups for m in ("NLL top-1", "hit@1 LM-best", "nDCG@k")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_group in result.table.items():
        cells = [method]
        for g in groups:
            row = by_group.get(g, {})
            cells += [fmt(row.get("nll_top1")), fmt(row.get("hit1_lm_best")), fmt(row.get("ndcg"))]
        lines.append("| " + " | ".join(cells) + " |")
    n = {g: result.table.get("none", {}).get(g, {}).get("nll_top1", {}).get("n", 0) for g in groups}
    lines.append("")
    lines.append(
        "NLL = gold-response negative log-likelihood per token under the frozen LM (lower is better); "
        "[95% bootstrap interval over dialogues]; n = " + ", ".join(f"{g}: {n[g]}" for g in groups) + "."
    )
    if result.paired:
        lines += [
            "",
            "| paired difference (a − b) | group | ΔNLL top-1 | Δhit@1 | ΔnDCG |",
            "|---|---|---|---|---|",
        ]
        for key, by_group in result.paired.items():
            for g in groups:
                row = by_group.get(g)
                if not row:
                    continue
                cells = [
                    f"{row[m]['diff']:+.3f} [{row[m]['lo']:+.3f}, {row[m]['hi']:+.3f}]" if m in row else "–"
                    for m in ("nll_top1", "hit1_lm_best", "ndcg")
                ]
                lines.append(f"| {key} | {g} | " + " | ".join(cells) + " |")
    if result.pool:
        lines += [
            "",
            f"Harder pool (own settings + {result.meta.get('distractors')} distractors from other characters):",
            "",
            "| method | hit@1 LM-best | MRR |",
            "|---|---|---|",
        ]
        for method, row in result.pool.items():
            lines.append(f"| {method} | {row['hit1_lm_best']:.3f} | {row['mrr']:.3f} |")
    return "\n".join(lines)


def plot(result: EvalResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result.table)
    groups = [
        g for g in ("all", "greeting", "closing", "other") if any(g in result.table[m] for m in methods)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, metric, label in (
        (axes[0], "nll_top1", "gold NLL / token (top-1 setting)"),
        (axes[1], "hit1_lm_best", "hit@1 of the LM-best setting"),
    ):
        width = 0.8 / len(groups)
        for gi, g in enumerate(groups):
            xs, ys, errs = [], [], []
            for mi, m in enumerate(methods):
                cell = result.table[m].get(g, {}).get(metric)
                if cell:
                    xs.append(mi + gi * width)
                    ys.append(cell["mean"])
                    errs.append([[cell["mean"] - cell["lo"]], [cell["hi"] - cell["mean"]]])
            if xs:
                err = np.array(errs).reshape(len(xs), 2).T
                ax.bar(xs, ys, width, yerr=err, label=g, capsize=2)
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30, ha="right")
        ax.set_title(label)
        if metric == "nll_top1":
            lo = min(
                c["lo"]
                for m in methods
                for c in [result.table[m].get(g, {}).get(metric) for g in groups]
                if c
            )
            ax.set_ylim(bottom=lo * 0.97)
    axes[0].legend(title="query type")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def save_result(result: EvalResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"table": result.table, "paired": result.paired, "pool": result.pool, "meta": result.meta}
    write_text(out / "results.json", json.dumps(record, indent=2))  # atomic: a kill leaves the old or the new
    write_text(out / "results.md", markdown_table(result) + "\n")
    plot(result, out / "results.png")
    return out
