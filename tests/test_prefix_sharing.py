"""Prefix-shared LM scoring: the settings-after template, its fingerprint (the default's is pinned: Parquet caches
are keyed by it), and log-likelihoods of the prefix-shared path equal to the per-prompt path's for the same template, with
mixed examples, varied lengths, the no-setting candidate, token-budget batching and truncation."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import three_turn_example

from replugchar.core.data import Example, Turn
from replugchar.lm import likelihood as likelihood_module
from replugchar.lm.likelihood import (
    NO_SETTING,
    LMLikelihood,
    LoglikRequest,
    PromptTemplate,
    _full_attention_only,
    _padded_partition,
    supports_prefix_sharing,
)
from replugchar.lm.loglik_cache import CachedLikelihood

AFTER = PromptTemplate(settings_position="after")
JA = dict(
    setting_line="人物設定: {setting}\n",
    user_line="相手: {text}\n",
    character_line="本人: {text}\n",
    query_line="相手: {text}\n本人:",
)  # configs/ja_example.yaml
ATOL = 5e-5  # fp32: the two paths differ only in batch layout (padding, reduction order), sums of ~50 log p


def candidates(examples, characters, *, pairs: bool = True) -> list[LoglikRequest]:
    """Every turn's k + 1 candidates (each own setting, and none), plus a two-setting candidate, shuffled so that
    turns and candidates arrive interleaved."""
    out = []
    for ex in examples:
        settings = characters[ex.character_id].settings
        out.append(LoglikRequest(ex, NO_SETTING))
        out += [LoglikRequest(ex, (s,)) for s in settings]
        if pairs:
            out.append(LoglikRequest(ex, settings[:2]))
    random.Random(0).shuffle(out)
    return out


def both_paths(model, tok, requests, template=AFTER, **kwargs):
    shared = LMLikelihood(model, tok, template, **kwargs)
    per_prompt = LMLikelihood(model, tok, template, share_prefix=False, **kwargs)
    return shared, shared.loglik(requests), per_prompt, per_prompt.loglik(requests)


def shared_tokens(encoded) -> int:
    """Tokens the prefix-shared path runs when each turn's candidates fit one row (``_TREE_ROW_TOKENS`` large): a
    lone candidate's whole prompt; per group of a turn, its prefix once (the last token held back when a member's
    suffix is empty), then the trie of its members' continuations ([held token +] suffix + response + eos): each
    distinct leading part once."""
    groups: dict[tuple[int, ...], list] = {}
    for prefix, cont, n in encoded:
        groups.setdefault(tuple(prefix), []).append((cont, n))
    total = 0
    for prefix, members in groups.items():
        if len(members) == 1:
            total += len(prefix) + len(members[0][0])
            continue
        hold = int(any(len(cont) == n for cont, n in members))
        seqs = [prefix[len(prefix) - hold :] + tuple(cont) for cont, _ in members]
        total += len(prefix) - hold + len({seq[:j] for seq in seqs for j in range(1, len(seq) + 1)})
    return total


@pytest.fixture
def one_row_per_turn(monkeypatch):
    """Rows as wide as need be: each turn's candidates form one trie, so token counts have a closed form."""
    monkeypatch.setattr(likelihood_module, "_TREE_ROW_TOKENS", 100_000)


def manual_logp(model, tok, prompt_ids: list[int], response: str) -> float:
    """Sum of log P(response tokens + eos | prompt) from one unpadded full forward pass, in float64."""
    resp = [*tok(response, add_special_tokens=False).input_ids, tok.eos_token_id]
    ids = prompt_ids + resp
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (seq, vocab)
    logp = torch.log_softmax(logits.double()[:-1], -1)  # position t predicts token t+1
    return float(logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)[-len(resp) :].sum())


