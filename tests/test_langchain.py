"""The README's three ways to use an exported retriever outside replugchar, each checked to rank a character's
settings exactly as ``Retriever.search`` does:

1. plain sentence-transformers + ``faiss.read_index`` with the prior coordinate appended to the query;
2. LangChain's ``HuggingFaceEmbeddings`` over ``encoder/`` (cosine only: compared with λ = 0);
3. :class:`replugchar.retrieval.langchain.ReplugcharRetriever` (the whole rule: prior, threshold, dialogue history).

The export is built from the tiny in-code models (no training) with non-zero priors, λ = 0.3 and an own_max
weight of 0.5, so the prior and the history visibly move the ranking.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from replugchar.core.scoring import FEATURES, ScoringRule
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.export import export_retriever
from replugchar.retrieval.langchain import ReplugcharRetriever
from replugchar.retrieval.retriever import Retriever
from replugchar.training.module import LSRModule

LAMBDA = 0.3
W_OWN = 0.5
EXPORT_K = 3
QUERIES = ("Hello! How are you?", "Do you have any pets?", "What do you do for fun?")
ALL = float("-inf")  # threshold that keeps every setting


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, characters):
    module = LSRModule(
        encoder="tiny:bert", k=EXPORT_K, lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None)
    )
    module.characters = dict(characters)
    n = sum(len(c.settings) for c in characters.values())
    # z-score-like priors of spread ~1: with λ = 0.3 they reorder the tiny encoder's close cosines
    priors = np.random.default_rng(0).permutation(np.linspace(-1.5, 1.5, n))
    weights = tuple(W_OWN if f == "own_max" else 0.0 for f in FEATURES)
    rule = ScoringRule(weights=weights, prior_weight=LAMBDA, threshold=None)
    return export_retriever(module, tmp_path_factory.mktemp("lc") / "retriever", priors=priors, rule=rule)


@pytest.fixture(scope="module")
def loaded(export_dir):
    return Retriever.load(export_dir)


def _reference(retriever, cid, query, n, **kw):
    """(setting ids, scores) of Retriever.search over all of ``cid``'s settings."""
    hits = retriever.search(cid, query, k=n, threshold=ALL, **kw)
    assert len(hits) == n
    return [h.setting_id for h in hits], np.array([h.score for h in hits])


def assert_same_ranking(ids, scores, ref_ids, ref_scores, tol=1e-5):
    """Same settings, same scores (within ``tol``) and the same order, where two settings may only swap places
    if their reference scores are tied within ``tol`` (float32 vs float64 arithmetic)."""
    assert sorted(ids) == sorted(ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=tol)
    ref = dict(zip(ref_ids, ref_scores))
    np.testing.assert_allclose([ref[i] for i in ids], scores, atol=tol)
    for pos, (i, j) in enumerate(zip(ids, ref_ids)):
        assert i == j or abs(ref[i] - ref_scores[pos]) <= tol, f"position {pos}: {ids} != {ref_ids}"


def test_export_fixture_prior_reorders(loaded, characters):
    """Guard: the fixture's prior changes some ranking, else the prior checks below would prove nothing."""
    changed = 0
    for cid, char in characters.items():
        for query in QUERIES:
            blended, _ = _reference(loaded, cid, query, len(char.settings))
            cosine, _ = _reference(loaded, cid, query, len(char.settings), prior_weight=0.0)
            changed += blended != cosine
    assert changed > 0


# ------------------------------------------------------------------------------------------------ 1. FAISS
def _readme_faiss(d: str, character_id: str, query: str):
    """The README snippet, verbatim but for its inputs (d, character_id, query) and the return."""
    # --- README snippet start
    import json
    from pathlib import Path

    import faiss
    import numpy as np
    from sentence_transformers import SentenceTransformer

    # retriever.json: k and the scoring rule (prior_weight λ, threshold τ); index.json: prior_scale α
    cfg = json.loads(Path(d, "retriever.json").read_text(encoding="utf-8"))
    alpha = json.loads(Path(d, "index.json").read_text(encoding="utf-8"))["prior_scale"]
    lines = Path(d, "settings.jsonl").read_text(encoding="utf-8").splitlines()
    settings = [json.loads(line) for line in lines]  # row i = vector i of index.faiss: [embedding, α·prior]
    encoder = SentenceTransformer(f"{d}/encoder")
    index = faiss.read_index(f"{d}/index.faiss")

    lam, tau = cfg["scoring"]["prior_weight"], cfg["scoring"]["threshold"]
    ids = [r["setting_id"] for r in settings if r["character_id"] == character_id]  # this character only
    q = encoder.encode([query], normalize_embeddings=True)
    q = np.hstack([q, [[lam / alpha]]]).astype("float32")  # score = cos + λ·prior, exactly
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
    scores, found = index.search(q, len(ids), params=params)  # all its settings, best first (or k=cfg["k"])
    hits = [(settings[i]["text"], float(s)) for s, i in zip(scores[0], found[0]) if tau is None or s >= tau]
    # --- README snippet end
    return found[0].tolist(), scores[0], hits


