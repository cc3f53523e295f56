"""CachedScorer: no pair is scored twice, in memory or across instances; shards appear whole; keys per template."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from replugchar.lm import score_cache
from replugchar.lm.score_cache import CachedScorer, request_key, settings_id
from replugchar.lm.scoring import NO_SETTING, LMScorer, PromptTemplate, ScoreRequest


class CountingScorer(LMScorer):
    """LMScorer that records how many pairs reach the LM in each call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def score(self, requests):
        self.calls.append(len(requests))
        return super().score(requests)


@pytest.fixture
def counting(tiny_lm) -> CountingScorer:
    model, tok = tiny_lm
    return CountingScorer(model, tok, lm_key="tiny:gpt2", max_batch_tokens=2048)


@pytest.fixture(scope="module")
def requests_(examples, characters) -> list[ScoreRequest]:
    out = [ScoreRequest(e, (characters[e.character_id].settings[0],)) for e in examples[:6]]
    out += [ScoreRequest(e, NO_SETTING) for e in examples[:2]]
    return out


def test_second_pass_makes_no_lm_call(counting, requests_):
    cache = CachedScorer(counting)  # in memory
    first = cache.score(requests_)
    assert counting.pairs_scored == len(requests_) and counting.calls == [len(requests_)]
    second = cache.score(requests_)
    third = cache.score(requests_[::-1][:3])
    assert counting.pairs_scored == len(requests_) and len(counting.calls) == 1
    np.testing.assert_array_equal(first.logp_sum, second.logp_sum)
    np.testing.assert_array_equal(first.n_tokens, second.n_tokens)
    np.testing.assert_array_equal(third.logp_sum, first.logp_sum[::-1][:3])
    assert cache.hits == len(requests_) + 3 and cache.misses == len(requests_)
    assert all(r in cache for r in requests_) and len(cache) == len(requests_)


def test_duplicates_and_partial_hits_score_only_the_new_pairs(counting, requests_):
    cache = CachedScorer(counting)
    cache.score(requests_[:3])
    out = cache.score([requests_[0], requests_[4], requests_[4], requests_[1]])
    assert counting.calls == [3, 1]  # only requests_[4], once
    assert out.logp_sum[1] == out.logp_sum[2]
    direct = LMScorer(counting.model, counting.tokenizer).score([requests_[4], requests_[0]])
    np.testing.assert_allclose(out.logp_sum[[1, 0]], direct.logp_sum, atol=1e-6)


def test_scores_persist_across_instances(counting, requests_, tmp_path):
    cache = CachedScorer(counting, tmp_path, shard_size=3)
    first = cache.score(requests_)  # 8 new pairs >= shard_size: written at once
    cache.score(requests_)
    cache.flush()
    assert counting.pairs_scored == len(requests_)

    reopened = CachedScorer(counting, tmp_path)
    assert len(reopened) == len(requests_)
    again = reopened.score(requests_)
    assert counting.pairs_scored == len(requests_)  # zero new LM calls
    assert reopened.misses == 0 and reopened.hits == len(requests_)
    np.testing.assert_array_equal(again.logp_sum, first.logp_sum)
    np.testing.assert_array_equal(again.n_tokens, first.n_tokens)

    # a read-only cache (no LM) serves the same scores and names the command that fills it on a miss
    readonly = CachedScorer(None, tmp_path, fingerprint=counting.fingerprint)
    np.testing.assert_array_equal(readonly.score(requests_).logp_sum, first.logp_sum)
    other = ScoreRequest(requests_[0].example, ("a setting never scored",))
    with pytest.raises(KeyError, match="replugchar score"):
        readonly.score([other])
    with pytest.raises(ValueError, match="fingerprint"):
        CachedScorer(None, tmp_path)


def test_pending_scores_are_only_persisted_by_flush(counting, requests_, tmp_path):
    cache = CachedScorer(counting, tmp_path, shard_size=1000)
    cache.score(requests_[:2])
    assert not list(cache.folder.glob("shard-*.parquet"))
    assert len(CachedScorer(counting, tmp_path)) == 0
    cache.flush()
    assert len(CachedScorer(counting, tmp_path)) == 2


def test_shards_appear_only_under_their_final_name(counting, requests_, tmp_path, monkeypatch):
    cache = CachedScorer(counting, tmp_path, shard_size=2)
    cache.score(requests_[:4])
    cache.score(requests_[4:])
    cache.flush()
    shards = sorted(cache.folder.glob("shard-*.parquet"))
    assert shards and not list(cache.folder.glob("*.tmp")) and not list(cache.folder.glob(".*"))
    assert sum(pq.read_table(s).num_rows for s in shards) == len(requests_)
    assert all(s.name.startswith("shard-r0-") for s in shards)
    assert (cache.folder / "FINGERPRINT").read_text().strip() == counting.fingerprint

    # a writer that dies half-way leaves no file under a shard name, and readers ignore the temp file
    crashing = CachedScorer(counting, tmp_path / "crash")

    def die_mid_write(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(score_cache.pq, "write_table", die_mid_write)
    crashing.score(requests_[:2])
    with pytest.raises(OSError, match="disk full"):
        crashing.flush()
    monkeypatch.undo()
    assert not list(crashing.folder.glob("shard-*.parquet"))
    assert len(CachedScorer(counting, tmp_path / "crash")) == 0


def test_different_template_gets_a_different_folder_and_fresh_scores(tiny_lm, requests_, tmp_path):
    model, tok = tiny_lm
    a = CountingScorer(model, tok, lm_key="tiny:gpt2")
    b = CountingScorer(model, tok, PromptTemplate(setting_line="Persona: {setting}\n"), lm_key="tiny:gpt2")
    cache_a, cache_b = CachedScorer(a, tmp_path), CachedScorer(b, tmp_path)
    assert cache_a.folder != cache_b.folder and cache_a.folder.parent == cache_b.folder.parent == tmp_path
    assert CachedScorer(a, tmp_path).folder == cache_a.folder  # stable for the same scorer

    score_a = cache_a.score(requests_[:2])
    cache_a.flush()
    score_b = cache_b.score(requests_[:2])
    assert b.pairs_scored == 2  # nothing borrowed from the other template's cache
    assert not np.allclose(score_a.logp_sum, score_b.logp_sum)


def test_request_key_depends_on_example_content_and_settings(examples):
    ex = examples[0]
    base = request_key(ScoreRequest(ex, ("a",)))
    assert request_key(ScoreRequest(ex, ("a",))) == base
    assert request_key(ScoreRequest(ex, ("b",))) != base
    assert request_key(ScoreRequest(ex, ("a", "b"))) != request_key(ScoreRequest(ex, ("b", "a")))
    edited = dataclasses.replace(ex, response=ex.response + " Really.")
    assert request_key(ScoreRequest(edited, ("a",))) != base  # edited data is never served a stale score
    assert settings_id(()) == "none"