# ----------------------------------------------------------------------------------------------- template
def test_default_template_fingerprints_are_pinned(tiny_lm):
    """Values computed before settings_position existed: a changed hash would orphan every log-likelihood cache."""
    assert PromptTemplate().fingerprint() == "ca4a1283cef8"
    assert PromptTemplate(settings_position="before").fingerprint() == "ca4a1283cef8"
    assert PromptTemplate(**JA).fingerprint() == "f2ec484302cb"
    # a template dict written before the field existed (retriever.json, hparams) loads to the same hash
    assert PromptTemplate(**{**JA, "response": " {text}"}).fingerprint() == "f2ec484302cb"
    model, tok = tiny_lm
    assert LMLikelihood(model, tok, lm_key="tiny").fingerprint == "tiny|float32|ca4a1283cef8|512"
    # the settings-after template scores other prompts: it must not share the default's cache
    assert AFTER.fingerprint() != PromptTemplate().fingerprint()
    assert PromptTemplate(**JA, settings_position="after").fingerprint() != "f2ec484302cb"
    assert (
        LMLikelihood(model, tok, lm_key="tiny", share_prefix=False).fingerprint
        == "tiny|float32|ca4a1283cef8|512"
    )


def test_settings_after_renders_trait_lines_before_the_reply_marker():
    context = (Turn("user", "Hi."), Turn("character", "Hello!"))
    dialogue = "User: Hi.\nCharacter: Hello!\nUser: How are you?\n"
    assert AFTER.render(("I bake.", "I run."), context, "How are you?") == (
        dialogue + "Character trait: I bake.\nCharacter trait: I run.\nCharacter:"
    )
    assert AFTER.render_split(("I bake.",), context, "How are you?") == (
        dialogue,
        "Character trait: I bake.\nCharacter:",
    )
    # the no-setting prompt is the same text in both positions
    assert AFTER.render(NO_SETTING, context, "How are you?") == PromptTemplate().render(
        (), context, "How are you?"
    )
    ja = PromptTemplate(**JA, settings_position="after")
    assert ja.render(("猫が好き。",), (), "元気?") == "相手: 元気?\n人物設定: 猫が好き。\n本人:"
    with pytest.raises(ValueError, match="render_split"):
        PromptTemplate().render_split((), (), "q")


def test_settings_after_validates_its_options():
    with pytest.raises(ValueError, match="settings_position"):
        PromptTemplate(settings_position="middle")
    with pytest.raises(ValueError, match="query_line"):  # no newline between the query and the reply marker
        PromptTemplate(query_line="Q: {text} A:", settings_position="after")
    PromptTemplate(query_line="Q: {text} A:")  # fine where the settings come first


# ----------------------------------------------------------------------------------------------- scores
def test_per_prompt_path_of_settings_after_equals_a_manual_forward(tiny_lm, examples, characters):
    """The per-prompt path scores tokenize(prefix) + tokenize(suffix) + response; for the byte tokenizer that is
    the tokenisation of the whole prompt, and the score is the plain log-likelihood."""
    model, tok = tiny_lm
    ex = examples[5]  # three context turns
    likelihood = LMLikelihood(model, tok, AFTER, share_prefix=False)
    for settings in (NO_SETTING, characters["bob"].settings[:1], characters["bob"].settings[:2]):
        prompt = AFTER.render(settings, ex.context, ex.query)
        prefix, suffix = AFTER.render_split(settings, ex.context, ex.query)
        ids, n = likelihood.encode(LoglikRequest(ex, settings))
        assert ids[:-n] == tok(prompt).input_ids == tok(prefix).input_ids + tok(suffix).input_ids
        got = likelihood.loglik([LoglikRequest(ex, settings)]).logp_sum[0]
        assert got == pytest.approx(
            manual_logp(model, tok, tok(prompt).input_ids, " " + ex.response), abs=ATOL
        )


def test_prefix_shared_logliks_equal_per_prompt_logliks(tiny_lm, examples, characters, one_row_per_turn):
    model, tok = tiny_lm
    requests = candidates(examples, characters)
    shared, a, per_prompt, b = both_paths(model, tok, requests, max_batch_tokens=400)
    assert (
        len(requests) == 12 * 2 + 4 * 4 + 4 * 3 + 4 * 5
        and len({r.example.example_id for r in requests[:10]}) > 3
    )
    np.testing.assert_allclose(a.logp_sum, b.logp_sum, atol=ATOL, rtol=0)
    assert a.n_tokens.tolist() == b.n_tokens.tolist()
    assert np.all(a.logp_sum < 0)
    assert len(set(np.round(a.logp_sum, 3))) > len(requests) * 0.9  # settings change the scores
    # each turn's dialogue went through the model once, not k + 1 times
    encoded = shared.encode_split_many(requests)
    prefixes = {tuple(p) for p, _, _ in encoded}
    assert len(prefixes) == len(examples)
    assert per_prompt.tokens_forwarded == sum(len(p) + len(c) for p, c, _ in encoded)
    # at this budget a turn's trie is cut into rows (each runs the tokens its candidates share again)
    wide = LMLikelihood(model, tok, AFTER, max_batch_tokens=100_000)
    np.testing.assert_allclose(wide.loglik(requests).logp_sum, b.logp_sum, atol=ATOL, rtol=0)
    assert wide.tokens_forwarded == shared_tokens(encoded) < shared.tokens_forwarded
    assert shared.tokens_forwarded < per_prompt.tokens_forwarded - sum(len(p) for p in prefixes) * 3
    assert shared.forward_passes > 2  # several prefix batches and continuation batches at this budget
    assert shared.pairs_computed == per_prompt.pairs_computed == len(requests)


