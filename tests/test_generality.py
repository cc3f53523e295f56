"""The learned generality g(s) = v·e_s and its gate: one rule for training, the index, Retriever.rank/search and
new characters; all new weights 0 is exactly today's rule; the fitted scale is never worse than today's rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import replugchar

from replugchar.core.data import Character, SplitSpec
from replugchar.core.scoring import ScoringRule
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.export import add_characters, export_retriever
from replugchar.retrieval.retriever import Retriever
from replugchar.training.calibration import fit_generality
from replugchar.training.head import DialogueHead, HeadOptions
from replugchar.training.losses import LSRLoss
from replugchar.training.module import LSRModule

pytestmark = pytest.mark.usefixtures("rc_cache")
ALL = float("-inf")
NEW = {
    "dora": Character(
        "dora", ("I am cheerful with everyone.", "I work night shifts as a nurse.", "I own a boat.")
    )
}


@pytest.fixture(scope="module")
def module(characters):
    m = LSRModule(
        encoder="tiny:bert",
        k=5,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None),
        head=HeadOptions(generality=True),
    )
    m.characters = dict(characters)
    return m


def _rule_towards(retriever: Retriever, text: str, **kw) -> ScoringRule:
    """A rule whose generality points at ``text``'s embedding, minus the mean direction of the fixture's
    settings (the tiny encoder's embeddings share a large common component)."""
    e = retriever.embed_settings([text])[0]
    mean = retriever.embed_settings(
        ["I am a retired sailor.", "I study astronomy.", "I collect old maps."]
    ).mean(0)
    v = 20.0 * (e - mean)
    return ScoringRule(generality=tuple(float(x) for x in v), prior_weight=1.0, **kw)


@pytest.fixture(scope="module")
def export(tmp_path_factory, module) -> Path:
    base = module.as_retriever()
    rule = _rule_towards(
        base, "I am cheerful with everyone.", weights=(-0.2, 0.0, 0.1, 0.0), gate=(-0.5, 0.3)
    )
    priors = np.linspace(-1, 1, sum(len(c.settings) for c in module.characters.values()))
    return export_retriever(module, tmp_path_factory.mktemp("gen") / "retriever", priors=priors, rule=rule)


HISTORY = [
    {"role": "user", "text": "Hi there."},
    {"role": "character", "text": "I bake bread every morning."},
]


def test_zero_generality_and_gate_is_exactly_todays_rule(export, characters):
    r = Retriever.load(export)
    settings = characters["alice"].settings
    today = dataclasses.replace(r.rule.without_generality(), prior_weight=0.3)
    zeros = dataclasses.replace(today, generality=(0.0,) * len(r.rule.generality), gate=(0.0, 0.0))
    priors = [0.5, -0.5, 1.0, 0.0]
    for history in ((), HISTORY):
        a = r.rank(settings, "Hello!", history, priors, rule=today)
        b = r.rank(settings, "Hello!", history, priors, rule=zeros)
        np.testing.assert_array_equal(a, b)


def test_search_equals_rank_with_generality_gate_prior_and_history(export, characters):
    """The index stores G(s) = prior + g(s); rank computes g from the text: the same scores."""
    r = Retriever.load(export)
    lo, hi = r.index.ranges["chen"]
    stored = np.array([rec.text for rec in r.index.records[lo:hi]])
    for history in ((), HISTORY):
        hits = r.search("chen", "Hello!", k=hi - lo, history=history, threshold=ALL)
        imported = r.index.priors[lo:hi] - r.embed_settings(list(stored)) @ np.asarray(r.rule.generality)
        ranked = r.rank(list(stored), "Hello!", history, imported)
        got = {h.setting: h.score for h in hits}
        np.testing.assert_allclose([got[s] for s in stored], ranked, atol=1e-5)


def test_a_new_character_gets_its_generality_from_text(export):
    """No index entry, no prior: the learned g alone lifts the broadly useful setting for a greeting."""
    r = Retriever.load(export)
    settings = list(NEW["dora"].settings)
    plain = r.rank(settings, "Hello!", rule=r.rule.without_generality())
    with_g = r.rank(settings, "Hello!")
    assert int(np.argmax(with_g)) == 0
    assert with_g[0] - with_g[1:].max() > plain[0] - plain[1:].max()


def test_the_gate_weighs_generality_by_history(export):
    r = Retriever.load(export)
    settings = list(NEW["dora"].settings)

    def term(h):
        return r.rank(settings, "Hello!", h) - r.rank(settings, "Hello!", h, rule=r.rule.without_generality())

    g = r.embed_settings(settings) @ np.asarray(r.rule.generality)
    # gate[1] = 0.3 on an empty history: the generality term is larger before the first turn
    empty, later = term(()), term(HISTORY)
    np.testing.assert_allclose(empty - later, 0.3 * g, atol=1e-5)


def test_add_characters_serves_new_characters_with_their_generality(export, tmp_path):
    out = add_characters(export, NEW, out=tmp_path / "extended")
    r = Retriever.load(out)  # the manifest was rewritten and verifies
    lo, hi = r.index.ranges["dora"]
    assert [rec.text for rec in r.index.records[lo:hi]] == list(NEW["dora"].settings)
    np.testing.assert_allclose(
        r.index.priors[lo:hi],
        r.embed_settings(list(NEW["dora"].settings)) @ np.asarray(r.rule.generality),
        atol=1e-5,
    )
    hits = r.search("dora", "Hello!", k=3, threshold=ALL)
    ranked = r.rank(list(NEW["dora"].settings), "Hello!")
    assert [h.index_in_character for h in hits] == list(np.argsort(-ranked, kind="stable"))
    old = Retriever.load(export)
    for cid in old.index.ranges:  # the characters already there keep their scores
        a = [h.score for h in old.search(cid, "Hello!", k=9, threshold=ALL)]
        b = [h.score for h in r.search(cid, "Hello!", k=9, threshold=ALL)]
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="already holds character"):
        add_characters(out, NEW)