def test_readme_faiss_path_matches_search(export_dir, loaded, characters):
    for cid, char in characters.items():
        for query in QUERIES:
            ids, scores, hits = _readme_faiss(str(export_dir), cid, query)
            ref_ids, ref_scores = _reference(loaded, cid, query, len(char.settings))
            assert_same_ranking(ids, scores, ref_ids, ref_scores)
            assert [t for t, _ in hits] == [loaded.index.records[i].text for i in ids]
            assert {loaded.index.records[i].character_id for i in ids} == {cid}


def test_prior_coordinate_needs_the_scale(export_dir, loaded, characters):
    """Appending λ itself (not λ/α) would under-weight the prior √d times: the snippet's division matters."""
    import faiss

    index = faiss.read_index(f"{export_dir}/index.faiss")
    alpha = loaded.index.meta["prior_scale"]
    assert alpha == pytest.approx(1 / np.sqrt(loaded.index.dim))
    cid, query = "alice", QUERIES[0]
    q = loaded.embed_queries([query])
    lo, hi = loaded.index.ranges[cid]
    sel = faiss.SearchParameters(sel=faiss.IDSelectorRange(lo, hi))
    good, _ = index.search(np.hstack([q, [[LAMBDA / alpha]]]).astype("float32"), hi - lo, params=sel)
    bad, _ = index.search(np.hstack([q, [[LAMBDA]]]).astype("float32"), hi - lo, params=sel)
    _, ref = _reference(loaded, cid, query, hi - lo)
    np.testing.assert_allclose(good[0], ref, atol=1e-5)
    assert np.abs(np.sort(bad[0]) - np.sort(ref)).max() > 1e-2


# ------------------------------------------------------------------------------- 2. HuggingFaceEmbeddings
def _readme_huggingface(d: str):
    """The README snippet, verbatim but for its input (d) and the return."""
    # --- README snippet start
    import json
    from pathlib import Path

    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_huggingface import HuggingFaceEmbeddings

    lines = Path(d, "settings.jsonl").read_text(encoding="utf-8").splitlines()
    settings = [json.loads(line) for line in lines]
    embeddings = HuggingFaceEmbeddings(
        model_name=f"{d}/encoder", encode_kwargs={"normalize_embeddings": True}
    )
    store = InMemoryVectorStore(embeddings)
    store.add_texts([r["text"] for r in settings], metadatas=settings)

    def search(character_id: str, query: str, k: int = 5):  # cosine only: no prior, no dialogue history
        return store.similarity_search_with_score(
            query, k=k, filter=lambda doc: doc.metadata["character_id"] == character_id
        )

    # --- README snippet end
    return search


def test_readme_huggingface_embeddings_path_matches_cosine_search(export_dir, loaded, characters):
    try:
        import langchain_huggingface  # noqa: F401
    except ImportError as err:
        pytest.skip(f"langchain-huggingface is not installed ({err}); pip install langchain-huggingface")
    search = _readme_huggingface(str(export_dir))
    for cid, char in characters.items():
        for query in QUERIES:
            docs = search(cid, query, k=len(char.settings))
            ref_ids, ref_scores = _reference(loaded, cid, query, len(char.settings), prior_weight=0.0)
            ids = [doc.metadata["setting_id"] for doc, _ in docs]
            assert_same_ranking(ids, [s for _, s in docs], ref_ids, ref_scores)
            assert {doc.metadata["character_id"] for doc, _ in docs} == {cid}
        assert len(search(cid, QUERIES[0], k=2)) == 2  # the filter applies before top-k


# ------------------------------------------------------------------------------- 3. ReplugcharRetriever
@pytest.fixture(scope="module")
def lc(export_dir):
    return ReplugcharRetriever.from_export(export_dir)