@pytest.mark.parametrize("budget", [120, 700, 100_000])
def test_prefix_shared_logliks_do_not_depend_on_the_token_budget(tiny_lm, examples, characters, budget):
    """Tiny budgets split a turn's candidates over several continuation batches (each gathers the cache again),
    large ones mix prefixes of different lengths in one batch (left padding inside the cached prefix)."""
    model, tok = tiny_lm
    requests = candidates(examples[:6], characters, pairs=False)
    want = LMLikelihood(model, tok, AFTER, share_prefix=False, max_batch_tokens=100_000).loglik(requests)
    likelihood = LMLikelihood(model, tok, AFTER, max_batch_tokens=budget)
    got = likelihood.loglik(requests)
    np.testing.assert_allclose(got.logp_sum, want.logp_sum, atol=ATOL, rtol=0)
    if budget == 120:
        assert likelihood.forward_passes > len({r.example.example_id for r in requests})


def test_empty_suffix_and_single_candidates(tiny_lm, examples, one_row_per_turn):
    """A reply marker-less template gives the no-setting candidate an empty suffix (the held-back prefix token
    predicts the first response token); a turn with one candidate takes the per-prompt path."""
    model, tok = tiny_lm
    template = PromptTemplate(query_line="User: {text}\n", settings_position="after")
    requests = [LoglikRequest(ex, NO_SETTING) for ex in examples[:4]]
    requests += [LoglikRequest(ex, ("I like tea.",)) for ex in examples[:3]]  # examples[3] is alone
    shared, a, _, b = both_paths(model, tok, requests, template=template)
    np.testing.assert_allclose(a.logp_sum, b.logp_sum, atol=ATOL, rtol=0)
    assert a.n_tokens.tolist() == b.n_tokens.tolist()
    # the lone turn's whole prompt; each other turn's prefix once, its last token held back (the no-setting
    # candidate has an empty suffix) and run again once, at the root of the turn's row, in front of both
    # continuations (which share nothing else: one starts with the response, the other with "Character")
    encoded = shared.encode_split_many(requests)
    lone = len(encoded[3][0]) + len(encoded[3][1])
    held = sum(len(encoded[g][0]) - 1 for g in (0, 1, 2))
    continuations = 3 + sum(len(c) for i, (_, c, _) in enumerate(encoded) if i != 3)
    assert shared.tokens_forwarded == lone + held + continuations == shared_tokens(encoded)


