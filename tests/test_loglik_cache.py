"""CachedLikelihood: no pair is computed twice, in memory or across instances; shards appear whole; keys per template."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from replugchar.lm import loglik_cache
from replugchar.lm.likelihood import NO_SETTING, LMLikelihood, LoglikRequest, PromptTemplate
from replugchar.lm.loglik_cache import CachedLikelihood, request_key, settings_id


class CountingLikelihood(LMLikelihood):
    """LMLikelihood that records how many pairs reach the LM in each call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def loglik(self, requests):
        self.calls.append(len(requests))
        return super().loglik(requests)


@pytest.fixture
def counting(tiny_lm) -> CountingLikelihood:
    model, tok = tiny_lm
    return CountingLikelihood(model, tok, lm_key="tiny:gpt2", max_batch_tokens=2048)


@pytest.fixture(scope="module")
def requests_(examples, characters) -> list[LoglikRequest]:
    out = [LoglikRequest(e, (characters[e.character_id].settings[0],)) for e in examples[:6]]
    out += [LoglikRequest(e, NO_SETTING) for e in examples[:2]]
    return out


def test_second_pass_makes_no_lm_call(counting, requests_):
    cache = CachedLikelihood(counting)  # in memory
    first = cache.loglik(requests_)
    assert counting.pairs_computed == len(requests_) and counting.calls == [len(requests_)]
    second = cache.loglik(requests_)
    third = cache.loglik(requests_[::-1][:3])
    assert counting.pairs_computed == len(requests_) and len(counting.calls) == 1
    np.testing.assert_array_equal(first.logp_sum, second.logp_sum)
    np.testing.assert_array_equal(first.n_tokens, second.n_tokens)
    np.testing.assert_array_equal(third.logp_sum, first.logp_sum[::-1][:3])
    assert cache.hits == len(requests_) + 3 and cache.misses == len(requests_)
    assert all(r in cache for r in requests_) and len(cache) == len(requests_)


def test_duplicates_and_partial_hits_compute_only_the_new_pairs(counting, requests_):
    cache = CachedLikelihood(counting)
    cache.loglik(requests_[:3])
    out = cache.loglik([requests_[0], requests_[4], requests_[4], requests_[1]])
    assert counting.calls == [3, 1]  # only requests_[4], once
    assert out.logp_sum[1] == out.logp_sum[2]
    direct = LMLikelihood(counting.model, counting.tokenizer).loglik([requests_[4], requests_[0]])
    np.testing.assert_allclose(out.logp_sum[[1, 0]], direct.logp_sum, atol=1e-6)


def test_logliks_persist_across_instances(counting, requests_, tmp_path):
    cache = CachedLikelihood(counting, tmp_path, shard_size=3)
    first = cache.loglik(requests_)  # 8 new pairs >= shard_size: written at once
    cache.loglik(requests_)
    cache.flush()
    assert counting.pairs_computed == len(requests_)

    reopened = CachedLikelihood(counting, tmp_path)
    assert len(reopened) == len(requests_)
    again = reopened.loglik(requests_)
    assert counting.pairs_computed == len(requests_)  # zero new LM calls
    assert reopened.misses == 0 and reopened.hits == len(requests_)
    np.testing.assert_array_equal(again.logp_sum, first.logp_sum)
    np.testing.assert_array_equal(again.n_tokens, first.n_tokens)

    # a read-only cache (no LM) serves the same scores and names the command that fills it on a miss
    readonly = CachedLikelihood(None, tmp_path, fingerprint=counting.fingerprint)
    np.testing.assert_array_equal(readonly.loglik(requests_).logp_sum, first.logp_sum)
    other = LoglikRequest(requests_[0].example, ("a setting never scored",))
    with pytest.raises(KeyError, match="replugchar loglik"):
        readonly.loglik([other])
    with pytest.raises(ValueError, match="fingerprint"):
        CachedLikelihood(None, tmp_path)


def test_pending_logliks_are_only_persisted_by_flush(counting, requests_, tmp_path):
    cache = CachedLikelihood(counting, tmp_path, shard_size=1000)
    cache.loglik(requests_[:2])
    assert not list(cache.folder.glob("shard-*.parquet"))
    assert len(CachedLikelihood(counting, tmp_path)) == 0
    cache.flush()
    assert len(CachedLikelihood(counting, tmp_path)) == 2


