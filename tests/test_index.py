"""SettingIndex: exact blended scores (cos + λ·prior) inside FAISS, per-character search, files, ivf/hnsw."""

from __future__ import annotations

import numpy as np
import pytest

from replugchar.retrieval.index import SettingIndex, SettingRecord, setting_records


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def records_for(sizes: list[int]) -> list[SettingRecord]:
    """Contiguous setting ids for characters c0, c1, ... with the given numbers of settings."""
    out: list[SettingRecord] = []
    for c, size in enumerate(sizes):
        for i in range(size):
            out.append(SettingRecord(len(out), f"c{c}", i, f"setting {c}.{i}"))
    return out


def brute_force(emb, priors, queries, k, prior_weight):
    scores = queries @ emb.T + prior_weight * priors[None, :]  # (q, n)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    sizes = [3, 7, 5, 12, 1, 9, 4, 8] * 4  # 196 settings over 32 characters
    records = records_for(sizes)
    emb = unit(rng, len(records), 16)
    priors = rng.uniform(-1, 1, len(records)).astype(np.float32)
    queries = unit(rng, 20, 16)
    return records, emb, priors, queries


@pytest.mark.parametrize("prior_weight", [0.0, 0.3, 2.0])
def test_flat_search_equals_brute_force_blend(data, prior_weight):
    records, emb, priors, queries = data
    index = SettingIndex.build(emb, records, priors)
    scores, ids = index.search(queries, 10, prior_weight=prior_weight)
    want_scores, want_ids = brute_force(emb, priors, queries, 10, prior_weight)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_prior_weight_changes_the_ranking(data):
    records, emb, priors, queries = data
    index = SettingIndex.build(emb, records, priors)
    _, plain = index.search(queries, 5, prior_weight=0.0)
    _, blended = index.search(queries, 5, prior_weight=5.0)
    assert not np.array_equal(plain, blended)
    no_prior = SettingIndex.build(emb, records)  # no priors: λ has no effect
    np.testing.assert_array_equal(no_prior.search(queries, 5, prior_weight=5.0)[1], plain)
    assert no_prior.meta["has_prior"] is False and index.meta["has_prior"] is True


@pytest.mark.parametrize("prior_weight", [0.0, 0.5])
def test_character_restricted_search_returns_only_that_character(data, prior_weight):
    records, emb, priors, queries = data
    index = SettingIndex.build(emb, records, priors)
    chars = [f"c{i % 32}" for i in range(len(queries))]
    scores, ids = index.search(queries, 4, character_ids=chars, prior_weight=prior_weight)
    for row, cid in enumerate(chars):
        own = [r.setting_id for r in records if r.character_id == cid]
        got = [int(i) for i in ids[row] if i >= 0]
        assert got and all(records[i].character_id == cid for i in got)
        blend = queries[row] @ emb[own].T + prior_weight * priors[own]
        want = [own[j] for j in np.argsort(-blend, kind="stable")[:4]]
        assert got == want
        np.testing.assert_allclose(scores[row, : len(got)], np.sort(blend)[::-1][: len(got)], atol=1e-5)


def test_k_larger_than_a_characters_settings_pads_with_minus_one(data):
    records, emb, priors, queries = data
    index = SettingIndex.build(emb, records, priors)
    scores, ids = index.search(queries[:3], 6, character_ids=["c0", "c4", "c1"])  # 3, 1 and 7 settings
    assert (ids[0, :3] >= 0).all() and (ids[0, 3:] == -1).all()
    assert ids[1, 0] >= 0 and (ids[1, 1:] == -1).all()
    assert (ids[2] >= 0).all()
    assert np.isneginf(scores[0, 3:]).all() and np.isfinite(scores[0, :3]).all()
    with pytest.raises(KeyError, match="nobody"):
        index.search(queries[:1], 2, character_ids=["nobody"])
    with pytest.raises(ValueError):
        index.search(queries[:2], 2, character_ids=["c0"])
    with pytest.raises(ValueError):
        index.search(queries, 0)


def test_save_load_roundtrip(data, tmp_path):
    records, emb, priors, queries = data
    index = SettingIndex.build(emb, records, priors, encoder_fingerprint="abc123")
    index.save(tmp_path / "idx")
    assert {p.name for p in tmp_path.iterdir()} == {"idx"}  # no temp folder left beside it
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {"index.faiss", "settings.jsonl", "index.json"}
    loaded = SettingIndex.load(tmp_path / "idx", expected_dim=16)
    assert loaded.records == records and loaded.meta == index.meta
    np.testing.assert_array_equal(loaded.priors, priors)
    chars = [f"c{i}" for i in range(len(queries))]
    for kwargs in ({}, {"character_ids": chars}):
        a = index.search(queries, 5, prior_weight=0.7, **kwargs)
        b = loaded.search(queries, 5, prior_weight=0.7, **kwargs)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])

    index.save(tmp_path / "idx")  # overwrite in place
    assert SettingIndex.load(tmp_path / "idx").records == records


