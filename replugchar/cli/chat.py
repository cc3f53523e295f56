"""``replugchar chat``: talk to an indexed character with the trained retriever in the loop.

For each user turn: the character's settings are ranked by :meth:`Retriever.search` with the dialogue so far
(the dialogue-aware rule of :mod:`replugchar.core.scoring` sees it), the relevance threshold is applied, the table is
printed (rank, score, similarity, dialogue part, prior), and the LM answers from a prompt rendered by the
retriever's own :class:`~replugchar.lm.scoring.PromptTemplate` (the one it was trained with). Modes:

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

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import numpy as np
import torch

from ..core.data import Example, Turn, query_text
from ..lm.decoding import (
    DEFAULT_ENSEMBLE_TEMPERATURE,
    DEFAULT_MAX_NEW_TOKENS,
    MODES,
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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    top_p: float = 0.9
    ensemble_temperature: float = DEFAULT_ENSEMBLE_TEMPERATURE
    max_length: int = 512
    show_prompt: bool = False
    history: list[Turn] = dataclasses.field(default_factory=list)
    turns: int = 0

    def _reply(self, label: str, hits: list[Hit], query: str) -> str:
        template = self.retriever.template
        if self.show_prompt:
            for prompt in build_prompts(template, hits, self.history, query, self.mode):
                print(f"--- prompt ({label}) ---\n{prompt}\n---")
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed + self.turns)
        reply = generate_reply(
            self.model,
            self.tok,
            template,
            hits,
            self.history,
            query,
            self.mode,
            max_new_tokens=self.max_new_tokens,
            generator=generator,
            top_p=self.top_p,
            ensemble_temperature=self.ensemble_temperature,
            max_length=self.max_length,
        )
        used = len(setting_groups(hits, self.mode)[0]) if self.mode != "ensemble" else len(hits)
        how = f"{self.mode}, {used} setting{'s' if used != 1 else ''}"
        if self.mode == "ensemble" and hits:
            w = ensemble_weights(hits, self.ensemble_temperature)
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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replugchar chat",
        description="talk to a character: retrieved settings (score, similarity, dialogue, prior) and the LM's "
        "reply; interactive (stdin until EOF or /quit) unless --query",
    )
    p.add_argument("--retriever", required=True, help="export folder (retriever.json, encoder/, index)")
    p.add_argument("--lm", help="causal LM spec (default: the LM the retriever was trained with)")
    p.add_argument("--character", required=True, help="character id (one in the retriever's index)")
    p.add_argument("--query", help="one-shot: answer this and exit")
    p.add_argument(
        "--k", type=int, default=None, help="settings retrieved per turn (default: retriever.json)"
    )
    p.add_argument("--mode", choices=MODES, default="concat", help="how the settings reach the LM")
    p.add_argument("--compare", choices=("base",), help="also rank and answer with the untrained encoder")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--no_threshold", action="store_true", help="keep the top k even under the threshold")
    p.add_argument("--seed", type=int, default=None, help="sample (top-p) with this seed instead of greedy")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus mass when sampling (--seed)")
    p.add_argument(
        "--ensemble_temperature",
        type=float,
        default=DEFAULT_ENSEMBLE_TEMPERATURE,
        help="T of the ensemble weights softmax(score/T)",
    )
    p.add_argument("--show_prompt", action="store_true", help="print the rendered LM prompt(s)")
    p.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="let the LM's repository run its own code (never read from the export folder)",
    )
    p.add_argument("--device", default=None, help="LM device (default: cuda when available, else cpu)")
    return p


def main(argv: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from ..lm.models import load_causal_lm, load_encoder

    args = build_parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the dialogue
    if args.query is not None and not args.query.strip():
        raise ValueError("--query is empty")
    for name in ("k", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0 < args.ensemble_temperature < float("inf"):
        raise ValueError(f"--ensemble_temperature must be positive, got {args.ensemble_temperature}")

    retriever = Retriever.load(args.retriever)
    ranges = retriever.index.ranges
    if args.character not in ranges:
        known = sorted(ranges)
        shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        raise KeyError(
            f"unknown character '{args.character}': not in {args.retriever} ({len(known)} characters: {shown})"
        )
    config = retriever.config
    stored = config.get("scorer", {})
    lm = args.lm or stored.get("lm") or config.get("lm")
    if not lm:
        raise ValueError(f"{args.retriever}/retriever.json names no LM: pass --lm")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = stored.get("lm_dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tok = load_causal_lm(
        lm,
        dtype=dtype,
        revision=stored.get("lm_revision") if lm == stored.get("lm") else None,
        trust_remote_code=args.trust_remote_code,
        device=device,
    )
    base, base_name = None, "base"
    if args.compare == "base":
        spec = config.get("encoder_base")
        if not spec:
            raise ValueError(f"{args.retriever}/retriever.json has no 'encoder_base': cannot --compare base")
        base = Retriever(load_encoder(spec), None, {"query_text": retriever.query_mode})
        base_name = f"base {spec}"
    k = args.k or int(config.get("k", 5))
    session = ChatSession(
        retriever,
        model,
        tok,
        args.character,
        k,
        args.mode,
        threshold=float("-inf") if args.no_threshold else None,
        base=base,
        base_name=base_name,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        top_p=args.top_p,
        ensemble_temperature=args.ensemble_temperature,
        max_length=int(stored.get("max_length", 512)),
        show_prompt=args.show_prompt,
    )
    lo, hi = ranges[args.character]
    source = "" if args.lm else " (retriever.json's; --lm to change)"
    print(f"chat with '{args.character}' ({hi - lo} settings) | LM {lm}{source} | mode {args.mode} | k {k}")
    if args.query is not None:
        print(f"User: {args.query.strip()}")
        session.turn(args.query)
        return
    print(f"(one line per turn; {QUIT} or end of input to stop)")
    for line, typed in _lines(sys.stdin):
        if line.strip() == QUIT:
            break
        if line.strip():
            if not typed:  # echo piped input so that the output reads as a transcript
                print(f"User: {line.strip()}")
            session.turn(line)
