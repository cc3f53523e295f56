"""``replugchar chat``: the settings table and reply (one-shot, interactive with history, --compare base), the
threshold leaving no setting, REPLUG ensemble decoding against top-1 decoding and a hand-computed mixture
(:func:`replugchar.lm.decoding.replug_next_token_logprobs`), and one-line user errors. Tiny models only."""

from __future__ import annotations

import copy
import io
import re
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from replugchar.cli import main as cli_main
from replugchar.core.data import Turn
from replugchar.core.scoring import ScoringRule
from replugchar.lm import decoding
from replugchar.lm.decoding import replug_next_token_logprobs
from replugchar.lm.likelihood import PromptTemplate
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.retriever import Hit, Retriever

TEMPLATE = PromptTemplate()
QUICK = ["--max_new_tokens", "6"]


def _export(tmp_path_factory, characters, name: str, rule: ScoringRule | None = None):
    from replugchar.retrieval.export import export_retriever
    from replugchar.training.module import LSRModule

    module = LSRModule(
        encoder="tiny:bert", k=3, lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None)
    )
    module.characters = dict(characters)
    return str(export_retriever(module, tmp_path_factory.mktemp(name) / "retriever", rule=rule))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, characters) -> str:
    return _export(tmp_path_factory, characters, "chat-export")


@pytest.fixture(scope="module")
def strict_export_dir(tmp_path_factory, characters) -> str:
    """An export whose relevance threshold no cosine similarity reaches: every turn retrieves nothing."""
    return _export(tmp_path_factory, characters, "chat-strict", ScoringRule(threshold=5.0))


@pytest.fixture(scope="module")
def ascii_lm(tiny_lm):
    """The tiny GPT-2 with perturbed weights (varied greedy output) that can only emit printable ASCII or eos.

    Why: ``replug_next_token_logprobs`` takes the reply so far as text, so a byte token that is not a whole
    UTF-8 character does not survive decode -> encode; with printable ASCII the round trip is exact. One hidden
    coordinate is pinned to 1 after the final layer norm and the output embeddings of other tokens get -100
    there (their logits drop by 100)."""
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    allowed = set(string.ascii_letters + string.digits + " .,!?'")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 1.0
        wte = model.transformer.wte.weight  # tied with lm_head
        for i in range(len(tok)):
            wte[i, 0] = 0.0 if i == tok.eos_token_id or tok.decode([i]) in allowed else -100.0
    return model, tok


def _hit(text: str, score: float, i: int = 0) -> Hit:
    return Hit(text, i, i, score, 0.0, score)


def _replies(out: str, label: str = "trained") -> list[str]:
    return re.findall(rf"^Character \[{re.escape(label)};[^\]]*\]: (.*)$", out, flags=re.M)


def _prompts(out: str) -> list[str]:
    return re.findall(r"--- prompt \([^)]*\) ---\n(.*?)\n---", out, flags=re.S)


