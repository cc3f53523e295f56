"""``replugchar evaluate``: pick the held-out examples, score every method, save the table.

Every retriever row ranks through :meth:`~replugchar.retrieval.retriever.Retriever.rank_example` (the inference path):
``base`` is the untrained encoder, ``trained`` the exported encoder alone, ``dialogue`` the exported scoring rule
(dialogue evidence), each ``+prior`` with λ times the character's leave-one-dialogue-out LM-utility prior. The
metrics live in :mod:`replugchar.evaluation.metrics`; this module never imports the training module.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..core.data import Corpus, check_split, split_characters
from ..core.scoring import ScoringRule
from ..lm.gains import LMTable
from ..lm.likelihood import LoglikRequest, PromptTemplate
from ..lm.loglik_cache import LikelihoodOptions, build_likelihood
from ..lm.models import EMBEDDED_ENCODER, EMBEDDED_LM
from . import metrics as ev

log = logging.getLogger(__name__)
PAIRS = (
    ("dialogue+prior", "base"),
    ("dialogue", "base"),
    ("trained", "base"),
    ("trained+prior", "base"),
    ("base+prior", "base"),
)


def evaluate(
    data_dir: str = "demo",
    out: str = "runs/eval",
    retriever: str | None = None,
    base_encoder: str = EMBEDDED_ENCODER,
    lm: str | None = None,
    template: PromptTemplate | None = None,
    query_text: str = "query",
    split: Literal["val", "test", "all"] = "val",
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    max_examples: int | None = 200,
    k: int = 5,
    prior_weight: float | None = None,
    concat_k: int = 0,
    distractors: int = 20,
    ensemble_temperature: float = 0.05,
    n_boot: int = 1000,
    lm_dtype: str | None = None,
    max_length: int | None = None,
    max_batch_tokens: int = 4096,
    loglik_cache_dir: str | None = "auto",
    methods: list[str] | None = None,
    trust_remote_code: bool = False,
) -> ev.EvalResult:
    """Compare retrievers on held-out characters by the frozen LM's likelihood of the gold replies.

    Args:
        data_dir: data folder (shared schema) or "demo".
        out: folder to write results.json, results.md and results.png to.
        retriever: export folder of the LSR-trained retriever (``replugchar export`` / end of ``fit``);
            None skips the trained and dialogue methods. Its training characters are excluded from evaluation.
        base_encoder: the untrained encoder (the "base" methods).
        lm: frozen LM; None = the one the trained retriever was trained with (retriever.json), else SmolLM2.
        template: LM prompt template; None = the trained retriever's, else the default.
        query_text: "query" or "context_and_query" for the base encoder (the trained retriever uses its own).
        split: "val" / "test" = that character split of (val_fraction, test_fraction, seed), as in the fit
            config; "all" = every example.
        val_fraction: None = the trained export's (retriever.json "split", what training used), else 0.2.
        test_fraction: None = the trained export's, else 0.
        seed: split seed, also of sampling, random baseline and bootstrap; None = the trained export's, else 0.
        max_examples: cap on evaluated examples (LM cost: 1 + settings pairs per example).
        k: ranking depth for nDCG@k, the ensemble and recall of shown settings.
        prior_weight: λ for the "+prior" methods; None = the trained export's fitted value, else 0.1.
        concat_k: if > 0, also the LM's log-likelihood with the top-``concat_k`` settings concatenated in the
            prompt (extra LM calls).
        distractors: settings of other characters added to each pool for the harder ranking metrics (0 = off).
        ensemble_temperature: temperature of softmax(score) weights of the REPLUG ensemble.
        n_boot: bootstrap resamples (over dialogues) for the intervals.
        lm_dtype: None = the trained retriever's, else "auto" (bfloat16 on GPU, float32 on CPU).
        max_length: token limit of prompt + response; None = the trained retriever's, else 512.
        max_batch_tokens: token budget per LM forward pass (padded tokens counted).
        loglik_cache_dir: shared log-likelihood cache ("auto" = $REPLUGCHAR_CACHE/logliks; null = in memory).
        methods: subset of :data:`~replugchar.evaluation.metrics.METHODS` (default all that are available).
        trust_remote_code: let the LM's repository run its own code. Only this option (your config or command
            line) turns it on; an export folder's retriever.json never does.
    """
    from ..lm.models import load_encoder
    from ..retrieval.retriever import Retriever

    if split not in ("val", "test", "all"):
        raise ValueError(f"split must be val, test or all, got {split!r}")
    exported = Retriever.load(retriever) if retriever else None
    config = exported.config if exported else {}
    lm, own_lm = _frozen_lm(config, lm)
    # neither the retriever's nor a fine-tuned teacher's training characters are evaluated
    exclude = set(config.get("train_characters") or []) | _finetuned(lm)
    val_fraction, test_fraction, seed = resolve_split(config, val_fraction, test_fraction, seed)
    examples, chars = select_examples(
        data_dir, split, val_fraction, test_fraction, seed, max_examples, exclude
    )
    if prior_weight is None:
        prior_weight = exported.rule.prior_weight if exported else 0.1
    stored = config.get("scorer", {})
    options = LikelihoodOptions(
        name=lm,
        revision=None if own_lm else stored.get("lm_revision"),
        dtype=lm_dtype or stored.get("lm_dtype", "auto"),
        max_length=max_length or stored.get("max_length", 512),
        max_batch_tokens=max_batch_tokens,
        trust_remote_code=trust_remote_code,
        loglik_cache_dir=loglik_cache_dir,
    )
    likelihood = build_likelihood(options, template or stored.get("template") or config.get("template"))
    table = ev.lm_table(examples, chars, likelihood)
    ranking = _Ranking(
        examples,
        chars,
        table,
        ev.loo_priors(examples, table.gains),
        Retriever(load_encoder(base_encoder), None, {"query_text": query_text}),
        exported,
        prior_weight,
        seed,
    )
    result = _compare(
        ranking,
        list(methods or ev.METHODS),
        likelihood,
        k,
        concat_k,
        distractors,
        ensemble_temperature,
        n_boot,
    )
    result.meta = {
        **_meta(data_dir, split, examples, base_encoder, retriever, prior_weight, k, distractors),
        "lm": likelihood.uncached.lm_key if likelihood.uncached else None,
        "scoring": exported.rule.to_dict() if exported else None,
        "loglik_cache": str(likelihood.folder),
        "lm_pairs_computed_now": likelihood.misses,
    }
    folder = ev.save_result(result, out)
    print(ev.markdown_table(result))
    print(f"\nevaluation written to {folder}/results.json, results.md, results.png")
    return result


def _meta(data_dir, split, examples, base_encoder, retriever, prior_weight, k, distractors) -> dict:
    """What results.json says the table was computed on (with the LM and log-likelihood cache of the run)."""
    return {
        "data_dir": str(data_dir),
        "split": split,
        "n_examples": len(examples),
        "n_characters": len({e.character_id for e in examples}),
        "base_encoder": base_encoder,
        "retriever": retriever,
        "prior_weight": prior_weight,
        "k": k,
        "distractors": distractors,
    }


@dataclasses.dataclass(frozen=True)
class _Ranking:
    """What every method of the table ranks with: the examples, their LM table and LOO priors, the retrievers."""

    examples: list
    chars: dict
    table: LMTable
    priors: list[np.ndarray]
    base: object
    exported: object | None
    prior_weight: float
    seed: int


def _frozen_lm(config: dict, lm: str | None) -> tuple[str, bool]:
    """(the LM that judges, whether the caller named it): ``lm``, else the export's, else SmolLM2."""
    own_lm = lm is not None  # --lm replaces the stored LM wholly (its revision too)
    lm = lm or config.get("scorer", {}).get("lm", EMBEDDED_LM)
    log.info("frozen LM: %s%s", lm, "" if own_lm or not config else " (from the export's retriever.json)")
    return lm, own_lm


