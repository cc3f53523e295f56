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
import inspect
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..core.data import Example, Turn, query_text
from ..lm.scoring import PromptTemplate
from ..retrieval.retriever import Hit, Retriever, replug_next_token_logprobs

MODES = ("concat", "top1", "ensemble")
QUIT = "/quit"
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_ENSEMBLE_TEMPERATURE = 0.05  # as `replugchar evaluate` (ensemble_temperature)


# ----------------------------------------------------------------------------------------------- prompts
def setting_groups(hits: Sequence[Hit], mode: str) -> list[tuple[str, ...]]:
    """The settings of each prompt: one prompt with all hits (``concat``) or the best one (``top1``), or one
    prompt per hit (``ensemble``). No hit -> one prompt without settings."""
    if mode == "concat":
        return [tuple(h.setting for h in hits)]
    if mode == "top1":
        return [tuple(h.setting for h in hits[:1])]
    if mode == "ensemble":
        return [(h.setting,) for h in hits] or [()]
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def build_prompts(
    template: PromptTemplate, hits: Sequence[Hit], history: Sequence[Turn], query: str, mode: str
) -> list[str]:
    """The rendered LM prompt(s) of a turn (see :func:`setting_groups`)."""
    return [template.render(group, history, query) for group in setting_groups(hits, mode)]


def fit_history(
    tok,
    template: PromptTemplate,
    hits: Sequence[Hit],
    history: Sequence[Turn],
    query: str,
    mode: str,
    budget: int,
) -> list[Turn]:
    """The most recent turns of ``history`` whose longest prompt has at most ``budget`` tokens (oldest turns go
    first, as in :class:`~replugchar.lm.scoring.LMScorer`)."""
    history = list(history)
    while True:
        longest = max(len(tok(p).input_ids) for p in build_prompts(template, hits, history, query, mode))
        if longest <= budget:
            return history
        if not history:
            raise ValueError(
                f"the prompt ({longest} tokens) does not fit the LM's {budget}-token budget for the prompt even "
                "without dialogue context: shorten the query or lower --k / --max_new_tokens"
            )
        history.pop(0)


def _turn_heads(template: PromptTemplate) -> tuple[str, ...]:
    """How a new turn line starts ("User:", "Character:"): a reply stops at a newline followed by one."""
    heads = (template.user_line.split("{text}")[0], template.character_line.split("{text}")[0])
    return tuple(h.strip() for h in heads if h.strip())


def reply_text(text: str, template: PromptTemplate) -> tuple[str, bool]:
    """(the reply in generated ``text``, whether a new turn started): ``text`` cut at the first newline that
    starts a new turn (also a partial turn head at the very end), stripped."""
    heads = _turn_heads(template)
    start = 0
    while (i := text.find("\n", start)) >= 0:
        rest = text[i + 1 :].lstrip(" \n")
        if any(rest.startswith(h) for h in heads):
            return text[:i].strip(), True
        if not text[i + 1 :].strip() or any(h.startswith(rest) for h in heads if rest):
            # only whitespace / a partial head after the newline so far: not part of the reply (yet)
            return text[:i].strip(), False
        start = i + 1
    return text.strip(), False


# ----------------------------------------------------------------------------------------------- decoding
def _eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


def pick_token(logprobs: torch.Tensor, generator: torch.Generator | None, top_p: float = 0.9) -> int:
    """Greedy (no generator) or top-p sampling from (vocab,) log-probabilities with a seeded ``generator``."""
    if generator is None:
        return int(logprobs.argmax())
    probs = logprobs.double().exp().cpu()
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the smallest set with mass >= top_p
    sorted_p = sorted_p * keep
    j = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[j])


class _Incremental:
    """Next-token log-probabilities of one prompt + the tokens generated so far, with the KV cache."""

    def __init__(self, model, tok, prompt: str) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.ids = tok(prompt, return_tensors="pt").input_ids.to(self.device)
        self.past = None
        # transformers renamed past_key_values to cache (5.x); take whichever this model's forward has
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def __call__(self, last_token: int | None) -> torch.Tensor:
        inputs = self.ids if self.past is None else torch.tensor([[last_token]], device=self.device)
        out = self.model(input_ids=inputs, use_cache=True, **{self.cache_arg: self.past})
        self.past = getattr(out, self.cache_arg, None)
        if self.past is None:
            raise RuntimeError(f"{type(self.model).__name__} returned no KV cache")
        return torch.log_softmax(out.logits[0, -1].float(), -1)


@torch.inference_mode()
def generate_tokens(
    model,
    tok,
    template: PromptTemplate,
    hits: Sequence[Hit],
    history: Sequence[Turn],
    query: str,
    mode: str = "concat",
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    generator: torch.Generator | None = None,
    top_p: float = 0.9,
    ensemble_temperature: float = DEFAULT_ENSEMBLE_TEMPERATURE,
    max_length: int = 512,
) -> list[int]:
    """Token ids of the character's reply to ``query`` after ``history`` (eos excluded).

    ``top1`` / ``concat`` decode one prompt with the KV cache; ``ensemble`` calls
    :func:`replug_next_token_logprobs` at every step with the reply so far as ``response_prefix``. The reply is
    whatever follows the rendered prompt (usually " text"), so the prefix is passed through the template with
    ``response="{text}"``: the decoded reply so far, verbatim.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    max_length = min(max_length, limit) if limit else max_length
    history = fit_history(tok, template, hits, history, query, mode, max_length - max_new_tokens)
    eos = _eos_ids(model, tok)
    ids: list[int] = []

    step: Callable[[int | None], torch.Tensor]
    if mode == "ensemble":
        verbatim = dataclasses.replace(template, response="{text}")

        def step(_last: int | None) -> torch.Tensor:
            prefix = tok.decode(ids, skip_special_tokens=True)
            return replug_next_token_logprobs(
                model, tok, verbatim, hits, history, query, prefix, temperature=ensemble_temperature
            )

    else:
        (prompt,) = build_prompts(template, hits, history, query, mode)
        step = _Incremental(model, tok, prompt)

    last = None
    for _ in range(max_new_tokens):
        last = pick_token(step(last), generator, top_p)
        if last in eos:
            break
        ids.append(last)
        if reply_text(tok.decode(ids, skip_special_tokens=True), template)[1]:
            break
    return ids


def generate_reply(
    model,
    tok,
    template: PromptTemplate,
    hits: Sequence[Hit],
    history: Sequence[Turn],
    query: str,
    mode: str = "concat",
    **options,
) -> str:
    """The character's reply (text, without special tokens, cut at a new turn): see :func:`generate_tokens`."""
    ids = generate_tokens(model, tok, template, hits, history, query, mode, **options)
    return reply_text(tok.decode(ids, skip_special_tokens=True), template)[0]


def ensemble_weights(hits: Sequence[Hit], temperature: float) -> np.ndarray:
    """softmax(score / T) over the hits: the REPLUG ensemble's weights."""
    if not hits:
        return np.ones(1)
    s = np.array([h.score for h in hits]) / temperature
    w = np.exp(s - s.max())
    return w / w.sum()


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