def test_load_with_wrong_dim_names_both_dims(data, tmp_path):
    records, emb, priors, _ = data
    SettingIndex.build(emb, records, priors).save(tmp_path / "idx")
    with pytest.raises(ValueError, match=r"16-d.*32-d"):
        SettingIndex.load(tmp_path / "idx", expected_dim=32)
    with pytest.raises(FileNotFoundError):
        SettingIndex.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"\(\*, 16\)"):
        SettingIndex.load(tmp_path / "idx").search(np.zeros((1, 32), np.float32), 3)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(kind):
    rng = np.random.default_rng(1)
    records = records_for([10] * 60)  # 600 settings
    emb = unit(rng, 600, 16)
    priors = rng.uniform(0, 0.2, 600).astype(np.float32)
    queries = unit(rng, 50, 16)
    exact = SettingIndex.build(emb, records, priors)
    approx = SettingIndex.build(emb, records, priors, kind=kind)
    assert approx.meta["kind"] == kind
    k = 10
    _, want = exact.search(queries, k, prior_weight=0.5)
    _, got = approx.search(queries, k, prior_weight=0.5, nprobe=32, ef_search=128)
    recall = np.mean([len(set(g) & set(w)) / k for g, w in zip(got, want)])
    assert recall >= 0.9

    chars = [f"c{i}" for i in range(len(queries))]
    _, restricted = approx.search(queries, 3, character_ids=chars, prior_weight=0.5, nprobe=32, ef_search=128)
    for row, cid in enumerate(chars):
        got_ids = [int(i) for i in restricted[row] if i >= 0]
        assert all(records[i].character_id == cid for i in got_ids)
        if kind == "hnsw":  # (ivf: see test_ivf_build_on_few_settings)
            assert got_ids == [
                int(i)
                for i in exact.search(queries[row : row + 1], 3, character_ids=[cid], prior_weight=0.5)[1][0]
            ]


def test_build_validates_its_inputs(data):
    records, emb, priors, _ = data
    with pytest.raises(ValueError, match="embeddings"):
        SettingIndex.build(emb[:-1], records)
    with pytest.raises(ValueError, match="priors"):
        SettingIndex.build(emb, records, priors[:-1])
    with pytest.raises(ValueError, match="priors"):
        SettingIndex.build(emb, records, np.full(len(records), np.nan))
    with pytest.raises(ValueError, match="kind"):
        SettingIndex.build(emb, records, kind="lsh")


def test_ivf_build_on_few_settings():
    """IVF with several lists over a few settings: per-character search stays exact even for a character whose
    settings fall into different lists, while a global search probing one list misses some true neighbours."""
    rng = np.random.default_rng(2)
    sizes = [5, 3, 8, 6, 4, 7, 2, 5]  # 40 settings over 8 characters
    records, n_lists = records_for(sizes), 5
    emb = unit(rng, len(records), 8)
    index = SettingIndex.build(emb, records, kind="ivf", nlist=n_lists)
    assert index.meta["kind"] == "ivf" and index.index.nlist == n_lists > 1
    # which list each setting went to: some character's settings are spread over several lists
    _, assigned = index.index.quantizer.search(index.index.reconstruct_n(0, len(records)), 1)
    lists_of = {cid: set(assigned[lo:hi, 0].tolist()) for cid, (lo, hi) in index.ranges.items()}
    assert max(len(lists) for lists in lists_of.values()) > 1, lists_of

    queries = unit(rng, 12, 8)
    for cid, (lo, hi) in index.ranges.items():
        exact = queries @ emb[lo:hi].T  # (q, n_char)
        order = np.argsort(-exact, axis=1, kind="stable")
        k = hi - lo + 2  # more than the character has: every setting, then -1
        scores, ids = index.search(queries, k, character_ids=[cid] * len(queries), nprobe=1)
        np.testing.assert_array_equal(ids[:, : hi - lo], lo + order)  # every setting, in exact order
        np.testing.assert_allclose(scores[:, : hi - lo], np.take_along_axis(exact, order, 1), atol=1e-5)
        assert (ids[:, hi - lo :] == -1).all()

    k = 5
    _, truth = brute_force(emb, np.zeros(len(records), np.float32), queries, k, 0.0)
    _, one_list = index.search(queries, k, nprobe=1)
    _, all_lists = index.search(queries, k, nprobe=n_lists)
    np.testing.assert_array_equal(all_lists, truth)  # probing every list is exact
    assert any(set(a) != set(b) for a, b in zip(one_list, truth))  # one list is approximate: it misses some


def test_index_over_tiny_encoder_embeddings_of_the_corpus(tiny_encoder, characters):
    records = setting_records(characters)
    assert [r.setting_id for r in records] == list(range(len(records)))
    emb = tiny_encoder.encode([r.text for r in records], normalize_embeddings=True)
    index = SettingIndex.build(emb, records)
    assert index.dim == tiny_encoder.get_embedding_dimension()
    assert index.ranges == {"alice": (0, 4), "bob": (4, 7), "chen": (7, 12)}
    _, ids = index.search(emb[[5]], 3, character_ids=["bob"])
    assert ids[0, 0] == 5 and sorted(ids[0].tolist()) == [4, 5, 6]  # a setting is its own nearest neighbour