def _compare(
    r: _Ranking,
    wanted: list[str],
    likelihood,
    k: int,
    concat_k: int,
    distractors: int,
    ensemble_temperature: float,
    n_boot: int,
) -> ev.EvalResult:
    """Every wanted method's per-example metrics, aggregated with paired intervals (and the distractor pools)."""
    scores = method_scores(wanted, r)
    per_method = {
        method: _rows(sc, r.examples, r.table, r.priors, k, ensemble_temperature)
        for method, sc in scores.items()
    }
    if concat_k > 0:
        _add_concat(per_method, scores, r.examples, r.chars, likelihood, concat_k)
    result = ev.EvalResult()
    result.table, result.paired = ev.aggregate(per_method, r.examples, n_boot, r.seed, PAIRS)
    if distractors > 0:
        result.pool = _pool_metrics(list(scores), r, distractors)
    return result


def _finetuned(lm: str) -> set[str]:
    """Training characters of a ``finetune-lm`` folder (empty for any other LM)."""
    from pathlib import Path

    if not Path(lm).expanduser().is_dir():
        return set()
    from ..lm.finetuned import finetuned_characters

    return finetuned_characters(lm)


def resolve_split(
    config: dict, val_fraction: float | None, test_fraction: float | None, seed: int | None
) -> tuple[float, float, int]:
    """The character split to evaluate on: what is given, else the trained export's (retriever.json "split",
    written from the fit config's data section), else (0.2, 0.0, 0)."""
    stored = config.get("split") or {}
    return (
        stored.get("val_fraction", 0.2) if val_fraction is None else val_fraction,
        stored.get("test_fraction", 0.0) if test_fraction is None else test_fraction,
        int(stored.get("seed", 0)) if seed is None else seed,
    )


