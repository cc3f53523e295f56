"""Decoding the character's reply with retrieved settings: one prompt (``concat`` / ``top1``, KV-cached) or the
REPLUG ensemble over one prompt per setting. The one implementation behind ``replugchar chat``; it works on token
ids, so the ensemble continues each prompt exactly as cached decoding does."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from ..core.data import Turn
from .likelihood import PromptTemplate

MODES = ("concat", "top1", "ensemble")
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_ENSEMBLE_TEMPERATURE = 0.05  # as `replugchar evaluate` (ensemble_temperature)


class Scored(Protocol):
    """A retrieved setting and its score (:class:`~replugchar.retrieval.retriever.Hit` is one)."""

    setting: str
    score: float


# ----------------------------------------------------------------------------------------------- prompts
def setting_groups(hits: Sequence[Scored], mode: str) -> list[tuple[str, ...]]:
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
    template: PromptTemplate, hits: Sequence[Scored], history: Sequence[Turn], query: str, mode: str
) -> list[str]:
    """The rendered LM prompt(s) of a turn (see :func:`setting_groups`)."""
    return [template.render(group, history, query) for group in setting_groups(hits, mode)]


def fit_history(
    tok,
    template: PromptTemplate,
    hits: Sequence[Scored],
    history: Sequence[Turn],
    query: str,
    mode: str,
    budget: int,
) -> list[Turn]:
    """The most recent turns of ``history`` whose longest prompt has at most ``budget`` tokens (oldest turns go
    first, as in :class:`~replugchar.lm.likelihood.LMLikelihood`)."""
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
    """How a new prompt line starts ("User:", "Character:", "Character trait:"): a reply stops at a newline
    followed by one."""
    heads = (
        template.user_line.split("{text}")[0],
        template.character_line.split("{text}")[0],
        template.setting_line.split("{setting}")[0],  # a small LM may go on writing trait lines
    )
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
    hits: Sequence[Scored],
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
    :func:`replug_next_token_logprobs` at every step with the reply's token ids so far, appended to each
    prompt's ids exactly as the cached decoding appends them.
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

        def step(_last: int | None) -> torch.Tensor:
            return replug_next_token_logprobs(
                model, tok, template, hits, history, query, ids, temperature=ensemble_temperature
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


def generate_reply(model, tok, template: PromptTemplate, *prompt, **options) -> str:
    """The character's reply (text, without special tokens, cut at a new turn): the arguments and options of
    :func:`generate_tokens` (``hits, history, query, mode``), decoded."""
    ids = generate_tokens(model, tok, template, *prompt, **options)
    return reply_text(tok.decode(ids, skip_special_tokens=True), template)[0]


def ensemble_weights(hits: Sequence[Scored], temperature: float) -> np.ndarray:
    """softmax(score / T) over the hits: the REPLUG ensemble's weights."""
    if not hits:
        return np.ones(1)
    s = np.array([h.score for h in hits]) / temperature
    w = np.exp(s - s.max())
    return w / w.sum()


@torch.inference_mode()
def replug_next_token_logprobs(
    model,
    tokenizer,
    template: PromptTemplate,
    hits: Sequence[Scored],
    context: Sequence,
    query: str,
    response_ids: Sequence[int] = (),
    temperature: float = 1.0,
) -> torch.Tensor:
    """REPLUG ensemble: log Σ_i softmax(score/temperature)_i · P_LM(next token | setting_i, dialogue, reply so far).

    The reply so far is passed as token ids and appended to each tokenised prompt, exactly as the KV-cached
    decoding of one prompt continues it: text would be re-tokenised, and a byte token that is only part of a
    UTF-8 character (Japanese) would not survive decode -> encode. One forward pass per retrieved setting
    (batched, left-padded); returns (vocab,) log-probabilities. With no hits it is the LM's own next-token
    distribution without settings.
    """
    groups = [(h.setting,) for h in hits] or [()]
    weights = torch.softmax(torch.tensor([h.score for h in hits] or [0.0]) / temperature, 0)
    rows = [tokenizer(template.render(g, context, query)).input_ids + list(response_ids) for g in groups]
    width = max(map(len, rows))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (k, width)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1).logits
    logp = torch.log_softmax(logits[:, -1].float(), -1)  # (k, vocab)
    return torch.logsumexp(logp + weights.log().to(logp.device)[:, None], dim=0)
