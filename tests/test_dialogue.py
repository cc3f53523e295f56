"""The dialogue-aware scoring rule: features, Retriever.rank / search, the head's training, calibration of α,
the loss options against a weak teacher, and session history in the data."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from test_train_e2e import CopyLM, toy_trainer
from torch.utils.data import DataLoader

from replugchar.core.data import Character, Corpus, DataError, Example, Turn
from replugchar.core.scoring import FEATURES, ScoringRule, dialogue_features
from replugchar.lm.likelihood import LMLikelihood
from replugchar.lm.loglik_cache import CachedLikelihood, LikelihoodOptions
from replugchar.lm.models import byte_tokenizer
from replugchar.retrieval.export import export_retriever
from replugchar.retrieval.retriever import Retriever
from replugchar.training import calibration
from replugchar.training.datamodule import collate_examples
from replugchar.training.head import HeadOptions
from replugchar.training.losses import LossOptions, LSRLoss, lm_margin
from replugchar.training.module import LSRModule

OWN_MAX = FEATURES.index("own_max")


def unit(*rows) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_features_read_own_and_partner_turns_separately():
    settings = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    turns = unit([1, 0, 0], [0, 1, 0], [0, 1, 1])  # own, partner, own (latest)
    own = torch.tensor([True, False, True])
    f = dialogue_features(settings, turns, own)  # (3, 4)
    s = 2**-0.5
    expected = torch.tensor(
        [
            # own_max, own_last, partner_max, partner_last
            [1.0, 0.0, 0.0, 0.0],
            [s, s, 1.0, 1.0],
            [s, s, 0.0, 0.0],
        ]
    )
    assert torch.allclose(f, expected, atol=1e-6)
    assert torch.equal(dialogue_features(settings, turns[:0], own[:0]), torch.zeros(3, len(FEATURES)))
    only_partner = dialogue_features(settings, turns[1:2], torch.tensor([False]))
    assert torch.equal(only_partner[:, :2], torch.zeros(3, 2))  # no own turn: own features are 0


@pytest.fixture(scope="module")
def tiny_retriever():
    from replugchar.lm.models import load_encoder

    return Retriever(load_encoder("tiny:bert"), None, {})


SETTINGS = ["I have two cats.", "I run marathons.", "I bake bread every morning.", "I grew up by the sea."]


def test_rank_demotes_an_already_voiced_setting_only_when_the_weight_says_so(tiny_retriever):
    query = SETTINGS[0]  # the voiced setting is also the query's nearest setting: rank 1 by similarity
    history = [{"role": "user", "text": "Hi there."}, {"role": "character", "text": SETTINGS[0]}]
    plain = tiny_retriever.rank(SETTINGS, query, history, rule=ScoringRule())
    assert int(np.argmax(plain)) == 0
    np.testing.assert_allclose(
        plain, tiny_retriever.rank(SETTINGS, query, (), rule=ScoringRule())
    )  # w=0: no-op
    penalise = ScoringRule(weights=tuple(-2.0 if f == "own_max" else 0.0 for f in FEATURES))
    scores = tiny_retriever.rank(SETTINGS, query, history, rule=penalise)
    assert int(np.argmin(scores)) == 0  # score_j = cos(s0, s_j) - 2 cos(s0, s_j): s0 is now last
    favour = ScoringRule(weights=tuple(+2.0 if f == "own_max" else 0.0 for f in FEATURES))
    assert int(np.argmax(tiny_retriever.rank(SETTINGS, "Tell me more.", history, rule=favour))) == 0
    # the partner's turns do not count as the character's: the same history with roles swapped is a no-op here
    swapped = [{"role": "character" if t["role"] == "user" else "user", "text": t["text"]} for t in history]
    assert np.argmin(tiny_retriever.rank(SETTINGS, query, swapped, rule=penalise)) != 0


def test_rank_checks_its_inputs(tiny_retriever):
    with pytest.raises(ValueError, match="query is empty"):
        tiny_retriever.rank(SETTINGS, "   ")
    with pytest.raises(ValueError, match="no settings"):
        tiny_retriever.rank([], "Hello!")
    with pytest.raises(ValueError, match="priors must be 4 finite"):
        tiny_retriever.rank(SETTINGS, "Hello!", priors=[0.0, 1.0])
    with pytest.raises(ValueError, match="priors must be 4 finite"):
        tiny_retriever.rank(SETTINGS, "Hello!", priors=[0.0, 1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="role"):
        tiny_retriever.rank(
            SETTINGS, "Hello!", [{"role": "narrator", "text": "x"}], rule=ScoringRule(weights=(1, 0, 0, 0))
        )
    boosted = tiny_retriever.rank(
        SETTINGS, "Hello!", priors=[0, 0, 0, 1.0], rule=ScoringRule(prior_weight=0.5)
    )
    base = tiny_retriever.rank(SETTINGS, "Hello!", rule=ScoringRule())
    np.testing.assert_allclose(boosted - base, [0, 0, 0, 0.5], atol=1e-6)


def test_scoring_rule_round_trips_and_rejects_bad_values():
    rule = ScoringRule(weights=(-0.5, 0.1, 0.0, 0.2), prior_weight=0.3, threshold=-0.1, history_window=8)
    again = ScoringRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert again == rule and again.uses_history
    assert not ScoringRule(history_window=0, weights=(1, 0, 0, 0)).uses_history
    with pytest.raises(ValueError, match="4 values"):
        ScoringRule(weights=(1.0,))
    with pytest.raises(ValueError, match="finite"):
        ScoringRule(weights=(float("nan"), 0, 0, 0))
    with pytest.raises(ValueError, match="history_window"):
        ScoringRule(history_window=-1)


def test_search_is_rank_and_equals_faiss_without_history(tmp_path):
    characters = {"a": Character("a", tuple(SETTINGS)), "b": Character("b", ("I sail.", "I hate noise."))}
    module = LSRModule(encoder="tiny:bert", lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None))
    module.characters = characters
    with torch.no_grad():
        module.head.weights.copy_(torch.tensor([-1.0, 0.0, 0.5, 0.0]))
    priors = np.array([0.5, -0.5, 1.0, -1.0, 0.0, 0.0], dtype=np.float32)
    rule = ScoringRule(weights=(-1.0, 0.0, 0.5, 0.0), prior_weight=0.2)
    out = export_retriever(module, tmp_path / "export", priors=priors, rule=rule)
    retriever = Retriever.load(out)
    assert retriever.rule == rule
    assert json.loads((out / "retriever.json").read_text())["scoring"]["weights"]["own_max"] == -1.0
    history = [{"role": "character", "text": SETTINGS[2]}, {"role": "user", "text": "Do you like the sea?"}]
    hits = retriever.search("a", "Hello!", k=4, history=history, threshold=float("-inf"))
    ranked = retriever.rank(SETTINGS, "Hello!", history, priors=priors[:4])
    assert [h.index_in_character for h in hits] == list(np.argsort(-ranked, kind="stable"))
    assert [h.score for h in hits] == pytest.approx(sorted(ranked, reverse=True), abs=1e-5)
    for h in hits:  # the parts add up to the score
        assert h.score == pytest.approx(h.similarity + h.dialogue + 0.2 * h.prior, abs=1e-5)
    # without history the rule is cos + λ·prior, exactly what the FAISS index returns
    q = retriever.embed_queries(["Hello!"])
    faiss_scores, ids = retriever.index.search(q, 4, character_ids=["a"], prior_weight=0.2)
    plain = retriever.search("a", "Hello!", k=4, threshold=float("-inf"))
    assert [h.setting_id for h in plain] == ids[0].tolist()
    assert [h.score for h in plain] == pytest.approx(faiss_scores[0].tolist(), abs=1e-5)
    with pytest.raises(KeyError, match="unknown character 'zz'"):
        retriever.search("zz", "Hello!")
    # a threshold above every score leaves nothing
    assert retriever.search("a", "Hello!", threshold=10.0) == []


def voiced_toy():
    """4 characters x 4 settings; in every example the character already said two of its settings verbatim,
    and the gold reply is one of the two it has not said. A generic query carries no signal; the history does."""
    characters, examples = {}, []
    phrases = ["the quick brown fox jumps", "every cloud has a silver lining", "a penny saved is earned",
               "fortune favours the bold", "early to bed early to rise", "practice makes perfect",
               "the early bird gets it", "still waters run deep"]  # fmt: skip
    for c in range(4):
        cid = f"v{c}"
        settings = tuple(f"My saying: {phrases[(2 * c + j) % 8]} number {c}{j}." for j in range(4))
        characters[cid] = Character(cid, settings)
        for n in range(6):
            voiced = [(n + j) % 4 for j in (0, 1)]
            gold = (n + 2) % 4
            history = (Turn("user", "Hello!"), *(Turn("character", settings[j]) for j in voiced))
            examples.append(
                Example(
                    f"{cid}-{n}",
                    cid,
                    f"{cid}-{n}",
                    "Tell me more.",
                    settings[gold],
                    history[-2:],
                    history=history,
                )
            )
    return characters, examples


def test_lsr_learns_a_negative_weight_for_already_voiced_settings():
    characters, examples = voiced_toy()
    L.seed_everything(0, verbose=False)
    module = LSRModule(
        encoder="tiny:bert",
        k=4,
        freeze_encoder=True,
        refresh_every=5,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None),
        loss=LossOptions(beta=0.5),
        head=HeadOptions(learning_rate=0.1),
    )
    module.characters = characters
    tok = byte_tokenizer(1024)
    module.set_likelihood(
        CachedLikelihood(LMLikelihood(CopyLM(len(tok)), tok, module.template, lm_key="copy-lm"))
    )
    before = dict(module.encoder.state_dict())
    trainer = toy_trainer(max_steps=30)
    trainer.fit(
        module,
        train_dataloaders=DataLoader(examples, batch_size=8, shuffle=True, collate_fn=collate_examples),
    )
    w = module.head.weights.detach()
    assert w[OWN_MAX] < -0.5, w  # voiced settings never help this LM: their evidence weight went negative
    assert all(torch.equal(before[k], v) for k, v in module.encoder.state_dict().items())  # frozen encoder
    retriever = module.as_retriever()
    top1_unvoiced = [
        int(np.argmax(retriever.rank_example(e, characters[e.character_id].settings)))
        not in [characters[e.character_id].settings.index(t.text) for t in e.history if t.role == "character"]
        for e in examples
    ]
    assert np.mean(top1_unvoiced) == 1.0


def test_fit_of_the_dialogue_scale_is_never_worse_than_similarity():
    rng = np.random.default_rng(0)
    n = 200
    sims = rng.normal(size=(n, 5))
    gains = rng.normal(size=(n, 5))
    helpful = gains - gains.mean(1, keepdims=True)  # a dialogue term that points at the LM's best setting
    cal = calibration.fit(sims, np.zeros_like(sims), gains, dialogue=helpful, fit_threshold=False)
    assert cal.dialogue_scale > 0 and cal.gain_fitted_weight > cal.gain_at_zero
    harmful = -helpful
    cal = calibration.fit(sims, np.zeros_like(sims), gains, dialogue=harmful, fit_threshold=False)
    assert cal.dialogue_scale == 0.0 and cal.gain_fitted_weight == pytest.approx(cal.gain_at_zero)


def test_loss_options_against_a_weak_teacher():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.5, 0.2]], requires_grad=True)
    lm = torch.tensor([[-1.0, -1.001, -3.0], [-1.0, -2.0, -3.0]])  # row 0: best and second nearly tied
    assert lm_margin(lm).tolist() == pytest.approx([0.001, 1.0], abs=1e-6)
    plain = LSRLoss(gamma=0.1, beta=0.05)
    filtered = LSRLoss(gamma=0.1, beta=0.05, min_margin=0.01)
    # the filtered loss is the plain per-query loss of row 1 alone
    assert float(filtered(sim, lm)) == pytest.approx(float(plain(sim[1:], lm[1:])), rel=1e-6)
    hard = LSRLoss(gamma=0.1, beta=0.05, top1_weight=1.0)
    log_pr, _, _ = plain.distributions(sim, lm)
    extra = -(log_pr[0, 0] + log_pr[1, 0]) / 2  # CE towards the LM's best candidate (index 0 in both rows)
    assert float(hard(sim, lm)) == pytest.approx(float(plain(sim, lm) + extra), rel=1e-5)
    hard(sim, lm).backward()
    assert sim.grad is not None and torch.isfinite(sim.grad).all()
    with pytest.raises(ValueError, match="min_margin"):
        LSRLoss(min_margin=-1.0)


def test_sessions_give_each_example_its_whole_history(write_data, tmp_path):
    chars = [{"character_id": "a", "settings": ["I sail."]}, {"character_id": "b", "settings": ["I bake."]}]
    turns = [("b", "Hi!"), ("a", "Hello."), ("b", "Do you sail?"), ("a", "Every day."), ("b", "Where?")]
    dialogues = [
        {"example_id": "d-t3", "character_id": "a", "dialogue_id": "d", "turn_index": 3, "query": "Do you sail?",
         "response": "Every day.", "context": [{"role": "user", "text": "Hi!"}]},
    ]  # fmt: skip
    folder = write_data(chars, dialogues)
    session = {"dialogue_id": "d", "turns": [{"speaker_id": s, "text": t} for s, t in turns]}
    (folder / "sessions.jsonl").write_text(json.dumps(session) + "\n", encoding="utf-8")
    [e] = Corpus.load(folder).examples
    assert e.history == (Turn("user", "Hi!"), Turn("character", "Hello."))  # roles relative to 'a'
    assert e.context == (Turn("user", "Hi!"),)  # the LM prompt keeps the file's context
    assert e.dialogue == e.history
    bad = dict(dialogues[0], query="Something else?")
    folder = write_data(chars, [bad], name="bad")
    (folder / "sessions.jsonl").write_text(json.dumps(session) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dialogues\.jsonl:1: field 'query' is not turn 2 of session 'd'"):
        Corpus.load(folder)
    folder = write_data(chars, [dict(dialogues[0], turn_index=9)], name="far")
    (folder / "sessions.jsonl").write_text(json.dumps(session) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dialogues\.jsonl:1: field 'turn_index' must be in \[1, 5\]"):
        Corpus.load(folder)
    folder = write_data(chars, dialogues, name="broken")
    (folder / "sessions.jsonl").write_text('{"dialogue_id": "d", "turns": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"sessions\.jsonl:1: field 'turns' must be a list"):
        Corpus.load(folder)