def select_examples(data_dir, split, val_fraction, test_fraction, seed, max_examples, exclude=None):
    """(examples, characters): the split's examples, minus characters the retriever trained on, capped."""
    everything = split == "all"
    if not everything:
        check_split(val_fraction, test_fraction, where="")
    corpus = Corpus.load(data_dir)
    examples = corpus.examples
    if not everything:
        chosen = split_characters(list(corpus.characters), val_fraction, seed, test_fraction)[split]
        examples = [e for e in examples if e.character_id in chosen]
    seen = set(exclude or [])
    before = len(examples)
    examples = [e for e in examples if e.character_id not in seen]
    if before > len(examples):
        log.info("excluded %d examples of characters the retriever was trained on", before - len(examples))
    if max_examples is not None and len(examples) > max_examples:
        picked = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in picked]
    if not examples:
        raise ValueError(f"no examples to evaluate in {data_dir} (split={split})")
    return examples, corpus.characters


def _retrievers(base, exported, prior_weight: float) -> dict:
    """method -> (retriever, rule, uses priors): every retriever row of the table."""
    zero = ScoringRule()
    out = {
        "base": (base, zero, False),
        "base+prior": (base, dataclasses.replace(zero, prior_weight=prior_weight), True),
    }
    if exported is not None:
        rule = exported.rule
        out["trained"] = (exported, zero, False)
        out["trained+prior"] = (exported, dataclasses.replace(zero, prior_weight=prior_weight), True)
        # the exported rule as it serves: without priors its generality term is w(x, h)·g(s), whose base weight
        # is the rule's λ, so λ stays (zeroing it would change the learned generality's weight)
        out["dialogue"] = (exported, rule, False)
        out["dialogue+prior"] = (exported, dataclasses.replace(rule, prior_weight=prior_weight), True)
    return out