# ----------------------------------------------------------------------------------------------- CLI
def test_one_shot_prints_settings_table_and_reply(export_dir, characters, capsys):
    cli_main(["chat", "--retriever", export_dir, "--character", "alice", "--query", "Hello!", *QUICK])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "User: Hello!" in lines
    assert "LM tiny:gpt2" in lines[0]  # --lm defaults to retriever.json's likelihood LM
    header = next(
        i for i, line in enumerate(lines) if line.split()[:5] == ["rank", "score", "sim", "dialog", "prior"]
    )
    rows = lines[header + 1 : header + 4]  # k = 3 from retriever.json
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    scores = [float(r.split()[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(any(r.endswith(s) for s in characters["alice"].settings) for r in rows)
    assert len(_replies(out)) == 1
    assert "concat, 3 settings" in out


def test_threshold_can_leave_no_setting(strict_export_dir, capsys):
    cli_main(
        [
            "chat",
            "--retriever",
            strict_export_dir,
            "--character",
            "bob",
            "--query",
            "Hi!",
            "--show_prompt",
            *QUICK,
        ]
    )
    out = capsys.readouterr().out
    assert "threshold 5.000" in out and "the reply uses no setting" in out
    (prompt,) = _prompts(out)
    assert prompt == "User: Hi!\nCharacter:"  # no trait line at all
    assert "concat, 0 settings" in out and len(_replies(out)) == 1

    cli_main(
        ["chat", "--retriever", strict_export_dir, "--character", "bob", "--query", "Hi!", "--show_prompt",
         "--no_threshold", *QUICK]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "uses no setting" not in out and _prompts(out)[0].count("Character trait: ") == 3

    retriever = Retriever.load(strict_export_dir)
    assert retriever.search("bob", "Hi!") == []
    for mode in decoding.MODES:
        assert decoding.build_prompts(retriever.template, [], [], "Hi!", mode) == ["User: Hi!\nCharacter:"]


def test_interactive_keeps_history(export_dir, monkeypatch, capsys):
    seen_history = []
    search = Retriever.search

    def spy(self, character_id, query, k=None, **kw):
        seen_history.append(list(kw.get("history", ())))
        return search(self, character_id, query, k, **kw)

    monkeypatch.setattr(Retriever, "search", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n\nDo you have pets?\n/quit\nnever read\n"))
    cli_main(["chat", "--retriever", export_dir, "--character", "alice", "--show_prompt", *QUICK])
    out = capsys.readouterr().out
    replies = _replies(out)
    assert len(replies) == 2 and "never read" not in out
    first, second = _prompts(out)
    assert "Character: " not in first.split("\n", 3)[-1].removesuffix("Character:")  # no history yet
    assert f"User: Hello!\nCharacter: {replies[0]}\nUser: Do you have pets?\nCharacter:" in second
    assert seen_history[0] == []  # the dialogue-aware rule sees the session so far
    assert seen_history[1] == [Turn("user", "Hello!"), Turn("character", replies[0])]


def test_compare_base_prints_both_blocks(export_dir, capsys):
    cli_main(
        ["chat", "--retriever", export_dir, "--character", "chen", "--query", "Do you play music?",
         "--compare", "base", "--mode", "top1", *QUICK]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "settings [trained retriever; top 3" in out
    assert "settings [base tiny:bert; top 3, cosine only, no threshold]" in out
    assert len(_replies(out)) == 1 and len(_replies(out, "base tiny:bert")) == 1
    assert out.count("  rank   score") == 2 and "top1, 1 setting" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--character", "zed", "--query", "Hi"], "unknown character 'zed'"),
        (["--character", "alice", "--query", "   "], "--query is empty"),
        (["--character", "alice", "--query", "Hi", "--k", "0"], "--k must be positive"),
    ],
)
def test_user_errors_are_one_line(export_dir, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        cli_main(["chat", "--retriever", export_dir, *args])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("replugchar: error: ") and needle in err[0]


# ----------------------------------------------------------------------------------------------- decoding
def test_ensemble_with_one_hit_equals_top1_decoding(ascii_lm):
    model, tok = ascii_lm
    hits = [_hit("I am a cheerful baker.", 0.9)]
    history = [Turn("user", "Hi."), Turn("character", "Hello there!")]
    top1 = decoding.generate_tokens(
        model, tok, TEMPLATE, hits, history, "Do you bake?", "top1", max_new_tokens=24
    )
    ens = decoding.generate_tokens(
        model, tok, TEMPLATE, hits, history, "Do you bake?", "ensemble", max_new_tokens=24
    )
    assert len(set(top1)) > 3  # a real sequence, not one repeated token
    assert ens == top1
    # same for seeded sampling, and the same seed gives the same reply
    sampled = [
        decoding.generate_tokens(
            model, tok, TEMPLATE, hits, history, "Do you bake?", mode, max_new_tokens=24,
            generator=torch.Generator().manual_seed(7),
        )
        for mode in ("top1", "ensemble", "top1")
    ]  # fmt: skip
    assert sampled[0] == sampled[1] == sampled[2] != top1
    # concat with one hit is top-1
    assert decoding.generate_reply(
        model, tok, TEMPLATE, hits, history, "Do you bake?", "concat", max_new_tokens=24
    ) == (tok.decode(top1).strip())


def test_ensemble_continues_token_ids_even_inside_a_utf8_character(tiny_lm):
    """The ensemble appends the reply's token ids to each prompt: a byte token that is only part of a UTF-8
    character (which decode -> encode would turn into U+FFFD) continues exactly as top-1 decoding does."""
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    hits = [_hit("I live in Zürich.", 0.9)]

    def sample(mode: str) -> list[int]:  # near-uniform over the byte tokens: most replies split a character
        gen = torch.Generator().manual_seed(3)
        return decoding.generate_tokens(
            model, tok, TEMPLATE, hits, [], "Où vis-tu?", mode, max_new_tokens=12, generator=gen, top_p=1.0
        )

    top1, ens = sample("top1"), sample("ensemble")
    assert "\ufffd" in tok.decode(top1)  # some byte token is only part of a UTF-8 character
    assert ens == top1


def _hand_mixture(model, tok, prompts: list[str], scores: list[float], temperature: float) -> torch.Tensor:
    """log Σ_i softmax(scores/T)_i · P(next | prompt_i), from one unpadded forward pass per prompt."""
    logps = []
    for prompt in prompts:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(prompt).input_ids])).logits[0, -1].double()
        logps.append(torch.log_softmax(logits, -1))
    w = np.exp(np.array(scores) / temperature)
    w /= w.sum()
    return torch.log(sum(float(wi) * lp.exp() for wi, lp in zip(w, logps)))


@pytest.mark.parametrize("prefix", ["", "Yes, I"])
def test_ensemble_first_token_is_the_hand_computed_mixture(ascii_lm, prefix):
    model, tok = ascii_lm
    hits = [_hit("I have two cats named Miso and Tofu.", 0.8, 0), _hit("I grew up by the sea.", 0.6, 1)]
    history = [Turn("user", "Nice weather.")]
    query, temperature = "Do you have pets?", 0.25
    reply_ids = (
        tok(TEMPLATE.response.format(text=prefix), add_special_tokens=False).input_ids if prefix else []
    )
    got = replug_next_token_logprobs(
        model, tok, TEMPLATE, hits, history, query, reply_ids, temperature=temperature
    )
    tail = TEMPLATE.response.format(text=prefix) if prefix else ""
    prompts = [TEMPLATE.render((h.setting,), history, query) + tail for h in hits]
    assert len(tok(prompts[0]).input_ids) != len(tok(prompts[1]).input_ids)  # the batch is left-padded
    want = _hand_mixture(model, tok, prompts, [h.score for h in hits], temperature)
    assert got.shape == (len(tok),)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isclose(got.exp().sum(), torch.tensor(1.0), atol=1e-4)
    one = [_hand_mixture(model, tok, [p], [0.0], 1.0) for p in prompts]
    assert not torch.allclose(one[0], one[1], atol=1e-3)  # the two settings really predict differently

    if not prefix:  # the ensemble's first decoded token is the mixture's argmax
        first = decoding.generate_tokens(
            model, tok, TEMPLATE, hits, history, query, "ensemble", max_new_tokens=1,
            ensemble_temperature=temperature,
        )  # fmt: skip
        assert first == [int(want.argmax())] or (first == [] and int(want.argmax()) == tok.eos_token_id)


def test_reply_stops_at_a_new_turn_and_drops_special_tokens(tiny_lm):
    assert decoding.reply_text(" Sure, I bake.\nUser: and you?", TEMPLATE) == ("Sure, I bake.", True)
    assert decoding.reply_text(" Sure.\nCharacter: more", TEMPLATE) == ("Sure.", True)
    assert decoding.reply_text(" Sure.\nCharacter trait: I bake.", TEMPLATE) == ("Sure.", True)
    assert decoding.reply_text(" Sure.\nUs", TEMPLATE) == ("Sure.", False)  # a turn head in the making
    assert decoding.reply_text(" Two lines\nof reply", TEMPLATE) == ("Two lines\nof reply", False)
    assert decoding.reply_text(" Hi\n", TEMPLATE) == ("Hi", False)

    model, tok = tiny_lm
    eos, script = tok.eos_token_id, tok(" Sure!\nUser: more words", add_special_tokens=False).input_ids

    class Scripted(torch.nn.Module):
        """An LM that emits a fixed token script (then eos), whatever the prompt: call j -> script[j]."""

        def __init__(self, script):
            super().__init__()
            self.config, self.script, self.calls = model.config, script, 0
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kw):
            nxt = self.script[self.calls] if self.calls < len(self.script) else eos
            self.calls += 1
            logits = torch.full((1, input_ids.shape[1], len(tok)), -10.0)
            logits[0, -1, nxt] = 10.0
            return SimpleNamespace(logits=logits, past_key_values=object())

    stops_at_turn = decoding.generate_tokens(
        Scripted(script), tok, TEMPLATE, [], [], "Hi", "concat", max_new_tokens=40
    )
    assert tok.decode(stops_at_turn).startswith(" Sure!\nUser:") and len(stops_at_turn) < len(script)
    special = [tok.bos_token_id, *tok(" ok", add_special_tokens=False).input_ids]
    assert (
        decoding.generate_reply(Scripted(special), tok, TEMPLATE, [], [], "Hi", "top1", max_new_tokens=40)
        == "ok"
    )