def test_truncation_gives_candidates_of_one_turn_different_prefixes(tiny_lm):
    """A long setting needs more room than a short one, so at a tight max_length its candidate drops the oldest
    turn and the others keep it: prefixes differ within the turn; each group is scored against its own prefix."""
    model, tok = tiny_lm
    ex = three_turn_example()
    turns = ex.context
    other = Example("ex-other", "c", "d2", query="Tea?", response="Gladly.", context=turns[2:])
    short, long = ("I swim.",), ("I grew up by the sea, in a small town with a lighthouse and a harbour.",)
    wide = LMLikelihood(model, tok, AFTER, max_length=1000)
    n_short = sum(map(len, wide.encode_split(LoglikRequest(ex, short))[:2]))
    limit = n_short + 5  # the short candidate keeps every turn; the long one loses at least the first
    requests = [LoglikRequest(ex, s) for s in (NO_SETTING, short, long, long + short)]
    requests += [LoglikRequest(other, s) for s in (NO_SETTING, short, long)]
    likelihood = LMLikelihood(model, tok, AFTER, max_length=limit)
    encoded = likelihood.encode_split_many(requests)
    prefixes = [tok.decode(p) for p, _, _ in encoded]
    assert "FIRST" in prefixes[1] and "FIRST" not in prefixes[2]  # one turn, two prefixes
    assert len({tuple(p) for p, _, _ in encoded[:4]}) >= 2
    assert [likelihood.encode(r) for r in requests] == likelihood.encode_many(
        requests
    )  # same ids, one by one or many
    resp = len(tok(" " + ex.response).input_ids) + 1
    assert [n for _, _, n in encoded[:4]] == [resp] * 4  # the response is never cut
    assert all(len(p) + len(c) <= limit for p, c, _ in encoded)

    a = likelihood.loglik(requests)
    b = LMLikelihood(model, tok, AFTER, max_length=limit, share_prefix=False).loglik(requests)
    np.testing.assert_allclose(a.logp_sum, b.logp_sum, atol=ATOL, rtol=0)

    # not even the context-free prompt fits: both paths raise, naming the example
    too_small = len(likelihood.encode_split(LoglikRequest(ex, long))[1]) + 2
    for share in (True, False):
        with pytest.raises(ValueError, match="ex-long"):
            LMLikelihood(model, tok, AFTER, max_length=too_small, share_prefix=share).loglik(requests[2:3])


def test_cache_in_front_of_the_prefix_shared_likelihood(tiny_lm, examples, characters, tmp_path):
    model, tok = tiny_lm
    requests = candidates(examples[:3], characters, pairs=False)
    likelihood = LMLikelihood(model, tok, AFTER)
    cached = CachedLikelihood(likelihood, tmp_path)
    first = cached.loglik(requests)
    cached.flush()
    passes = likelihood.forward_passes
    again = CachedLikelihood(likelihood, tmp_path).loglik(requests)
    assert likelihood.forward_passes == passes  # all hits
    np.testing.assert_array_equal(again.logp_sum, first.logp_sum)
    default_folder = CachedLikelihood(LMLikelihood(model, tok), tmp_path).folder
    assert cached.folder != default_folder  # another template, another cache


def test_models_without_full_attention_everywhere_take_the_per_prompt_path(tiny_lm):
    model, _ = tiny_lm
    assert supports_prefix_sharing(model)
    assert not supports_prefix_sharing(SimpleNamespace(config=model.config))  # not a transformers model
    cfg = SimpleNamespace
    assert not _full_attention_only(cfg(layer_types=["full_attention", "sliding_attention"]))
    assert _full_attention_only(cfg(layer_types=["full_attention"]))
    assert not _full_attention_only(cfg(sliding_window=4096))
    assert _full_attention_only(cfg(sliding_window=4096, use_sliding_window=False))