def test_lsr_learns_a_generality_that_carries_to_unseen_settings():
    """Synthetic: the LM always prefers the candidate nearest one direction u, whatever the query. LSR on the
    head learns v along u, so g ranks *unseen* settings near u first."""
    gen = torch.Generator().manual_seed(0)
    d, k, n = 16, 5, 256
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    head = DialogueHead(d)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    loss_fn = LSRLoss(gamma=0.1, beta=0.05)

    def batch():
        s = torch.nn.functional.normalize(torch.randn(n, k, d, generator=gen), dim=-1)  # (n, k, d)
        sim = 0.1 * torch.randn(n, k, generator=gen)  # similarity says nothing about the target
        lm = 2.0 * (s @ u)  # (n, k)
        return s, sim, lm

    mask = torch.ones(n, k, dtype=torch.bool)
    empty = torch.ones(n, dtype=torch.bool)
    for _ in range(150):
        s, sim, lm = batch()
        score = head(sim, torch.zeros(n, k, 4), s, mask, empty)
        loss = loss_fn(score, lm, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    v = head.generality.detach()
    s, _, _ = batch()
    g = s @ v  # unseen settings
    agree = (g.argmax(-1) == (s @ u).argmax(-1)).float().mean()
    assert torch.nn.functional.cosine_similarity(v, u, dim=0) > 0.8
    assert agree > 0.8


def test_fit_generality_keeps_beta_zero_when_greetings_would_lose():
    # two settings per turn; turns 0-1 greetings, 2-5 other. Base prefers setting 0 everywhere.
    base = np.array([[1.0, 0.0]] * 6)
    gains = np.array([[0.2, 0.0], [0.2, 0.0], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])
    greeting = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    gen = np.array([[0.0, 1.0]] * 6)  # lifts setting 1 everywhere: better on others, worse on greetings
    fit = fit_generality(base, gen, gains, greeting)
    assert fit.scale == 0.0 and fit.gains[2.0][0] > fit.gains[0.0][0]
    gains[:2] = [[0.0, 0.2], [0.0, 0.2]]  # now it helps greetings too
    assert fit_generality(base, gen, gains, greeting).scale > 0.0


def test_all_greetings_keeps_every_greeting_beyond_the_cap():
    from replugchar.training.datamodule import LSRDataModule

    capped = LSRDataModule(
        data_dir="demo", max_train_examples=10, max_val_examples=10, split=SplitSpec(val_fraction=0.25)
    )
    every = LSRDataModule(
        data_dir="demo",
        max_train_examples=10,
        max_val_examples=10,
        all_greetings=True,
        split=SplitSpec(val_fraction=0.25),
    )
    capped.setup()
    every.setup()
    corpus_greet = [e for e in every.corpus.examples if e.query_type == "greeting"]
    train_chars = {e.character_id for e in every.train_examples}
    n_greet = sum(e.query_type == "greeting" for e in every.train_examples)
    assert n_greet > sum(e.query_type == "greeting" for e in capped.train_examples)
    assert sum(e.query_type != "greeting" for e in every.train_examples) == 10
    assert n_greet >= sum(e.character_id in train_chars for e in corpus_greet)


@pytest.mark.slow
def test_add_characters_command(export, tmp_path):
    chars = tmp_path / "characters.jsonl"
    chars.write_text(json.dumps({"character_id": "dora", "settings": list(NEW["dora"].settings)}) + "\n")
    out = tmp_path / "extended"
    proc = replugchar("add-characters", "--retriever", export, "--characters", chars, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = replugchar("retrieve", "--retriever", out, "--character", "dora", "--query", "Hello!")
    assert proc.returncode == 0 and "I am cheerful with everyone." in proc.stdout.splitlines()[2]


def test_evaluate_scores_the_dialogue_row_with_the_rule_as_exported(export, characters):
    """``evaluate``'s "dialogue" row is the export as it serves (without priors): its generality keeps the rule's
    base weight λ, which a row with λ zeroed would silently drop."""
    from replugchar.evaluation.evaluate import _retrievers

    r = Retriever.load(export)
    retriever, rule, uses_priors = _retrievers(r, r, prior_weight=0.1)["dialogue"]
    assert not uses_priors and rule.prior_weight == r.rule.prior_weight == 1.0
    settings = characters["alice"].settings
    served = r.rank(settings, "Hello!", ())
    np.testing.assert_array_equal(retriever.rank(settings, "Hello!", (), rule=rule), served)
    without_lambda = dataclasses.replace(rule, prior_weight=0.0)
    assert not np.allclose(r.rank(settings, "Hello!", (), rule=without_lambda), served)
