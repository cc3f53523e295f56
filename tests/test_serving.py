"""The exported FAISS index is what serves: ``Retriever.search`` takes its scores from a FAISS search restricted
to the character's ids, and they equal ``Retriever.rank`` (the one rule) and a plain FAISS search of the README,
for Flat, IVF and HNSW, with and without history, prior and learned generality."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest

from replugchar.core.data import Character
from replugchar.core.scoring import ScoringRule
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.export import export_retriever
from replugchar.retrieval.retriever import Retriever
from replugchar.training.module import LSRModule

pytestmark = pytest.mark.usefixtures("rc_cache")
ALL = float("-inf")
WORDS = ["tea", "boats", "night shifts", "violins", "snow", "maps", "dogs", "running", "cheese", "the sea"]
HISTORY = [{"role": "user", "text": "Do you like boats?"}, {"role": "character", "text": "I love the sea."}]


def _characters() -> dict[str, Character]:
    """40 characters x 5 settings: enough vectors for IVF to have several lists."""
    rng = np.random.default_rng(0)
    out = {}
    for c in range(40):
        picks = rng.choice(len(WORDS), 5, replace=False)
        out[f"c{c:02d}"] = Character(
            f"c{c:02d}", tuple(f"I like {WORDS[i]} ({c}-{j})." for j, i in enumerate(picks))
        )
    return out


@pytest.fixture(scope="module", params=["flat", "ivf", "hnsw"])
def served(request, tmp_path_factory):
    module = LSRModule(
        encoder="tiny:bert", k=5, lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None)
    )
    module.characters = _characters()
    n = 200
    priors = np.random.default_rng(1).normal(size=n)
    v = np.random.default_rng(2).normal(scale=0.5, size=module.encoder.get_embedding_dimension())
    rule = ScoringRule(
        weights=(-0.4, 0.2, 0.1, -0.3), prior_weight=0.2, generality=tuple(v.tolist()), gate=(-0.3, 0.1)
    )
    folder = export_retriever(module, tmp_path_factory.mktemp(request.param) / "r", priors=priors, rule=rule,
                              kind=request.param)  # fmt: skip
    r = Retriever.load(folder)
    assert r.index.meta["kind"] == request.param
    if request.param == "ivf":
        assert r.index.index.nlist > 1
    return r, module.characters, priors


@pytest.mark.parametrize("history", [(), HISTORY], ids=["no-history", "history"])
def test_search_equals_rank_for_every_index_kind(served, history):
    r, chars, priors = served
    for cid in ("c00", "c17", "c39"):
        lo, hi = r.index.ranges[cid]
        hits = r.search(cid, "Hello! Do you like tea?", k=5, history=history, threshold=ALL)
        ranked = r.rank(list(chars[cid].settings), "Hello! Do you like tea?", history, priors[lo:hi])
        assert [h.index_in_character for h in hits] == list(np.argsort(-ranked, kind="stable"))
        np.testing.assert_allclose([h.score for h in hits], np.sort(ranked)[::-1], atol=1e-5)
        parts = np.array([h.similarity + h.dialogue for h in hits])
        assert np.all(np.abs(parts - [h.score for h in hits]) > 0)  # the prior term is part of the score


def test_without_history_and_gate_the_score_is_a_plain_faiss_search(served):
    """The README's path: FAISS alone, [q, λ/c] against the stored vectors (c: the prior scale), one character
    by id selector."""
    r, _, _ = served
    r = Retriever(r.encoder, r.index, r.config)
    r.rule = dataclasses.replace(r.rule, gate=(0.0, 0.0))
    index = r.index.index
    lam, c = r.rule.prior_weight, r.index.meta["prior_scale"]
    for cid in ("c03", "c21"):
        lo, hi = r.index.ranges[cid]
        q = r.embed_queries(["What do you do at night?"])
        qv = np.hstack([q, [[lam / c]]]).astype("float32")
        kind = r.index.meta["kind"]
        sel = faiss.IDSelectorRange(lo, hi)
        if kind == "hnsw":
            scores, found = faiss.downcast_index(index.storage).search(
                qv, hi - lo, params=faiss.SearchParameters(sel=sel)
            )
        elif kind == "ivf":
            scores, found = index.search(
                qv, hi - lo, params=faiss.SearchParametersIVF(sel=sel, nprobe=index.nlist)
            )
        else:
            scores, found = index.search(qv, hi - lo, params=faiss.SearchParameters(sel=sel))
        hits = r.search(cid, "What do you do at night?", k=hi - lo, threshold=ALL)
        assert [h.setting_id for h in hits] == list(found[0])
        np.testing.assert_allclose([h.score for h in hits], scores[0], atol=1e-5)


@pytest.mark.parametrize("history", [(), HISTORY], ids=["no-history", "history"])
def test_without_a_prior_search_equals_rank_and_is_the_rule_without_its_prior_term(served, history):
    """λ = 0, no generality, no gate: the index's prior coordinate meets a 0 in the query, so FAISS serves the
    rule's similarity (+ dialogue evidence) alone, for every index kind; ``rank`` without priors agrees."""
    r, chars, _ = served
    r = Retriever(r.encoder, r.index, r.config)
    r.rule = dataclasses.replace(r.rule, prior_weight=0.0, generality=(), gate=(0.0, 0.0))
    query = "Hello! Do you like tea?"
    for cid in ("c05", "c30"):
        hits = r.search(cid, query, k=5, history=history, threshold=ALL)
        ranked = r.rank(list(chars[cid].settings), query, history)
        assert [h.index_in_character for h in hits] == list(np.argsort(-ranked, kind="stable"))
        np.testing.assert_allclose([h.score for h in hits], np.sort(ranked)[::-1], atol=1e-5)
        parts = np.array([h.similarity + h.dialogue for h in hits])
        np.testing.assert_allclose(parts, [h.score for h in hits], atol=1e-5)  # no prior term left
        if history:
            assert any(abs(h.dialogue) > 1e-6 for h in hits)  # the dialogue evidence is still served
