"""LMLikelihood: batching is invisible in the result, the result is the plain log-likelihood, the truncation
policy, the LM stays frozen; PromptTemplate rendering and fingerprint."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import three_turn_example

from replugchar.core.data import Example, Turn
from replugchar.lm.likelihood import NO_SETTING, LMLikelihood, LoglikRequest, PromptTemplate


@pytest.fixture(scope="module")
def requests_(examples, characters) -> list[LoglikRequest]:
    """16 requests of varying prompt and response lengths: one setting, two settings, and none."""
    out = [LoglikRequest(e, (characters[e.character_id].settings[i % 3],)) for i, e in enumerate(examples)]
    out += [LoglikRequest(e, characters[e.character_id].settings[:2]) for e in examples[:2]]
    out += [LoglikRequest(e, NO_SETTING) for e in examples[4:6]]
    return out


def manual_logp(model, tok, prompt: str, response: str) -> tuple[float, int]:
    """Sum of log P(response tokens + eos | prompt) from one unpadded full forward pass."""
    resp = [*tok(response, add_special_tokens=False).input_ids, tok.eos_token_id]
    ids = tok(prompt).input_ids + resp
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (seq, vocab)
    logp = torch.log_softmax(logits.double()[:-1], -1)  # position t predicts token t+1
    token_logp = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)  # (seq-1,)
    return float(token_logp[-len(resp) :].sum()), len(resp)


def test_batched_logliks_equal_one_by_one_logliks(tiny_lm, requests_):
    model, tok = tiny_lm
    likelihood = LMLikelihood(model, tok, max_batch_tokens=300)
    lengths = sorted(len(likelihood.encode(r)[0]) for r in requests_)
    assert len(requests_) >= 10 and lengths[-1] - lengths[0] > 40  # really varying lengths

    batched = likelihood.loglik(requests_)
    assert 1 < likelihood.forward_passes < len(requests_)  # several batches, some of them padded
    assert likelihood.pairs_computed == len(requests_)

    single = LMLikelihood(model, tok, max_batch_tokens=100_000)
    one_by_one = [single.loglik([r]) for r in requests_]
    np.testing.assert_allclose(batched.logp_sum, [s.logp_sum[0] for s in one_by_one], atol=1e-4, rtol=0)
    assert batched.n_tokens.tolist() == [int(s.n_tokens[0]) for s in one_by_one]
    assert np.all(batched.logp_sum < 0) and batched.logp_sum.dtype == np.float64
    np.testing.assert_allclose(batched.logp_mean, batched.logp_sum / batched.n_tokens)


def test_logliks_equal_a_manual_full_forward(tiny_lm):
    model, tok = tiny_lm
    likelihood = LMLikelihood(model, tok, max_batch_tokens=200)
    ex = Example(
        "ex-manual",
        "c",
        "d",
        query="Any plans tonight?",
        response="Reading a book about old maps.",
        context=(Turn("user", "Hi there."), Turn("character", "Hello, sailor here.")),
    )
    cases = [
        (("I collect old maps.",), "Character trait: I collect old maps.\n"),
        (("I collect old maps.", "I hate loud music."),
         "Character trait: I collect old maps.\nCharacter trait: I hate loud music.\n"),
        (NO_SETTING, ""),
    ]  # fmt: skip
    dialogue = "User: Hi there.\nCharacter: Hello, sailor here.\nUser: Any plans tonight?\nCharacter:"
    got = likelihood.loglik([LoglikRequest(ex, settings) for settings, _ in cases])
    for row, (_, trait_lines) in enumerate(cases):
        want, n = manual_logp(model, tok, trait_lines + dialogue, " " + ex.response)
        assert got.n_tokens[row] == n
        assert got.logp_sum[row] == pytest.approx(want, abs=1e-4)
    assert len(set(np.round(got.logp_sum, 4))) == 3  # the settings change the score


def test_truncation_drops_oldest_context_first_and_never_cuts_the_response(tiny_lm):
    model, tok = tiny_lm
    ex = three_turn_example()
    turns = ex.context
    req = LoglikRequest(ex, ("I grew up by the sea.",))
    template = PromptTemplate()
    resp = [*tok(" " + ex.response, add_special_tokens=False).input_ids, tok.eos_token_id]

    def prompt_ids(context) -> list[int]:
        return tok(template.render(req.settings, context, ex.query)).input_ids

    full = LMLikelihood(model, tok, max_length=1000).encode(req)
    assert full == (prompt_ids(turns) + resp, len(resp))

    # room for everything but the first turn -> only the oldest turn goes
    limit = len(prompt_ids(turns[1:])) + len(resp)
    ids, n = LMLikelihood(model, tok, max_length=limit).encode(req)
    assert ids == prompt_ids(turns[1:]) + resp and n == len(resp)
    assert "FIRST" not in tok.decode(ids) and "SECOND" in tok.decode(ids) and "THIRD" in tok.decode(ids)

    # one token less -> the two oldest go, the newest stays
    ids, _ = LMLikelihood(model, tok, max_length=limit - 1).encode(req)
    assert ids == prompt_ids(turns[2:]) + resp
    assert "SECOND" not in tok.decode(ids) and "THIRD" in tok.decode(ids)

    # the truncated request is scored with its whole response
    scores = LMLikelihood(model, tok, max_length=limit - 1).loglik([req])
    assert scores.n_tokens.tolist() == [len(resp)]

    # not even the context-free prompt fits: the error names the example, the response is not cut
    too_small = len(prompt_ids(())) + len(resp) - 1
    with pytest.raises(ValueError, match="ex-long") as err:
        LMLikelihood(model, tok, max_length=too_small).encode(req)
    assert "max_length" in str(err.value)


def test_max_length_is_capped_by_the_model_positions(tiny_lm):
    model, tok = tiny_lm
    assert LMLikelihood(model, tok, max_length=10_000).max_length == model.config.n_positions
    with pytest.raises(ValueError):
        LMLikelihood(model, tok, max_batch_tokens=0)


def test_loglik_of_an_lm_in_training_changes_nothing_and_builds_no_graph(tiny_lm, requests_):
    """Fine-tuning validates with LMLikelihood, so it may get an LM that trains: loglik must leave its weights
    bit-identical, its requires_grad flags and train mode as they were, write no .grad, and run the forward passes
    without autograd although the caller has grad enabled (inside a training step)."""
    model, tok = copy.deepcopy(tiny_lm[0]).train().requires_grad_(True), tiny_lm[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_enabled: list[bool] = []
    hook = model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            scores = LMLikelihood(model, tok, max_batch_tokens=400).loglik(requests_[:6])
    finally:
        hook.remove()
    assert isinstance(scores.logp_sum, np.ndarray)
    assert grad_enabled and not any(grad_enabled)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prompt_template_render_with_and_without_settings():
    t = PromptTemplate()
    context = (Turn("user", "Hi."), Turn("character", "Hello!"))
    assert t.render(("I bake.", "I run."), context, "How are you?") == (
        "Character trait: I bake.\nCharacter trait: I run.\nUser: Hi.\nCharacter: Hello!\nUser: How are you?\nCharacter:"
    )
    assert (
        t.render((), context, "How are you?")
        == "User: Hi.\nCharacter: Hello!\nUser: How are you?\nCharacter:"
    )
    assert t.render(NO_SETTING, (), "Yo") == "User: Yo\nCharacter:"
    custom = PromptTemplate(setting_line="[{setting}] ", query_line="Q: {text}\nA:")
    assert custom.render(("kind",), (), "Why?") == "[kind] Q: Why?\nA:"


def test_template_fingerprint_changes_with_every_field(tiny_lm):
    base = PromptTemplate()
    assert base.fingerprint() == PromptTemplate().fingerprint()
    for field in dataclasses.fields(PromptTemplate):
        value = "after" if field.name == "settings_position" else getattr(base, field.name) + "!"
        changed = dataclasses.replace(base, **{field.name: value})
        assert changed.fingerprint() != base.fingerprint(), field.name

    model, tok = tiny_lm
    fp = LMLikelihood(model, tok, lm_key="tiny").fingerprint
    assert LMLikelihood(model, tok, lm_key="tiny").fingerprint == fp
    assert LMLikelihood(model, tok, PromptTemplate(user_line="U: {text}\n"), lm_key="tiny").fingerprint != fp
    assert LMLikelihood(model, tok, lm_key="tiny", max_length=256).fingerprint != fp
    assert LMLikelihood(model, tok, lm_key="other").fingerprint != fp
