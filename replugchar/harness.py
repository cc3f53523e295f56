"""``replugchar evaluate``: pick the held-out examples, build the eight methods, compute and save the table."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np

from . import evaluation as ev
from .data import LSRDataModule
from .evaluation import Embed
from .lm_scoring import PromptTemplate, ScoreRequest
from .models import EMBEDDED_ENCODER, EMBEDDED_LM

log = logging.getLogger(__name__)


def evaluate(
    data_dir: str = "demo",
    out_dir: str = "runs/eval",
    trained: str | None = None,
    base_encoder: str = EMBEDDED_ENCODER,
    lm: str = EMBEDDED_LM,
    template: PromptTemplate | None = None,
    query_text: str = "query",
    split: str = "val",
    val_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = 200,
    k: int = 5,
    prior_weight: float | None = None,
    concat_k: int = 0,
    distractors: int = 20,
    ensemble_temperature: float = 0.05,
    n_boot: int = 1000,
    lm_dtype: str = "auto",
    max_length: int = 512,
    lm_batch_tokens: int = 4096,
    score_cache_dir: str | None = "auto",
    methods: list[str] | None = None,
) -> ev.EvalResult:
    """Compare retrievers on held-out characters by the frozen LM's likelihood of the gold replies.

    Args:
        data_dir: data folder (shared schema) or "demo".
        out_dir: where results.json, results.md and results.png go.
        trained: export folder of the LSR-trained retriever (``replugchar export`` / end of ``fit``);
            None skips the trained methods. Its training characters are excluded from evaluation.
        base_encoder: the untrained encoder (the "base" methods).
        lm: frozen LM; with ``template``/``max_length`` it must match training to reuse the score cache.
        template: LM prompt template.
        query_text: "query" or "context_and_query" (as in training).
        split: "val" = the character-disjoint validation split of (val_fraction, seed); "all" = every example.
        val_fraction: as in the training data config.
        seed: split seed, also of sampling, random baseline and bootstrap.
        max_examples: cap on evaluated examples (LM cost: 1 + settings pairs per example).
        k: ranking depth for nDCG@k, the ensemble and recall of shown settings.
        prior_weight: λ for the "+prior" methods; None = the trained export's fitted value, else 0.1.
        concat_k: if > 0, also score the top-``concat_k`` settings concatenated in the prompt (extra LM calls).
        distractors: settings of other characters added to each pool for the harder ranking metrics (0 = off).
        ensemble_temperature: temperature of softmax(score) weights of the REPLUG ensemble.
        n_boot: bootstrap resamples (over dialogues) for the intervals.
        lm_dtype: "auto" = bfloat16 on GPU, float32 on CPU.
        max_length: token limit of prompt + response.
        lm_batch_tokens: token budget per LM forward pass.
        score_cache_dir: shared LM-score cache ("auto" = $REPLUGCHAR_CACHE/scores; null = in memory).
        methods: subset of the eight methods (default all that are available).
    """
    from .module import LSRModule

    dm = LSRDataModule(data_dir=data_dir, val_fraction=val_fraction if split == "val" else 0.0, seed=seed)
    dm.setup("validate")
    chars = dm.characters
    examples = dm.val_examples if split == "val" else dm.train_examples
    retriever = None
    if trained:
        from .retriever import Retriever

        retriever = Retriever.load(trained)
        seen = set(retriever.config.get("train_characters") or [])
        before = len(examples)
        examples = [e for e in examples if e.character_id not in seen]
        log.info("excluded %d examples of characters the retriever was trained on", before - len(examples))
        if prior_weight is None:
            prior_weight = retriever.config.get("prior_weight")
    prior_weight = 0.1 if prior_weight is None else prior_weight
    if max_examples is not None and len(examples) > max_examples:
        picked = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in picked]
    if not examples:
        raise ValueError(f"no examples to evaluate in {data_dir} (split={split})")

    module = LSRModule(
        encoder=base_encoder,
        lm=lm,
        template=template,
        query_text=query_text,
        lm_dtype=lm_dtype,
        max_length=max_length,
        lm_batch_tokens=lm_batch_tokens,
        score_cache_dir=score_cache_dir,
        k=k,
    )
    scorer = module.scorer
    table = ev.lm_table(examples, chars, scorer)
    gains = table.gains
    priors = ev.loo_priors(examples, gains)
    queries = module.query_strings(examples)

    wanted = list(methods or ev.METHODS)
    rng = np.random.default_rng(seed)
    scores: dict[str, list[np.ndarray] | None] = {}
    if "none" in wanted:
        scores["none"] = None
    if "random" in wanted:
        scores["random"] = [rng.random(len(chars[e.character_id].settings)) for e in examples]
    if "bm25" in wanted:
        scores["bm25"] = ev.bm25_scores(examples, chars)
    # (query embedder, setting embedder) per encoder: one definition serves the table and the distractor pool
    embedders: dict[str, tuple[Embed, Embed]] = {
        "base": (lambda t: module.encode_all(t, queries=True), module.encode_all)
    }
    if retriever is not None:
        embedders["trained"] = (
            lambda t: retriever.query_encoder.encode(t, normalize_embeddings=True),
            lambda t: retriever.encoder.encode(t, normalize_embeddings=True),
        )
    for name, (embed_query, embed_setting) in embedders.items():
        if name in wanted or f"{name}+prior" in wanted:
            cos = ev.cosine_scores(examples, chars, embed_query, embed_setting, queries)
            scores[name] = cos
            scores[f"{name}+prior"] = [c + prior_weight * p for c, p in zip(cos, priors)]
    if "oracle" in wanted:
        scores["oracle"] = gains
    scores = {m: v for m, v in scores.items() if m in wanted}

    per_method: dict[str, list[dict]] = {}
    for method, sc in scores.items():
        rows = []
        for i, e in enumerate(examples):
            row = ev.example_metrics(
                None if sc is None else sc[i], table, i, k, e.shown_setting_indices, ensemble_temperature
            )
            if (
                sc is not None
            ):  # where the method ranks the character's most broadly useful setting (LOO prior)
                order = np.argsort(-sc[i], kind="stable")
                row["rank_top_prior"] = float(np.where(order == int(np.argmax(priors[i])))[0][0] + 1)
            rows.append(row)
        per_method[method] = rows
    if concat_k > 0:
        _add_concat(per_method, scores, examples, chars, scorer, concat_k)
    pairs = [("trained+prior", "base"), ("trained", "base"), ("base+prior", "base")]
    result = ev.EvalResult()
    result.table, result.paired = ev.aggregate(per_method, examples, n_boot, seed, pairs)
    if distractors > 0:
        result.pool = _pool_metrics(
            list(scores), examples, chars, gains, priors, prior_weight, distractors, seed, embedders, queries
        )
    result.meta = {
        "data_dir": str(data_dir),
        "split": split,
        "n_examples": len(examples),
        "n_characters": len({e.character_id for e in examples}),
        "lm": lm,
        "base_encoder": base_encoder,
        "trained": trained,
        "prior_weight": prior_weight,
        "k": k,
        "distractors": distractors,
        "score_cache": str(scorer.folder),
        "lm_pairs_scored_now": scorer.misses,
    }
    out = ev.save_result(result, out_dir)
    print(ev.markdown_table(result))
    print(f"\nevaluation written to {out}/results.json, results.md, results.png")
    return result


def _add_concat(per_method, scores, examples, chars, scorer, concat_k: int) -> None:
    requests, where = [], []
    for method, sc in scores.items():
        if sc is None:
            continue
        for i, e in enumerate(examples):
            top = np.argsort(-sc[i], kind="stable")[:concat_k]
            requests.append(ScoreRequest(e, tuple(chars[e.character_id].settings[j] for j in top)))
            where.append((method, i))
    res = scorer.score(requests)
    scorer.flush()
    for (method, i), v in zip(where, res.logp_mean.tolist()):
        per_method[method][i][f"nll_top{concat_k}_concat"] = -v


def _pool_metrics(
    methods: Sequence[str],
    examples,
    chars,
    gains,
    priors,
    prior_weight: float,
    n_distract: int,
    seed: int,
    embedders: dict[str, tuple[Embed, Embed]],
    queries: Sequence[str],
) -> dict:
    """Rank own settings + distractors; hit@1 / MRR of the own LM-best setting (distractors count as wrong)."""
    rng = random.Random(seed)
    pool_settings = [(cid, s) for cid, c in chars.items() for s in c.settings]
    qemb = {name: f[0](list(queries)) for name, f in embedders.items()}
    emb_cache: dict[tuple[str, str], np.ndarray] = {}
    out: dict[str, dict[str, list[float]]] = {
        m: {"hit1_lm_best": [], "mrr": []} for m in methods if m != "none"
    }
    for i, e in enumerate(examples):
        own = list(chars[e.character_id].settings)
        others = [s for cid, s in pool_settings if cid != e.character_id]
        distract = rng.sample(others, min(n_distract, len(others)))
        pool = own + distract
        best = int(np.argmax(gains[i]))
        prior_vec = np.concatenate([priors[i], np.zeros(len(distract))])
        for method in out:
            if method == "random":
                s = np.array([rng.random() for _ in pool])
            elif method == "oracle":
                s = np.concatenate([gains[i], np.full(len(distract), -np.inf)])
            elif method == "bm25":
                s = ev.bm25_rank(pool, [e.query], chars[e.character_id].language)[0]
            else:
                name = method.split("+")[0]
                if (name, e.character_id) not in emb_cache:
                    emb_cache[(name, e.character_id)] = embedders[name][1](own)
                emb = np.concatenate([emb_cache[(name, e.character_id)], embedders[name][1](distract)])
                s = emb @ qemb[name][i]
                if method.endswith("+prior"):
                    s = s + prior_weight * prior_vec
            order = np.argsort(-s, kind="stable")
            rank = int(np.where(order == best)[0][0]) + 1
            out[method]["hit1_lm_best"].append(float(rank == 1))
            out[method]["mrr"].append(1.0 / rank)
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in out.items()}


def main(argv: list[str]) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="replugchar evaluate", description=evaluate.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate, as_group=False)
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k != "config"}
    evaluate(**kwargs)