def method_scores(wanted: Sequence[str], r: _Ranking) -> dict:
    """method -> per-example score arrays over the character's settings (None for "none")."""
    rng = np.random.default_rng(r.seed)
    scores: dict[str, list[np.ndarray] | None] = {}
    if "none" in wanted:
        scores["none"] = None
    if "random" in wanted:
        scores["random"] = [rng.random(len(r.chars[e.character_id].settings)) for e in r.examples]
    if "bm25" in wanted:
        scores["bm25"] = ev.bm25_scores(r.examples, r.chars)
    for method, (retriever, rule, with_prior) in _retrievers(r.base, r.exported, r.prior_weight).items():
        if method in wanted:
            scores[method] = [
                retriever.rank_example(
                    e, r.chars[e.character_id].settings, r.priors[i] if with_prior else None, rule=rule
                )
                for i, e in enumerate(r.examples)
            ]
    if "oracle" in wanted:
        scores["oracle"] = r.table.gains
    return {m: scores[m] for m in wanted if m in scores}


def _rows(sc, examples, table, priors, k: int, temperature: float) -> list[dict]:
    rows = []
    for i, e in enumerate(examples):
        row = ev.example_metrics(
            None if sc is None else sc[i], table, i, k, e.shown_setting_indices, temperature
        )
        if sc is not None:  # where the method ranks the character's most broadly useful setting (LOO prior)
            order = np.argsort(-sc[i], kind="stable")
            row["rank_top_prior"] = float(np.where(order == int(np.argmax(priors[i])))[0][0] + 1)
        rows.append(row)
    return rows


def _add_concat(per_method, scores, examples, chars, likelihood, concat_k: int) -> None:
    requests, where = [], []
    for method, sc in scores.items():
        if sc is None:
            continue
        for i, e in enumerate(examples):
            top = np.argsort(-sc[i], kind="stable")[:concat_k]
            requests.append(LoglikRequest(e, tuple(chars[e.character_id].settings[j] for j in top)))
            where.append((method, i))
    res = likelihood.loglik(requests)
    likelihood.flush()
    for (method, i), v in zip(where, res.logp_mean.tolist()):
        per_method[method][i][f"nll_top{concat_k}_concat"] = -v


def _pool_metrics(methods: Sequence[str], r: _Ranking, n_distract: int) -> dict:
    """Rank own settings + distractors; hit@1 / MRR of the own LM-best setting (distractors count as wrong)."""
    rng = random.Random(r.seed)
    pool_settings = [(cid, s) for cid, c in r.chars.items() for s in c.settings]
    out: dict[str, dict[str, list[float]]] = {
        m: {"hit1_lm_best": [], "mrr": []} for m in methods if m != "none"
    }
    for i, e in enumerate(r.examples):
        own = list(r.chars[e.character_id].settings)
        others = [s for cid, s in pool_settings if cid != e.character_id]
        distract = rng.sample(others, min(n_distract, len(others)))
        best = int(np.argmax(r.table.gains[i]))
        for method, s in _pool_scores(list(out), r, i, own, distract, rng).items():
            rank = int(np.where(np.argsort(-s, kind="stable") == best)[0][0]) + 1
            out[method]["hit1_lm_best"].append(float(rank == 1))
            out[method]["mrr"].append(1.0 / rank)
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in out.items()}


def _pool_scores(methods, r: _Ranking, i: int, own: list[str], distract: list[str], rng) -> dict:
    """method -> scores of example ``i``'s pool (its character's settings, then the distractors)."""
    e = r.examples[i]
    pool = own + distract
    prior_vec = np.concatenate([r.priors[i], np.zeros(len(distract))])
    rankers = _retrievers(r.base, r.exported, r.prior_weight)
    out = {}
    for method in methods:
        if method == "random":
            out[method] = np.array([rng.random() for _ in pool])
        elif method == "oracle":
            out[method] = np.concatenate([r.table.gains[i], np.full(len(distract), -np.inf)])
        elif method == "bm25":
            out[method] = ev.bm25_rank(pool, [e.query], r.chars[e.character_id].language)[0]
        else:
            retriever, rule, with_prior = rankers[method]
            out[method] = retriever.rank_example(e, pool, prior_vec if with_prior else None, rule=rule)
    return out