def _readme_replugchar(d: str):
    """The README snippet, verbatim but for its input (d) and the return."""
    # --- README snippet start
    from replugchar.retrieval.langchain import ReplugcharRetriever

    retriever = ReplugcharRetriever.from_export(d, character_id="alice")  # k, λ, τ from retriever.json
    docs = retriever.invoke("Hello! How are you?")  # alice's settings, best first, those under τ dropped
    print(docs[0].page_content, docs[0].metadata["score"])
    history = [{"role": "user", "text": "Hi!"}, {"role": "character", "text": "I am a retired sailor."}]
    bob = retriever.with_character("bob").with_history(history)  # the session so far, oldest first
    bob_docs = bob.invoke("What do you do all day?")
    # --- README snippet end
    return docs, bob_docs, history


def test_readme_replugchar_snippet_matches_search(export_dir, loaded):
    docs, bob_docs, history = _readme_replugchar(str(export_dir))
    for got, (cid, query, hist) in (
        (docs, ("alice", "Hello! How are you?", ())),
        (bob_docs, ("bob", "What do you do all day?", history)),
    ):
        hits = loaded.search(cid, query, history=hist)  # the export's k and τ
        assert len(got) == len(hits) == EXPORT_K
        assert_same_ranking(
            [d.metadata["setting_id"] for d in got],
            [d.metadata["score"] for d in got],
            [h.setting_id for h in hits],
            [h.score for h in hits],
        )
        assert {d.metadata["character_id"] for d in got} == {cid}
    sailor = next(d for d in bob_docs if d.page_content == "I am a retired sailor.")
    assert sailor.metadata["dialogue"] == pytest.approx(W_OWN, abs=1e-5)  # bob already said it verbatim


def test_retriever_order_and_metadata(lc, loaded, characters):
    for cid, char in characters.items():
        r = lc.with_character(cid).model_copy(update={"k": len(char.settings), "threshold": ALL})
        for query in QUERIES:
            docs = r.invoke(query)
            hits = loaded.search(cid, query, k=len(char.settings), threshold=ALL)
            assert_same_ranking(
                [d.metadata["setting_id"] for d in docs],
                [d.metadata["score"] for d in docs],
                [h.setting_id for h in hits],
                [h.score for h in hits],
            )
            for doc in docs:
                hit = next(h for h in hits if h.setting_id == doc.metadata["setting_id"])
                meta = doc.metadata
                assert meta["character_id"] == cid
                assert meta["setting_id"] == hit.setting_id
                assert meta["index_in_character"] == hit.index_in_character
                assert char.settings[meta["index_in_character"]] == doc.page_content
                for key in ("score", "similarity", "prior", "dialogue"):
                    assert meta[key] == pytest.approx(getattr(hit, key), abs=1e-5), key
                # the exact blend: score = cos + λ·prior with an empty history
                assert meta["score"] == pytest.approx(meta["similarity"] + LAMBDA * meta["prior"], abs=1e-5)
                assert meta["dialogue"] == pytest.approx(0.0, abs=1e-6)
            scores = [d.metadata["score"] for d in docs]
            assert scores == sorted(scores, reverse=True)


def test_retriever_character_filter(lc, characters):
    for cid, char in characters.items():
        docs = lc.with_character(cid).model_copy(update={"k": 50, "threshold": ALL}).invoke(QUERIES[0])
        assert sorted(d.page_content for d in docs) == sorted(char.settings)  # all of its own, no others
        assert {d.metadata["character_id"] for d in docs} == {cid}
    assert lc.character_id is None  # with_character returned copies
    with pytest.raises(ValueError, match="character_id"):
        lc.invoke(QUERIES[0])
    with pytest.raises(KeyError, match="nobody"):
        lc.with_character("nobody")


def test_retriever_default_k_and_field_k(lc, characters):
    chen = lc.with_character("chen")
    assert len(characters["chen"].settings) > EXPORT_K
    assert len(chen.invoke(QUERIES[1])) == EXPORT_K  # retriever.json's k
    assert len(chen.model_copy(update={"k": 2}).invoke(QUERIES[1])) == 2
    with pytest.raises(ValueError, match="k must be positive"):
        ReplugcharRetriever(retriever=lc.retriever, character_id="chen", k=0)


