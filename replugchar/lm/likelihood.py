"""The frozen LM as a judge: log P(gold response | setting(s), dialogue), and the tokenizer fixes it needs.

One function (:meth:`LMLikelihood.loglik`) serves training, priors and evaluation;
:class:`~replugchar.lm.loglik_cache.CachedLikelihood` sits in front of it so no pair is ever computed twice.
"Score" in this package is the retrieval rule's (:mod:`replugchar.core.scoring`); what the LM gives is a
log-likelihood, ``loglik`` in names.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from ..core.data import Example

NO_SETTING: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------- tokenizer
def fix_tokenizer(tokenizer, model=None):
    """Make ``tokenizer`` safe for log-likelihoods (and for fine-tuning the character LM).

    Why: when ``pad_token == eos_token`` (SmolLM2, Llama-2 fine-tunes such as japanese-stablelm-instruct-beta-7b),
    any mask built from ``input_ids != pad_token_id`` also hides the eos that ends the response, so the LM is
    never scored (or trained) on stopping. Fix, as for the Llama-2 family: pad := unk when an unk token exists
    and differs from eos, otherwise add a dedicated ``<|pad|>`` token with ``normalized=False`` (so the
    normaliser cannot split or rewrite it) and resize ``model``'s embeddings. Padding goes on the left so that
    every response ends at the last position (see :meth:`LMLikelihood.loglik`). Returns the same tokenizer.
    """
    from transformers import AddedToken

    if tokenizer.eos_token_id is None:
        raise ValueError("the LM's tokenizer has no eos token: cannot judge the end of a response")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token_id
        if unk is not None and unk != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": AddedToken("<|pad|>", normalized=False, special=True)})
            if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    return tokenizer


# ----------------------------------------------------------------------------------------------- prompt
SETTINGS_POSITIONS = ("before", "after")

_ADDED_TEMPLATE_FIELDS = {"settings_position": "before"}
"""Fields added to :class:`PromptTemplate` after log-likelihood caches existed, with the value that reproduces the template
as it was. :meth:`PromptTemplate.fingerprint` leaves a field out of the hash while it holds that value, so every
template that could be written before the field existed keeps its fingerprint, and with it its Parquet cache."""


@dataclass(frozen=True)
class PromptTemplate:
    """How settings, dialogue and query become the LM prompt; the response follows it.

    Rendered prompt (defaults, ``settings_position="before"``)::

        Character trait: <setting 1>
        Character trait: <setting 2>
        User: <context turn>
        Character: <context turn>
        User: <query>
        Character:

    and the scored continuation is ``" <response><eos>"``. With no setting the trait lines are absent, which is
    what "no setting" means for priors and the relevance threshold.

    With ``settings_position="after"`` the trait lines sit between the query's line and the reply marker (the
    part of ``query_line`` after its last newline)::

        User: <context turn>
        Character: <context turn>
        User: <query>
        Character trait: <setting 1>
        Character:

    so all candidates of a turn (every setting, and none) share the dialogue as a prefix, which
    :meth:`LMLikelihood.loglik` runs once per turn (see :meth:`render_split`). The no-setting prompt is the same text
    in both positions.
    """

    setting_line: str = "Character trait: {setting}\n"
    user_line: str = "User: {text}\n"
    character_line: str = "Character: {text}\n"
    query_line: str = "User: {text}\nCharacter:"
    response: str = " {text}"
    settings_position: Literal["before", "after"] = "before"
    """Where the setting lines go: ``"before"`` the dialogue (the original layout), or ``"after"`` the query's line,
    just before the reply marker, so that a turn's candidates share a prefix. At ``"before"`` it is left out of
    :meth:`fingerprint`, so caches filled before the option existed stay valid."""

    def __post_init__(self) -> None:
        if self.settings_position not in SETTINGS_POSITIONS:
            raise ValueError(
                f"template.settings_position must be one of {', '.join(SETTINGS_POSITIONS)}, "
                f"got {self.settings_position!r}"
            )
        if self.settings_position == "after":
            self._query_parts()  # validates query_line now, not at the first prompt

    def _query_parts(self) -> tuple[str, str]:
        """``query_line`` cut after its last newline: (the query's own line, newline included; the reply marker)."""
        cut = self.query_line.rfind("\n") + 1
        if cut == 0 or "{text}" not in self.query_line[:cut]:
            raise ValueError(
                "template.query_line must have a newline after {text} (the reply marker follows it) when "
                f"template.settings_position is 'after', got {self.query_line!r}"
            )
        return self.query_line[:cut], self.query_line[cut:]

    def render(self, settings: Sequence[str], context: Sequence, query: str) -> str:
        if self.settings_position == "after":
            return "".join(self.render_split(settings, context, query))
        parts = [self.setting_line.format(setting=s) for s in settings]
        for turn in context:
            line = self.user_line if turn.role == "user" else self.character_line
            parts.append(line.format(text=turn.text))
        parts.append(self.query_line.format(text=query))
        return "".join(parts)

    def render_split(self, settings: Sequence[str], context: Sequence, query: str) -> tuple[str, str]:
        """(prefix, suffix) of the prompt of a settings-after template; ``prefix + suffix == render(...)``.

        The prefix is the dialogue through the query's line and its newline; the suffix is the setting lines and
        the reply marker. Why the cut sits right after that newline: it is the longest prefix shared by every
        candidate of a turn (each suffix starts with a setting line or the marker), and byte-level BPE
        tokenizers (GPT-2, SmolLM2) pre-split text at a newline followed by a letter, so tokenising the two parts
        separately gives the same ids as tokenising the whole prompt. :class:`LMLikelihood` tokenises them separately
        on both of its paths anyway, so the two always score the same token sequence, whatever the tokenizer.
        """
        if self.settings_position != "after":
            raise ValueError(
                "render_split needs template.settings_position='after' (the settings come first)"
            )
        head, marker = self._query_parts()
        parts = []
        for turn in context:
            line = self.user_line if turn.role == "user" else self.character_line
            parts.append(line.format(text=turn.text))
        parts.append(head.format(text=query))
        suffix = "".join(self.setting_line.format(setting=s) for s in settings) + marker.format(text=query)
        return "".join(parts), suffix

    def fingerprint(self) -> str:
        fields = asdict(self)
        for name, original in _ADDED_TEMPLATE_FIELDS.items():
            if fields[name] == original:  # a template that could exist before the field keeps its hash
                del fields[name]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LoglikRequest:
    example: Example
    settings: tuple[str, ...] = NO_SETTING


@dataclass
class Logliks:
    """Per request: summed log-likelihood of the response tokens (eos included) and their count."""

    logp_sum: np.ndarray  # (n,) float64
    n_tokens: np.ndarray  # (n,) int64

    @property
    def logp_mean(self) -> np.ndarray:
        return self.logp_sum / np.maximum(self.n_tokens, 1)


# ----------------------------------------------------------------------------------------------- likelihood
def response_token_logprobs(
    model, ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log p of each response token (eos included) given everything before it: (batch, r_max), 0 off the response.

    Takes a batch as :meth:`LMLikelihood.collate` lays it out (left padding, so the responses of all rows end at the
    last column; ``ids`` and ``attention_mask`` on the model's device) and returns its last ``r_max`` columns,
    ``r_max`` the longest response. Positions are counted from each row's first real token, so left padding
    does not shift them, and only the last ``r_max + 1`` positions go through the LM head (``logits_to_keep``).
    One computation for the frozen LM (:meth:`LMLikelihood.loglik`, under inference_mode) and for fine-tuning
    (:meth:`replugchar.training.finetune.CharacterLMModule.reply_nll`, with gradients), so the loss trained is exactly
    the negative of the log-likelihood LSR reads.
    """
    width = ids.shape[1]
    r_max = int(response_mask.sum(1).max())
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions unaffected by left padding
    logits = (
        model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=r_max + 1,
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )  # (batch, r_max, vocab): predictions of the last r_max tokens
    targets = ids[:, width - r_max :]  # (batch, r_max)
    # log p(target) = logit(target) - logsumexp(logits): no (batch, r_max, vocab) log-softmax tensor
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logp = target_logit - torch.logsumexp(logits, -1)
    return token_logp.masked_fill(~response_mask[:, width - r_max :].to(ids.device), 0.0)


# ----------------------------------------------------------------------------------------------- KV cache
def _cache_argument(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (batch, kv_heads, seq, head_dim), of a ``DynamicCache`` (any version)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuple of tuples


def _expanded_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, start: int):
    """A fresh ``DynamicCache`` whose row i is prefix ``rows[i]``, columns from ``start`` on (leading columns that
    are padding for every selected row are dropped). Fresh because the forward appends to the cache it is given,
    and the prefix serves several candidate batches.

    Copies are what this path pays for on CPU (fresh pages for every large tensor), so the gathered tensors are
    handed to the cache layers as they are: ``update`` on an empty layer would concatenate, i.e. copy them again.
    Transformers versions without per-layer objects take the ``update`` route.
    """
    from transformers import DynamicCache

    out = DynamicCache()
    for layer_idx, (keys, values) in enumerate(layers):
        # (prefixes, kv_heads, past, head_dim) -> (len(rows), kv_heads, past - start, head_dim);
        # slice, then index_select: ~25x faster on CPU than one advanced-indexing expression (keys[rows, :, start:])
        keys = keys[:, :, start:].index_select(0, rows)
        values = values[:, :, start:].index_select(0, rows)
        # an empty update creates layer `layer_idx` (dtype, device); the gathered tensors then become its content
        out.update(keys[:, :, :0], values[:, :, :0], layer_idx)
        layer = out.layers[layer_idx] if hasattr(out, "layers") else None
        if layer is not None and hasattr(layer, "keys") and layer.keys.shape[-2] == 0:
            layer.keys, layer.values = keys, values
        else:
            out.update(keys, values, layer_idx)
    return out


_FORWARD_OVERHEAD_TOKENS = {"cpu": 64, "default": 2048}
"""What one more forward pass costs, in padded tokens, by device type: measured with SmolLM2-135M, a 2-row
continuation forward takes as long as ~70 padded tokens on 2 CPU cores; on a GPU a forward's kernel launches
cost thousands of tokens' worth of compute. :func:`_padded_partition` trades padding against forwards with it."""


def _padded_partition(
    widths: Sequence[int], cached: Sequence[int], budget: int, overhead: int
) -> list[tuple[int, int]]:
    """Cut items sorted by decreasing ``widths`` into runs ``[i, j)`` that minimise the modelled cost
    sum(overhead + rows x width), each run within ``budget`` (rows x (width + max ``cached`` columns), a run of
    one always allowed).

    Why not the greedy fill of :meth:`LMLikelihood.batches`: a turn's continuations are few and of widely varying
    length (the response is the turn's), so filling batches to the budget pads a lot, while cutting at every
    length step makes forwards too small to be efficient. Exact dynamic programme, O(n x rows per batch).
    """
    n = len(widths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of items[:j]
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        cols = 0
        for i in range(j - 1, -1, -1):  # the run items[i:j], as wide as items[i]
            cols = max(cols, cached[i])
            rows = j - i
            if rows > 1 and rows * (widths[i] + cols) > budget:
                break  # widening further only adds rows and width
            cost = best[i] + overhead + rows * widths[i]
            if cost < best[j]:
                best[j], start[j] = cost, i
    cuts, j = [], n
    while j > 0:
        cuts.append((start[j], j))
        j = start[j]
    return cuts[::-1]


_TREE_ROW_TOKENS = 192
"""Most tokens in one continuation row of the prefix-shared path (a row of a single candidate may hold more). Why a
cap: a row's tokens see one another through a dense (width x width) mask, mostly masked, so attention per token
grows with the row's width, while narrower rows run the tokens their candidates share (``Character trait: i``)
once per row and copy the prefix's KV once per row. 192 SmolLM2 tokens hold a ConvAI2 turn's k + 1 = 6
candidates; on 2 CPU cores caps of 128 / 192 / 320 gave 2.73x / 2.86x / 2.79x at k = 5 and 3.52x / 3.64x / 3.59x
at k = 60 over the per-prompt path (``benchmarks/lm_likelihood.py --prefix_share`` turns, one run)."""


@dataclass
class _TreeRow:
    """One continuation row of the prefix-shared path: a trie of some candidates of one prefix, a token per node.

    Why a trie: candidates of a turn also share the first tokens of their suffixes (``Character trait: i`` for
    most ConvAI2 settings), so each distinct (parent, token) is run once. Node t holds ``tokens[t]``, sees the
    cached prefix, its ancestors (``parents``, -1 for none) and itself, and sits ``depths[t]`` positions after
    the prefix. Response token ``targets[j]`` of request ``owners[j]`` is predicted at node ``predictors[j]``.
    """

    prefix_row: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    predictors: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    def new_nodes(self, seq: Sequence[int]) -> int:
        """How many nodes inserting ``seq`` would add."""
        node = -1
        for n, token in enumerate(seq):
            node = self.children.get((node, token), -2)
            if node == -2:
                return len(seq) - n
        return 0

    def insert(self, owner: int, seq: Sequence[int], n_resp: int) -> None:
        """Add request ``owner``'s continuation ``seq``, whose last ``n_resp`` tokens are scored (``seq`` has at
        least one token before them: the first response token is predicted in the row, not in the cache)."""
        node, path = -1, []
        for token in seq:
            child = self.children.get((node, token))
            if child is None:
                child = self.children[(node, token)] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1 if node >= 0 else 0)
            path.append(child)
            node = child
        for j in range(len(seq) - n_resp, len(seq)):
            self.predictors.append(path[j - 1])
            self.targets.append(seq[j])
            self.owners.append(owner)


def _tree_rows(prefix_row: int, members: Sequence[tuple[int, list[int], int]], cap: int) -> list[_TreeRow]:
    """Pack one prefix's (request, continuation, n_response) members into rows of at most ``cap`` nodes (a row
    takes at least one member). Members go in the order of their token ids, so that those sharing the most
    tokens land in one row."""
    rows = [_TreeRow(prefix_row)]
    for owner, seq, n_resp in sorted(members, key=lambda m: m[1]):
        if rows[-1].tokens and len(rows[-1].tokens) + rows[-1].new_nodes(seq) > cap:
            rows.append(_TreeRow(prefix_row))
        rows[-1].insert(owner, seq, n_resp)
    return rows


def _tree_batch(
    rows: Sequence[_TreeRow], cached: Sequence[int], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, position_ids), each (batch, width), right-padded, and which row columns each column sees,
    (batch, width, width): a node its ancestors and itself, padding itself only (a query that sees nothing gives
    NaN, which a zero attention weight on it would not hide). Positions continue from the row's ``cached``
    prefix tokens, as in the per-prompt prompt."""
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sees = np.zeros((len(rows), width, width), dtype=bool)
    sees[:, np.arange(width), np.arange(width)] = True
    for b, row in enumerate(rows):
        n = len(row.tokens)
        ids[b, :n] = torch.tensor(row.tokens)
        position_ids[b, :n] = torch.tensor(row.depths) + cached[b]
        for t, parent in enumerate(row.parents):  # parents come first: their rows are complete
            if parent >= 0:
                sees[b, t] |= sees[b, parent]
    return ids, position_ids, torch.from_numpy(sees)


def _tree_token_logprobs(
    model, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache, nodes, targets
) -> torch.Tensor:
    """log p of each target token (n,), predicted at flat position ``nodes[j]`` (row x width + column) of a
    continuation batch run against ``cache`` with the 4D additive ``mask`` (batch, 1, width, cached + width).

    Only those n positions go through the LM head, and they differ per row: a forward pre-hook on the output
    embeddings gathers them from the (batch, width, hidden) states the model hands its head, so whatever the
    model does around the head (a scale before, a cap after) still applies (a per-row boolean ``logits_to_keep``
    exists in recent transformers only)."""

    def gather(_module, args):
        return (args[0].flatten(0, -2).index_select(0, nodes).unsqueeze(0), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            logits_to_keep=0,  # every position reaches the head's input, where `gather` keeps n of them
            use_cache=True,
            **{_cache_argument(model): cache},
        ).logits[0]
    finally:
        handle.remove()
    logits = logits.float()  # (n, vocab)
    # log p(target) = logit(target) - logsumexp(logits): no (n, vocab) log-softmax tensor
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


_MASK_4D_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take the prefix-shared path's custom 4D (tree) mask as it is; flash attention
kernels take padding masks only."""


def supports_prefix_sharing(model) -> bool:
    """Whether ``model`` is a transformers model whose attention layers are all full (global) attention, so that
    a prefix's plain ``DynamicCache`` can be reused, whose attention takes a 4D mask and which has an output
    embedding (the LM head, see :func:`_tree_token_logprobs`). Other LMs, sliding-window or linear-attention layers
    (which keep a different cache) and flash-attention kernels take the per-prompt path."""
    from transformers import PreTrainedModel

    return (
        isinstance(model, PreTrainedModel)
        and _full_attention_only(model.config)
        and not _alibi(model.config)
        and getattr(model.config, "_attn_implementation", "eager") in _MASK_4D_ATTENTION
        and model.get_output_embeddings() is not None
    )


def _alibi(cfg) -> bool:
    """ALiBi models build their position bias from a 2D padding mask and cannot take the tree mask."""
    return getattr(cfg, "model_type", "") in ("bloom", "mpt") or bool(getattr(cfg, "alibi", False))


def _full_attention_only(cfg) -> bool:
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return all(t == "full_attention" for t in layer_types)
    return not (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True))


def _weights_key(model) -> str:
    """Identity of a model without a name (built in code): its class and a hash of its input embeddings."""
    emb = model.get_input_embeddings().weight.detach().float().flatten()[:65536].cpu().numpy()
    return f"{type(model).__name__}-{hashlib.sha1(emb.tobytes()).hexdigest()[:12]}"


class LMLikelihood:
    """log P(response | prompt) of (example, settings) pairs under a frozen causal LM, in length-bucketed,
    token-budgeted batches.

    Truncation policy: the response is never cut. When prompt + response exceed ``max_length`` tokens, the
    oldest context turns are dropped first; if it still does not fit, :class:`ValueError` names the example.
    Only the response positions go through the LM head (``logits_to_keep``): a full-vocabulary log-softmax at
    every prompt position costs several times the forward pass on CPU.

    Prefix sharing: with a settings-after template (``PromptTemplate(settings_position="after")``) the k + 1
    candidates of a turn differ only after the dialogue, so :meth:`loglik` runs each distinct prefix once, keeps
    its KV cache, and runs only ``setting line(s) + reply marker + response`` per candidate against it (the tokens
    that candidates start with once per row of candidates): ~k times fewer tokens through the model per turn. The
    log-likelihoods equal the per-prompt path's (same token ids, fp noise only).
    ``share_prefix=False`` forces the per-prompt path (benchmarks, checks); it does not change what a log-likelihood is,
    so it is not part of :attr:`fingerprint`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: PromptTemplate | None = None,
        *,
        max_length: int = 512,
        max_batch_tokens: int = 4096,
        lm_key: str = "",
        share_prefix: bool = True,
    ) -> None:
        if max_length <= 0 or max_batch_tokens <= 0:
            raise ValueError(
                f"max_length and max_batch_tokens must be positive, got {max_length}, {max_batch_tokens}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        self.max_length = min(max_length, limit) if limit else max_length
        self.max_batch_tokens = max_batch_tokens
        self.lm_key = lm_key or getattr(model.config, "_name_or_path", "") or _weights_key(model)
        self.share_prefix = share_prefix
        self.forward_passes = 0
        self.pairs_computed = 0
        # real (non-padding) input tokens through the model; a cached prefix is counted once
        self.tokens_forwarded = 0

    @property
    def fingerprint(self) -> str:
        """Identifies what a log-likelihood depends on besides the pair: LM, dtype, template, length limit."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"{self.lm_key}|{dtype}|{self.template.fingerprint()}|{self.max_length}"

    def encode(self, request: LoglikRequest) -> tuple[list[int], int]:
        """Token ids of prompt + response + eos, and the number of response tokens at the end."""
        if self.template.settings_position == "after":
            prefix, continuation, n_resp = self.encode_split(request)
            return prefix + continuation, n_resp
        tok, ex = self.tokenizer, request.example
        response = tok(self.template.response.format(text=ex.response), add_special_tokens=False).input_ids
        response = [*response, tok.eos_token_id]
        context = list(ex.context)
        while True:
            prompt = tok(self.template.render(request.settings, context, ex.query)).input_ids
            if len(prompt) + len(response) <= self.max_length:
                return prompt + response, len(response)
            if not context:
                raise ValueError(
                    f"example '{ex.example_id}': prompt ({len(prompt)} tokens) + response ({len(response)}) "
                    f"exceed model.lm.max_length={self.max_length} even without dialogue context; the response is "
                    "never truncated: raise max_length or shorten the settings/query/response"
                )
            context.pop(0)

    def encode_many(self, requests: Sequence[LoglikRequest]) -> list[tuple[list[int], int]]:
        """:meth:`encode` for many requests, with one batched tokenizer call for prompts and one for responses
        (per-pair calls cost a third of the LM time on a GPU); over-long pairs take the truncating path."""
        if not requests:
            return []
        if self.template.settings_position == "after":
            return [(prefix + cont, n) for prefix, cont, n in self.encode_split_many(requests)]
        tok = self.tokenizer
        responses = tok(
            [self.template.response.format(text=r.example.response) for r in requests],
            add_special_tokens=False,
        ).input_ids
        prompts = tok(
            [self.template.render(r.settings, r.example.context, r.example.query) for r in requests]
        ).input_ids
        out = []
        for request, prompt, response in zip(requests, prompts, responses):
            response = [*response, tok.eos_token_id]
            if len(prompt) + len(response) <= self.max_length:
                out.append((prompt + response, len(response)))
            else:
                out.append(self.encode(request))
        return out

    def _response_ids(self, responses: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        ids = tok(
            [self.template.response.format(text=r) for r in responses], add_special_tokens=False
        ).input_ids
        return [[*r, tok.eos_token_id] for r in ids]

    def encode_split(self, request: LoglikRequest) -> tuple[list[int], list[int], int]:
        """Settings-after templates: (prefix ids, continuation ids, number of response tokens at the end).

        The prefix is :meth:`PromptTemplate.render_split`'s dialogue part tokenised on its own (with the
        tokenizer's special tokens, e.g. a bos); the continuation is the suffix tokenised without special tokens,
        then the response and eos. Both paths of :meth:`loglik` score ``prefix + continuation``, so they see the
        same ids. Truncation as in :meth:`encode`: oldest context turns first, never the response. The suffix
        (settings) differs per candidate, so candidates of one turn can keep different numbers of turns: they
        then have different prefixes, and :meth:`loglik` groups them apart.
        """
        tok, ex = self.tokenizer, request.example
        [response] = self._response_ids([ex.response])
        context = list(ex.context)
        suffix: list[int] | None = None
        while True:
            prefix_text, suffix_text = self.template.render_split(request.settings, context, ex.query)
            if suffix is None:
                suffix = tok(suffix_text, add_special_tokens=False).input_ids
            prefix = tok(prefix_text).input_ids
            if len(prefix) + len(suffix) + len(response) <= self.max_length:
                return prefix, suffix + response, len(response)
            if not context:
                raise ValueError(
                    f"example '{ex.example_id}': prompt ({len(prefix) + len(suffix)} tokens) + response "
                    f"({len(response)}) exceed model.lm.max_length={self.max_length} even without dialogue context; "
                    "the response is never truncated: raise max_length or shorten the settings/query/response"
                )
            context.pop(0)

    def encode_split_many(self, requests: Sequence[LoglikRequest]) -> list[tuple[list[int], list[int], int]]:
        """:meth:`encode_split` for many requests: each distinct prefix, suffix and response text is tokenised once
        (one batched call each; a turn's k + 1 candidates share one prefix); over-long pairs are truncated."""
        if not requests:
            return []
        tok = self.tokenizer
        splits = [
            self.template.render_split(r.settings, r.example.context, r.example.query) for r in requests
        ]
        prefix_texts = list(dict.fromkeys(p for p, _ in splits))
        suffix_texts = list(dict.fromkeys(x for _, x in splits))
        response_texts = list(dict.fromkeys(r.example.response for r in requests))
        prefixes = dict(zip(prefix_texts, tok(prefix_texts).input_ids))
        suffixes = dict(zip(suffix_texts, tok(suffix_texts, add_special_tokens=False).input_ids))
        responses = dict(zip(response_texts, self._response_ids(response_texts)))
        out = []
        for request, (prefix_text, suffix_text) in zip(requests, splits):
            prefix, suffix = prefixes[prefix_text], suffixes[suffix_text]
            response = responses[request.example.response]
            if len(prefix) + len(suffix) + len(response) <= self.max_length:
                out.append((prefix, suffix + response, len(response)))
            else:
                out.append(self.encode_split(request))
        return out

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Index groups, longest first, each within ``max_batch_tokens`` padded tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        batches, current, width = [], [], 0
        for i in order:
            w = max(width, lengths[i])
            if current and w * (len(current) + 1) > self.max_batch_tokens:
                batches.append(current)
                current, w = [], lengths[i]
            current.append(i)
            width = w
        if current:
            batches.append(current)
        return batches

    def collate(
        self, encoded: Sequence[tuple[list[int], int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded (ids, attention_mask, response_mask), each (batch, width): every sequence ends at the
        last position, so the response tokens of all rows sit in the last columns."""
        width = max(len(seq) for seq, _ in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        resp_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, (seq, n_resp) in enumerate(encoded):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
            resp_mask[row, width - n_resp :] = True
        return ids, mask, resp_mask

    @torch.inference_mode()
    def loglik(self, requests: Sequence[LoglikRequest]) -> Logliks:
        """Summed log P(response + eos | prompt) per request: prefix-shared for settings-after templates (when
        ``share_prefix`` and the model's attention allows it), one padded prompt per request otherwise."""
        after = self.template.settings_position == "after"
        if after and self.share_prefix and supports_prefix_sharing(self.model):
            out = self._loglik_shared(self.encode_split_many(requests))
        else:
            encoded = self.encode_many(requests)
            out = Logliks(self._loglik_prompts(encoded), np.array([n for _, n in encoded], dtype=np.int64))
        self.pairs_computed += len(requests)
        return out

    def _loglik_prompts(self, encoded: Sequence[tuple[list[int], int]]) -> np.ndarray:
        """The per-prompt path: summed response log P of each (ids, n_response), in token-budgeted batches."""
        logp_sum = np.zeros(len(encoded), dtype=np.float64)
        device = next(self.model.parameters()).device
        for batch in self.batches([len(ids) for ids, _ in encoded]):
            ids, mask, resp_mask = self.collate([encoded[i] for i in batch])
            token_logp = response_token_logprobs(self.model, ids.to(device), mask.to(device), resp_mask)
            logp_sum[batch] = token_logp.sum(-1).double().cpu().numpy()
            self.forward_passes += 1
            self.tokens_forwarded += int(mask.sum())
        return logp_sum

    def _loglik_shared(self, encoded: Sequence[tuple[list[int], list[int], int]]) -> Logliks:
        """The prefix-shared path over :meth:`encode_split_many`'s output.

        1. Requests are grouped by prefix ids (one turn, and the same truncation); a group of one gains nothing
           and takes the per-prompt path.
        2. Groups are run in prefix batches (left-padded, longest first, cut by :func:`_padded_partition`
           within ``max_batch_tokens``). The first response token is predicted at the position before it, which
           must lie in a continuation row: where a member's suffix is empty, the prefix's last token is held back
           and run at the root of each of the group's rows instead.
        3. A group's continuations (suffix + response + eos) are packed as tries into rows of at most
           ``_TREE_ROW_TOKENS`` nodes (:func:`_tree_rows`): the suffix tokens candidates start with
           (``Character trait: i``) are run once per row, not once per candidate. Rows are right-padded, widest
           first, cut by :func:`_padded_partition` so that rows x (cached columns + row columns) stays within
           ``max_batch_tokens``; each batch gets its rows' prefix KV cache gathered from the prefix batch's
           (:func:`_expanded_cache`) and a 4D mask in which a node sees its prefix's real columns, its ancestors
           and itself, at positions that continue from its prefix: each candidate scores as in one piece. Only the
           positions that predict a response token go through the LM head (:func:`_tree_token_logprobs`).

        Peak memory: the prefix batch's cache and one gathered cache, each at most ``max_batch_tokens`` columns
        of KV, plus one forward over at most that many tokens and its mask, rows x width x (cached + width)
        values, i.e. at most ``max_batch_tokens`` x the widest row.
        """
        logp_sum = np.zeros(len(encoded), dtype=np.float64)
        n_tokens = np.array([r for _, _, r in encoded], dtype=np.int64)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (prefix, _, _) in enumerate(encoded):
            groups.setdefault(tuple(prefix), []).append(i)
        alone, shared = [], []
        for prefix, members in groups.items():
            if len(members) > 1 and len(prefix) >= 2:
                shared.append((prefix, members))
            else:  # nothing to share, or no prefix token to hold back
                alone.extend(members)
        if alone:
            logp_sum[alone] = self._loglik_prompts(
                [(encoded[i][0] + encoded[i][1], encoded[i][2]) for i in alone]
            )
        # longest first, cut as continuations are (_padded_partition), counting two forwards per prefix batch:
        # a cut there also splits the continuation batches that follow it
        shared.sort(key=lambda g: -len(g[0]))
        widths = [len(p) for p, _ in shared]
        cuts = _padded_partition(
            widths, [0] * len(shared), self.max_batch_tokens, 2 * self._forward_overhead()
        )
        for i, j in cuts:
            self._loglik_prefix_batch(shared[i:j], encoded, logp_sum)
        return Logliks(logp_sum, n_tokens)

    def _forward_overhead(self) -> int:
        device = next(self.model.parameters()).device
        return _FORWARD_OVERHEAD_TOKENS.get(device.type, _FORWARD_OVERHEAD_TOKENS["default"])

    def _loglik_prefix_batch(
        self,
        groups: Sequence[tuple[tuple[int, ...], list[int]]],
        encoded: Sequence[tuple[list[int], list[int], int]],
        logp_sum: np.ndarray,
    ) -> None:
        """One prefix batch of :meth:`_loglik_shared`: run the prefixes once, then every member's continuation, its
        turn's candidates packed as tries into rows (:class:`_TreeRow`)."""
        heads, members = [], []
        for prefix, group in groups:
            # the first response token is predicted at the position before it, which must be in a row: where a
            # member's suffix is empty, the prefix's last token is held back and run at the root of each row
            hold = any(len(encoded[i][1]) == encoded[i][2] for i in group)
            heads.append(list(prefix[:-1] if hold else prefix))
            members.append([(i, [*prefix[len(heads[-1]) :], *encoded[i][1]], encoded[i][2]) for i in group])
        layers, prefix_mask = self._run_prefixes(heads)
        head_len = [len(h) for h in heads]
        caps = [max(1, min(_TREE_ROW_TOKENS, self.max_batch_tokens - n)) for n in head_len]
        rows = [row for g, group in enumerate(members) for row in _tree_rows(g, group, caps[g])]
        # widest row first, cut where padding costs more than another forward (see _padded_partition)
        rows.sort(key=lambda r: -len(r.tokens))
        widths, cached = [len(r.tokens) for r in rows], [head_len[r.prefix_row] for r in rows]
        for lo, hi in _padded_partition(widths, cached, self.max_batch_tokens, self._forward_overhead()):
            self._loglik_tree_batch(rows[lo:hi], layers, prefix_mask, head_len, logp_sum)

    def _run_prefixes(self, heads: Sequence[list[int]]) -> tuple[list, torch.Tensor]:
        """One left-padded forward over the prefixes: their KV per layer, each (prefixes, kv_heads, past, head_dim),
        and their attention mask (prefixes, past) on the model's device."""
        device = next(self.model.parameters()).device
        past = max(len(h) for h in heads)
        # (prefixes, past), left-padded
        ids = torch.full((len(heads), past), self.tokenizer.pad_token_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(heads), past), dtype=torch.long)
        for row, head in enumerate(heads):
            ids[row, past - len(head) :] = torch.tensor(head)
            prefix_mask[row, past - len(head) :] = 1
        prefix_mask = prefix_mask.to(device)
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=prefix_mask,
            position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,  # the prefix's own predictions are not scored: one position through the LM head
        )
        self.forward_passes += 1
        self.tokens_forwarded += int(prefix_mask.sum())
        cache = getattr(out, "cache", None)
        return _cache_tensors(cache if cache is not None else out.past_key_values), prefix_mask

    def _loglik_tree_batch(
        self,
        rows: Sequence[_TreeRow],
        layers: list,
        prefix_mask: torch.Tensor,
        head_len: Sequence[int],
        logp_sum: np.ndarray,
    ) -> None:
        """One continuation batch: the rows' prefix KV gathered from the prefix batch's (:func:`_expanded_cache`),
        a 4D mask in which each node sees its prefix's real columns, its ancestors and itself; adds each target's
        log p to its request's ``logp_sum``."""
        device = prefix_mask.device
        dtype = next(self.model.parameters()).dtype
        prefix_rows = torch.tensor([r.prefix_row for r in rows], device=device)
        # the first `start` cached columns are padding for every row of this batch: not gathered
        start = prefix_mask.shape[1] - max(head_len[r.prefix_row] for r in rows)
        cached = [head_len[r.prefix_row] for r in rows]
        ids, position_ids, sees = _tree_batch(rows, cached, self.tokenizer.pad_token_id)  # (b, w), (b, w, w)
        width = ids.shape[1]
        lengths = torch.tensor([len(r.tokens) for r in rows], device=device)
        real = torch.arange(width, device=device)[None] < lengths[:, None]  # (b, w): a node, not padding
        sees_prefix = prefix_mask[prefix_rows, start:].bool()[:, None, :] & real[:, :, None]  # (b, w, past')
        allowed = torch.cat([sees_prefix, sees.to(device)], dim=-1)[:, None]  # (b, 1, w, past' + w)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)  # additive, as eager attention adds it
        nodes = torch.tensor([b * width + p for b, r in enumerate(rows) for p in r.predictors], device=device)
        targets = torch.tensor([t for r in rows for t in r.targets], device=device)  # (n,)
        token_logp = _tree_token_logprobs(
            self.model,
            ids.to(device),
            mask,
            position_ids.to(device),
            _expanded_cache(layers, prefix_rows, start),
            nodes,
            targets,
        )
        np.add.at(logp_sum, [o for r in rows for o in r.owners], token_logp.double().cpu().numpy())
        self.forward_passes += 1
        self.tokens_forwarded += sum(len(r.tokens) for r in rows)