def test_alibi_models_take_the_per_prompt_path_with_the_same_logliks(tiny_lm, examples, characters):
    """Bloom passes every other check (eager attention, full layers) but builds ALiBi from a 2D mask."""
    from transformers import BloomConfig, BloomForCausalLM

    _, tok = tiny_lm
    torch.manual_seed(0)
    config = BloomConfig(
        vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=2, attn_implementation="eager"
    )
    bloom = BloomForCausalLM(config).eval()
    assert not supports_prefix_sharing(bloom)
    requests = candidates(examples[:2], characters)
    _, shared, _, per_prompt = both_paths(bloom, tok, requests)
    np.testing.assert_allclose(shared.logp_sum, per_prompt.logp_sum, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cap", [1, 40, 160])
def test_rows_of_any_width_give_the_same_logliks(tiny_lm, examples, characters, monkeypatch, cap):
    """A turn's candidates cut into rows of at most ``cap`` nodes: one candidate per row (1), several rows per
    turn (40), one row for most turns (160), rows of different widths padded in one batch; a candidate asked
    twice in one call (the same trie path) gets the same score twice."""
    model, tok = tiny_lm
    monkeypatch.setattr(likelihood_module, "_TREE_ROW_TOKENS", cap)
    requests = candidates(examples[:6], characters)
    requests += requests[:5]  # duplicates
    want = LMLikelihood(model, tok, AFTER, share_prefix=False).loglik(requests)
    likelihood = LMLikelihood(model, tok, AFTER)
    got = likelihood.loglik(requests)
    np.testing.assert_allclose(got.logp_sum, want.logp_sum, atol=ATOL, rtol=0)
    assert got.logp_sum[-5:].tolist() == got.logp_sum[:5].tolist()


def test_tree_row_runs_shared_tokens_once_and_predicts_each_target_from_its_own_path():
    row = likelihood_module._TreeRow(prefix_row=0)
    row.insert(7, [1, 2, 3, 9, 8], n_resp=2)  # continuation [1, 2, 3] then response [9, 8]
    assert row.new_nodes([1, 2, 4, 9]) == 2 and row.new_nodes([1, 2, 3]) == 0
    row.insert(5, [1, 2, 4, 9], n_resp=1)
    assert row.tokens == [1, 2, 3, 9, 8, 4, 9]  # [1, 2] once; the second 9 has another context
    assert row.parents == [-1, 0, 1, 2, 3, 1, 5]
    assert row.depths == [0, 1, 2, 3, 4, 2, 3]
    assert (row.predictors, row.targets, row.owners) == ([2, 3, 5], [9, 8, 9], [7, 7, 5])
    rows = likelihood_module._tree_rows(
        0, [(0, [1, 2, 3, 9], 1), (1, [1, 2, 4, 9], 1), (2, [5, 9], 1)], cap=6
    )
    assert [len(r.tokens) for r in rows] == [6, 2]  # the row is full at 6 nodes; [5, 9] starts the next
    _, position_ids, sees = likelihood_module._tree_batch(rows, cached=[10, 10], pad=0)
    assert position_ids.tolist() == [[10, 11, 12, 13, 12, 13], [10, 11, 0, 0, 0, 0]]
    assert sees[0, 3].tolist() == [True, True, True, True, False, False]  # ancestors and itself
    assert sees[1, 4].tolist() == [False] * 4 + [True, False]  # padding sees itself only


def test_padded_partition_trades_padding_against_forwards():
    widths = [40, 40, 39, 30, 30, 12, 12, 12, 11, 5]
    cached = [60] * len(widths)

    def check(cuts, budget):
        assert cuts[0][0] == 0 and cuts[-1][1] == len(widths)
        assert all(
            a[1] == b[0] for a, b in itertools.pairwise(cuts)
        )  # consecutive, nothing skipped or repeated
        assert all(j - i == 1 or (j - i) * (widths[i] + 60) <= budget for i, j in cuts)

    free = _padded_partition(widths, cached, 10_000, overhead=0)  # forwards cost nothing: no padding at all
    check(free, 10_000)
    assert all(len({widths[x] for x in range(i, j)}) == 1 for i, j in free)
    costly = _padded_partition(widths, cached, 10_000, overhead=10_000)  # forwards cost everything: one batch
    assert costly == [(0, len(widths))]
    tight = _padded_partition(widths, cached, 300, overhead=64)  # the budget caps rows x (width + cached)
    check(tight, 300)
    assert tight == [(0, 3), (3, 6), (6, 10)]  # (5, 10) would pad less but exceeds the budget
    assert _padded_partition([], [], 300, overhead=64) == []


def test_the_fit_cli_takes_the_option_and_the_module_rejects_bad_values(monkeypatch, capsys):
    """``model.template.settings_position`` is an option of ``replugchar fit``, so a config can switch the teacher
    to the prefix-shared layout; a wrong value fails at parsing, naming the option."""
    from test_configs import ParseOnlyCLI

    from replugchar.training.datamodule import LSRDataModule
    from replugchar.training.module import LSRModule

    monkeypatch.setattr("sys.argv", ["replugchar"])
    debug = str(Path(__file__).parents[1] / "configs" / "debug.yaml")

    def template(value: str) -> dict:
        args = ["--config", debug, "--model.template.settings_position", value]
        return dict(ParseOnlyCLI(LSRModule, LSRDataModule, run=False, args=args).config.model.template)

    after = template("after")
    assert after["settings_position"] == "after"
    assert (
        PromptTemplate(**after).render(("I bake.",), (), "Hi")
        == "User: Hi\nCharacter trait: I bake.\nCharacter:"
    )
    # a typed group: the parser itself refuses the value, naming the option, before anything is built
    with pytest.raises(SystemExit):
        template("middle")
    assert "model.template.settings_position" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"settings_position.*'middle'"
    ):  # and so does the template from code
        PromptTemplate(settings_position="middle")
