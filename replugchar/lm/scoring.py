"""The frozen LM as a judge: log P(gold response | setting(s), dialogue), and the tokenizer fixes it needs.

One scoring function (:meth:`LMScorer.score`) serves training, priors and evaluation; :class:`ScoreCache`
(in :mod:`replugchar.lm.score_cache`) sits in front of it so no pair is ever scored twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..core.data import Example

NO_SETTING: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------- tokenizer
def fix_tokenizer(tokenizer, model=None):
    """Make ``tokenizer`` safe for scoring (and for fine-tuning the character LM).

    Why: when ``pad_token == eos_token`` (SmolLM2, Llama-2 fine-tunes such as japanese-stablelm-instruct-beta-7b),
    any mask built from ``input_ids != pad_token_id`` also hides the eos that ends the response, so the LM is
    never scored (or trained) on stopping. Fix, as for the Llama-2 family: pad := unk when an unk token exists
    and differs from eos, otherwise add a dedicated ``<|pad|>`` token with ``normalized=False`` (so the
    normaliser cannot split or rewrite it) and resize ``model``'s embeddings. Padding goes on the left so that
    every response ends at the last position (see :meth:`LMScorer.score`). Returns the same tokenizer.
    """
    from transformers import AddedToken

    if tokenizer.eos_token_id is None:
        raise ValueError("the LM's tokenizer has no eos token: cannot score the end of a response")
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
@dataclass(frozen=True)
class PromptTemplate:
    """How settings, dialogue and query become the LM prompt; the response follows it.

    Rendered prompt (defaults)::

        Character trait: <setting 1>
        Character trait: <setting 2>
        User: <context turn>
        Character: <context turn>
        User: <query>
        Character:

    and the scored continuation is ``" <response><eos>"``. With no setting the trait lines are absent, which is
    what "no setting" means for priors and the relevance threshold.
    """

    setting_line: str = "Character trait: {setting}\n"
    user_line: str = "User: {text}\n"
    character_line: str = "Character: {text}\n"
    query_line: str = "User: {text}\nCharacter:"
    response: str = " {text}"

    def render(self, settings: Sequence[str], context: Sequence, query: str) -> str:
        parts = [self.setting_line.format(setting=s) for s in settings]
        for turn in context:
            line = self.user_line if turn.role == "user" else self.character_line
            parts.append(line.format(text=turn.text))
        parts.append(self.query_line.format(text=query))
        return "".join(parts)

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ScoreRequest:
    example: Example
    settings: tuple[str, ...] = NO_SETTING


@dataclass
class Scores:
    """Per request: summed log-likelihood of the response tokens (eos included) and their count."""

    logp_sum: np.ndarray  # (n,) float64
    n_tokens: np.ndarray  # (n,) int64

    @property
    def logp_mean(self) -> np.ndarray:
        return self.logp_sum / np.maximum(self.n_tokens, 1)


# ----------------------------------------------------------------------------------------------- scorer
def response_token_logprobs(
    model, ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log p of each response token (eos included) given everything before it: (batch, r_max), 0 off the response.

    Takes a batch as :meth:`LMScorer.collate` lays it out (left padding, so the responses of all rows end at the
    last column; ``ids`` and ``attention_mask`` on the model's device) and returns its last ``r_max`` columns,
    ``r_max`` the longest response. Positions are counted from each row's first real token, so left padding
    does not shift them, and only the last ``r_max + 1`` positions go through the LM head (``logits_to_keep``).
    One computation for scoring (:meth:`LMScorer.score`, under inference_mode) and for fine-tuning
    (:meth:`replugchar.training.finetune.CharacterLMModule.reply_nll`, with gradients), so the loss trained is exactly
    the negative of the score LSR reads.
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


def _weights_key(model) -> str:
    """Identity of a model without a name (built in code): its class and a hash of its input embeddings."""
    emb = model.get_input_embeddings().weight.detach().float().flatten()[:65536].cpu().numpy()
    return f"{type(model).__name__}-{hashlib.sha1(emb.tobytes()).hexdigest()[:12]}"


class LMScorer:
    """Scores (example, settings) pairs with a frozen causal LM in length-bucketed, token-budgeted batches.

    Truncation policy: the response is never cut. When prompt + response exceed ``max_length`` tokens, the
    oldest context turns are dropped first; if it still does not fit, :class:`ValueError` names the example.
    Only the response positions go through the LM head (``logits_to_keep``): a full-vocabulary log-softmax at
    every prompt position costs several times the forward pass on CPU.
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
        self.forward_passes = 0
        self.pairs_scored = 0

    @property
    def fingerprint(self) -> str:
        """Identifies what a score depends on besides the pair: LM, dtype, template, length limit."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"{self.lm_key}|{dtype}|{self.template.fingerprint()}|{self.max_length}"

    def encode(self, request: ScoreRequest) -> tuple[list[int], int]:
        """Token ids of prompt + response + eos, and the number of response tokens at the end."""
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
                    f"exceed model.max_length={self.max_length} even without dialogue context; the response is "
                    "never truncated: raise max_length or shorten the settings/query/response"
                )
            context.pop(0)

    def encode_many(self, requests: Sequence[ScoreRequest]) -> list[tuple[list[int], int]]:
        """:meth:`encode` for many requests, with one batched tokenizer call for prompts and one for responses
        (per-pair calls cost a third of the scoring time on a GPU); over-long pairs take the truncating path."""
        if not requests:
            return []
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
    def score(self, requests: Sequence[ScoreRequest]) -> Scores:
        encoded = self.encode_many(requests)
        logp_sum = np.zeros(len(requests), dtype=np.float64)
        n_tokens = np.array([n for _, n in encoded], dtype=np.int64)
        device = next(self.model.parameters()).device
        for batch in self.batches([len(ids) for ids, _ in encoded]):
            ids, mask, resp_mask = self.collate([encoded[i] for i in batch])
            token_logp = response_token_logprobs(self.model, ids.to(device), mask.to(device), resp_mask)
            logp_sum[batch] = token_logp.sum(-1).double().cpu().numpy()
            self.forward_passes += 1
        self.pairs_scored += len(requests)
        return Scores(logp_sum, n_tokens)
