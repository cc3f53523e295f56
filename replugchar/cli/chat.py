"""``replugchar chat``: talk to an indexed character with the trained retriever in the loop.

For each user turn: the character's settings are ranked by :meth:`Retriever.search` with the dialogue so far
(the dialogue-aware rule of :mod:`replugchar.core.scoring` sees it), the relevance threshold is applied, the table is
printed (rank, score, similarity, dialogue part, prior), and the LM answers from a prompt rendered by the
retriever's own :class:`~replugchar.lm.likelihood.PromptTemplate` (the one it was trained with). Modes:

* ``concat`` -- the top-k settings as trait lines of one prompt;
* ``top1`` -- the best setting only;
* ``ensemble`` -- REPLUG ensemble decoding: at every step the next-token distribution is
  Σ_i softmax(score/T)_i · P_LM(token | setting_i, dialogue, reply so far)
  (:func:`~replugchar.retrieval.retriever.replug_next_token_logprobs`).

Decoding is greedy, or top-p sampling with ``--seed``; it stops at eos, at a newline that starts a new turn
("User:" / "Character:" of the template) or after ``--max_new_tokens``. ``--compare base`` ranks the same
settings with the untrained encoder (cosine only) and answers with them too, beside the trained retriever.

Interactive (lines on stdin until EOF or ``/quit``) or one-shot (``--query``)::

    replugchar chat --retriever runs/demo/retriever --character <id> [--query "Hello!"] [--mode ensemble]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ..core.data import Example, Turn, query_text
from ..lm.decoding import (
    DEFAULT_ENSEMBLE_TEMPERATURE,
    DEFAULT_MAX_NEW_TOKENS,
    build_prompts,
    ensemble_weights,
    generate_reply,
    setting_groups,
)
from ..retrieval.retriever import Hit, Retriever

QUIT = "/quit"


# ----------------------------------------------------------------------------------------------- retrieval
def retrieval_query(query: str, history: Sequence[Turn], mode: str) -> str:
    """The text the encoder embeds for ``query`` (the retriever's training rule, :func:`data.query_text`)."""
    return query_text(Example("chat", "", "chat", query, "", context=tuple(history)), mode)


def base_hits(
    base: Retriever, retriever: Retriever, character_id: str, query: str, history: Sequence[Turn], k: int
) -> list[Hit]:
    """Top-k of the character's settings by the untrained encoder (cosine only, no threshold)."""
    lo, hi = retriever.index.ranges[character_id]
    records = retriever.index.records[lo:hi]
    scores = base.rank([r.text for r in records], query, history)
    hits = []
    for j in np.argsort(-scores, kind="stable")[:k]:
        r = records[j]
        s = float(scores[j])
        hits.append(
            Hit(r.text, r.setting_id, r.index_in_character, s, float(retriever.index.priors[lo + j]), s)
        )
    return hits


def _num(x: float) -> str:
    return f"{round(x, 3) + 0.0:7.3f}"  # + 0.0: no "-0.000"


def format_hits(hits: Sequence[Hit]) -> list[str]:
    lines = [f"  {'rank':>4} {'score':>7} {'sim':>7} {'dialog':>7} {'prior':>7}  setting"]
    for rank, h in enumerate(hits, 1):
        lines.append(
            f"  {rank:>4} {_num(h.score)} {_num(h.similarity)} {_num(h.dialogue)} {_num(h.prior)}  {h.setting}"
        )
    if not hits:
        lines.append("  (no setting above the relevance threshold: the reply uses no setting)")
    return lines


# ----------------------------------------------------------------------------------------------- session
@dataclasses.dataclass(frozen=True)
class Decoding:
    """How the replies are decoded: greedy, or top-p sampling when ``seed`` is set (a seed per turn)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    top_p: float = 0.9
    ensemble_temperature: float = DEFAULT_ENSEMBLE_TEMPERATURE
    max_length: int = 512

    def options(self, turn: int) -> dict:
        """The keyword options of :func:`~replugchar.lm.decoding.generate_tokens` for the ``turn``-th reply."""
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed + turn)
        options = dataclasses.asdict(self)
        del options["seed"]
        return {**options, "generator": generator}


@dataclasses.dataclass
class ChatSession:
    """One dialogue with ``character_id``: the history (user turns and the trained retriever's replies)."""

    retriever: Retriever
    model: object
    tok: object
    character_id: str
    k: int
    mode: str = "concat"
    threshold: float | None = None  # None = retriever.json's; -inf = none
    base: Retriever | None = None
    base_name: str = "base"
    decoding: Decoding = dataclasses.field(default_factory=Decoding)
    show_prompt: bool = False
    history: list[Turn] = dataclasses.field(default_factory=list)
    turns: int = 0

    def _reply(self, label: str, hits: list[Hit], query: str) -> str:
        template = self.retriever.template
        if self.show_prompt:
            for prompt in build_prompts(template, hits, self.history, query, self.mode):
                print(f"--- prompt ({label}) ---\n{prompt}\n---")
        options = self.decoding.options(self.turns)
        reply = generate_reply(
            self.model, self.tok, template, hits, self.history, query, self.mode, **options
        )
        used = len(setting_groups(hits, self.mode)[0]) if self.mode != "ensemble" else len(hits)
        how = f"{self.mode}, {used} setting{'s' if used != 1 else ''}"
        if self.mode == "ensemble" and hits:
            w = ensemble_weights(hits, self.decoding.ensemble_temperature)
            how += ", weights " + "/".join(f"{x:.2f}" for x in w)
        print(f"Character [{label}; {how}]: {reply}")
        return reply

    def turn(self, query: str) -> str:
        """Retrieve, print, reply; the trained retriever's reply joins the history. Returns it."""
        if not query.strip():
            raise ValueError("the query is empty")
        query = query.strip()
        rq = retrieval_query(query, self.history, self.retriever.query_mode)
        hits = self.retriever.search(
            self.character_id, rq, self.k, history=self.history, threshold=self.threshold
        )
        tau = self.retriever.rule.threshold if self.threshold is None else self.threshold
        tau_text = "none" if tau is None or tau == float("-inf") else f"{tau:.3f}"
        print(f"settings [trained retriever; top {self.k}, threshold {tau_text}]:")
        print("\n".join(format_hits(hits)))
        reply = self._reply("trained", hits, query)
        if self.base is not None:
            other = base_hits(self.base, self.retriever, self.character_id, rq, self.history, self.k)
            print(f"settings [{self.base_name}; top {self.k}, cosine only, no threshold]:")
            print("\n".join(format_hits(other)))
            self._reply(self.base_name, other, query)
        self.history += [Turn("user", query), Turn("character", reply)]
        self.turns += 1
        return reply


def _lines(stream):
    """User lines: from a terminal with a "User: " prompt, else as read (``main`` echoes them)."""
    tty = stream.isatty()
    while True:
        if tty:
            try:
                yield input("User: "), True
            except EOFError:
                print()
                return
        else:
            line = stream.readline()
            if not line:
                return
            yield line.rstrip("\n"), False


# ----------------------------------------------------------------------------------------------- CLI
def chat(
    retriever: str,
    character: str,
    lm: str | None = None,
    query: str | None = None,
    k: int | None = None,
    mode: Literal["concat", "top1", "ensemble"] = "concat",
    compare: Literal["base"] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    no_threshold: bool = False,
    seed: int | None = None,
    top_p: float = 0.9,
    ensemble_temperature: float = DEFAULT_ENSEMBLE_TEMPERATURE,
    show_prompt: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> None:
    """Talk to a character: each turn prints the retrieved settings (score, similarity, dialogue part, prior) and
    the LM's reply; interactive (stdin until EOF or /quit) unless --query.

    Args:
        retriever: export folder (retriever.json, encoder/, index).
        character: character id (one in the retriever's index).
        lm: causal LM spec (default: the LM the retriever was trained with).
        query: one-shot: answer this and exit.
        k: settings retrieved per turn (default: retriever.json).
        mode: how the settings reach the LM: concat (top k in one prompt), top1, ensemble (REPLUG decoding).
        compare: base = also rank and answer with the untrained encoder.
        max_new_tokens: reply length limit.
        no_threshold: keep the top k even under the relevance threshold.
        seed: sample (top-p) with this seed instead of greedy.
        top_p: nucleus mass when sampling (--seed).
        ensemble_temperature: T of the ensemble weights softmax(score/T).
        show_prompt: print the rendered LM prompt(s).
        trust_remote_code: let the LM's repository run its own code (never read from the export folder).
        device: LM device (default: cuda when available, else cpu).
    """
    from transformers.utils import logging as hf_logging

    _check_options(query, k, max_new_tokens, top_p, ensemble_temperature)
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the dialogue
    loaded = Retriever.load(retriever)
    _check_character(loaded, retriever, character)
    model, tok, lm_spec = _load_lm(loaded, retriever, lm, device, trust_remote_code)
    base, base_name = _base_retriever(loaded, retriever) if compare == "base" else (None, "base")
    max_length = int(loaded.config.get("scorer", {}).get("max_length", 512))
    decoding = Decoding(max_new_tokens, seed, top_p, ensemble_temperature, max_length)
    threshold = float("-inf") if no_threshold else None
    k = k or int(loaded.config.get("k", 5))
    session = ChatSession(
        loaded, model, tok, character, k, mode, threshold, base, base_name, decoding, show_prompt
    )
    lo, hi = loaded.index.ranges[character]
    source = "" if lm else " (retriever.json's; --lm to change)"
    print(
        f"chat with '{character}' ({hi - lo} settings) | LM {lm_spec}{source} | mode {mode} | k {session.k}"
    )
    if query is not None:
        print(f"User: {query.strip()}")
        session.turn(query)
    else:
        _converse(session)


def _check_options(
    query: str | None, k: int | None, max_new_tokens: int, top_p: float, ensemble_temperature: float
) -> None:
    """Option values no parser type says: before any model loads."""
    if query is not None and not query.strip():
        raise ValueError("--query is empty")
    for name, value in (("k", k), ("max_new_tokens", max_new_tokens)):
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if not 0 < ensemble_temperature < float("inf"):
        raise ValueError(f"--ensemble_temperature must be positive, got {ensemble_temperature}")


def _check_character(retriever: Retriever, folder: str, character: str) -> None:
    ranges = retriever.index.ranges
    if character not in ranges:
        known = sorted(ranges)
        shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        raise KeyError(f"unknown character '{character}': not in {folder} ({len(known)} characters: {shown})")


def _load_lm(retriever: Retriever, folder: str, lm: str | None, device: str | None, trust_remote_code: bool):
    """(model, tokenizer, spec): ``lm``, else the LM of retriever.json (its revision and dtype too)."""
    from ..lm.models import load_causal_lm

    config = retriever.config
    stored = config.get("scorer", {})
    spec = lm or stored.get("lm") or config.get("lm")
    if not spec:
        raise ValueError(f"{folder}/retriever.json names no LM: pass --lm")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = stored.get("lm_dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tok = load_causal_lm(
        spec,
        dtype=dtype,
        revision=stored.get("lm_revision") if spec == stored.get("lm") else None,
        trust_remote_code=trust_remote_code,
        device=device,
    )
    return model, tok, spec


def _base_retriever(retriever: Retriever, folder: str) -> tuple[Retriever, str]:
    """The untrained encoder of retriever.json ("encoder_base") for ``--compare base``."""
    from ..lm.models import load_encoder

    spec = retriever.config.get("encoder_base")
    if not spec:
        raise ValueError(f"{folder}/retriever.json has no 'encoder_base': cannot --compare base")
    return Retriever(load_encoder(spec), None, {"query_text": retriever.query_mode}), f"base {spec}"


def _converse(session: ChatSession) -> None:
    """Turns from stdin until EOF or /quit; piped lines are echoed so that the output reads as a transcript."""
    print(f"(one line per turn; {QUIT} or end of input to stop)")
    for line, typed in _lines(sys.stdin):
        if line.strip() == QUIT:
            break
        if line.strip():
            if not typed:
                print(f"User: {line.strip()}")
            session.turn(line)