def test_shards_appear_only_under_their_final_name(counting, requests_, tmp_path, monkeypatch):
    cache = CachedLikelihood(counting, tmp_path, shard_size=2)
    cache.loglik(requests_[:4])
    cache.loglik(requests_[4:])
    cache.flush()
    shards = sorted(cache.folder.glob("shard-*.parquet"))
    assert shards and not list(cache.folder.glob("*.tmp")) and not list(cache.folder.glob(".*"))
    assert sum(pq.read_table(s).num_rows for s in shards) == len(requests_)
    assert all(s.name.startswith("shard-r0-") for s in shards)
    assert (cache.folder / "FINGERPRINT").read_text().strip() == counting.fingerprint

    # a writer that dies half-way leaves no file under a shard name, and readers ignore the temp file
    crashing = CachedLikelihood(counting, tmp_path / "crash")

    def die_mid_write(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(loglik_cache.pq, "write_table", die_mid_write)
    crashing.loglik(requests_[:2])
    with pytest.raises(OSError, match="disk full"):
        crashing.flush()
    monkeypatch.undo()
    assert not list(crashing.folder.glob("shard-*.parquet"))
    assert len(CachedLikelihood(counting, tmp_path / "crash")) == 0


def test_different_template_gets_a_different_folder_and_fresh_logliks(tiny_lm, requests_, tmp_path):
    model, tok = tiny_lm
    a = CountingLikelihood(model, tok, lm_key="tiny:gpt2")
    b = CountingLikelihood(
        model, tok, PromptTemplate(setting_line="Persona: {setting}\n"), lm_key="tiny:gpt2"
    )
    cache_a, cache_b = CachedLikelihood(a, tmp_path), CachedLikelihood(b, tmp_path)
    assert cache_a.folder != cache_b.folder and cache_a.folder.parent == cache_b.folder.parent == tmp_path
    assert CachedLikelihood(a, tmp_path).folder == cache_a.folder  # stable for the same likelihood

    score_a = cache_a.loglik(requests_[:2])
    cache_a.flush()
    score_b = cache_b.loglik(requests_[:2])
    assert b.pairs_computed == 2  # nothing borrowed from the other template's cache
    assert not np.allclose(score_a.logp_sum, score_b.logp_sum)


def test_request_key_depends_on_example_content_and_settings(examples):
    ex = examples[0]
    base = request_key(LoglikRequest(ex, ("a",)))
    assert request_key(LoglikRequest(ex, ("a",))) == base
    assert request_key(LoglikRequest(ex, ("b",))) != base
    assert request_key(LoglikRequest(ex, ("a", "b"))) != request_key(LoglikRequest(ex, ("b", "a")))
    edited = dataclasses.replace(ex, response=ex.response + " Really.")
    assert request_key(LoglikRequest(edited, ("a",))) != base  # edited data is never served a stale score
    assert settings_id(()) == "none"


def test_an_auto_cache_of_0_1_moves_to_its_new_folder_and_is_read_back(
    counting, requests_, tmp_path, monkeypatch
):
    """0.1 kept the auto cache in $REPLUGCHAR_CACHE/scores: it is moved to .../logliks, not recomputed."""
    monkeypatch.setenv("REPLUGCHAR_CACHE", str(tmp_path))
    old = CachedLikelihood(counting, tmp_path / "scores", shard_size=1000)
    first = old.loglik(requests_)
    old.flush()
    folder = loglik_cache.resolve_cache_dir("auto")
    assert folder == tmp_path / loglik_cache.CACHE_FOLDER and folder.is_dir()
    assert not (tmp_path / "scores").exists()
    moved = CachedLikelihood(counting, folder)
    assert len(moved) == len(requests_)
    np.testing.assert_array_equal(moved.loglik(requests_).logp_sum, first.logp_sum)
    assert counting.pairs_computed == len(requests_)  # nothing computed twice
    # once there, a new "scores" folder (an old replugchar still running) is left alone
    (tmp_path / "scores").mkdir()
    assert loglik_cache.resolve_cache_dir("auto") == folder and (tmp_path / "scores").is_dir()