def test_retriever_threshold(lc, loaded):
    alice = lc.with_character("alice").model_copy(update={"k": 10})
    scores = [h.score for h in loaded.search("alice", QUERIES[0], k=10, threshold=ALL)]
    assert alice.invoke(QUERIES[0])  # the export has no threshold: all kept
    assert alice.model_copy(update={"threshold": max(scores) + 1e-3}).invoke(QUERIES[0]) == []
    mid = (scores[1] + scores[2]) / 2
    kept = alice.model_copy(update={"threshold": mid}).invoke(QUERIES[0])
    assert len(kept) == 2 and all(d.metadata["score"] >= mid for d in kept)
    # the fitted τ of retriever.json applies when the field is left at None
    fitted = copy.copy(loaded)
    fitted.rule = dataclasses.replace(loaded.rule, threshold=mid)
    default = ReplugcharRetriever(retriever=fitted, character_id="alice", k=10)
    assert [d.page_content for d in default.invoke(QUERIES[0])] == [d.page_content for d in kept]
    assert len(default.model_copy(update={"threshold": ALL}).invoke(QUERIES[0])) == len(scores)


def test_retriever_prior_weight_override(lc, loaded):
    bob = lc.with_character("bob").model_copy(update={"k": 3, "prior_weight": 0.0, "threshold": ALL})
    for doc in bob.invoke(QUERIES[2]):
        assert doc.metadata["score"] == pytest.approx(doc.metadata["similarity"], abs=1e-6)


def test_retriever_history_adds_own_max_weight(lc, loaded, characters):
    assert loaded.rule.weights[FEATURES.index("own_max")] == W_OWN
    cid = "chen"
    n = len(characters[cid].settings)
    repeated = characters[cid].settings[3]
    history = [{"role": "user", "text": "Tell me about yourself."}, {"role": "character", "text": repeated}]
    base = lc.with_character(cid).model_copy(update={"k": n, "threshold": ALL})
    before = {d.page_content: d.metadata for d in base.invoke(QUERIES[0])}
    docs = base.with_history(history).invoke(QUERIES[0])
    after = {d.page_content: d.metadata for d in docs}
    # the character already said it verbatim: own_max = cos(s, s) = 1, so its score moves by exactly w_own
    assert after[repeated]["score"] - before[repeated]["score"] == pytest.approx(W_OWN, abs=1e-5)
    assert after[repeated]["dialogue"] == pytest.approx(W_OWN, abs=1e-5)
    assert before[repeated]["dialogue"] == pytest.approx(0.0, abs=1e-6)
    for text, meta in after.items():  # the other settings move by w_own·cos(s, repeated) ≤ w_own
        assert meta["similarity"] == pytest.approx(before[text]["similarity"], abs=1e-6)
        assert meta["score"] - before[text]["score"] <= W_OWN + 1e-5
    # the same ranking as Retriever.search with that history
    hits = loaded.search(cid, QUERIES[0], k=n, threshold=ALL, history=history)
    assert_same_ranking(
        [d.metadata["setting_id"] for d in docs],
        [d.metadata["score"] for d in docs],
        [h.setting_id for h in hits],
        [h.score for h in hits],
    )
    # a history given at construction (as from_export(history=...) does) ranks the same as with_history
    assert base.history == []
    direct = ReplugcharRetriever(**{**dict(base), "history": history})
    assert [d.page_content for d in direct.invoke(QUERIES[0])] == [d.page_content for d in docs]


def test_retriever_async_and_unknown_field(lc):
    bob = lc.with_character("bob")
    docs = asyncio.run(bob.ainvoke(QUERIES[0]))
    assert [d.page_content for d in docs] == [d.page_content for d in bob.invoke(QUERIES[0])]
    with pytest.raises(ValueError):  # a misspelt option is an error, not silently ignored
        ReplugcharRetriever(retriever=lc.retriever, character="bob")


def test_minus_inf_threshold_keeps_all(lc, loaded, characters):
    n = len(characters["alice"].settings)
    assert len(loaded.search("alice", QUERIES[0], k=n, threshold=float("-inf"))) == n
    alice = lc.with_character("alice").model_copy(update={"k": n, "threshold": float("-inf")})
    assert len(alice.invoke(QUERIES[0])) == n


def test_replugchar_does_not_import_langchain():
    code = (
        "import sys, replugchar, replugchar.retrieval.retriever, replugchar.retrieval.export; "
        "replugchar.Retriever; "
        "assert not [m for m in sys.modules if m.startswith('langchain')], sorted(sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
