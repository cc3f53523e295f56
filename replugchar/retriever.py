"""Inference: load an exported retriever folder and search a character's settings; REPLUG ensembling."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .export import encoder_fingerprint
from .index import SettingIndex
from .lm_scoring import PromptTemplate


@dataclass(frozen=True)
class Hit:
    setting: str
    setting_id: int
    index_in_character: int
    similarity: float
    prior: float
    score: float  # similarity + prior_weight * prior


class Retriever:
    """An export folder (see :mod:`replugchar.export`) ready to answer ``search(character_id, query)``."""

    def __init__(self, encoder, index: SettingIndex, config: dict, query_encoder=None) -> None:
        self.encoder = encoder
        self.query_encoder = query_encoder or encoder
        self.index = index
        self.config = config

    @classmethod
    def load(
        cls, folder: str | Path, *, device: str | None = None, check_fingerprint: bool = True
    ) -> Retriever:
        from sentence_transformers import SentenceTransformer

        folder = Path(folder)
        cfg_path = folder / "retriever.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{folder}: no retriever.json (not a replugchar export folder)")
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        encoder = SentenceTransformer(str(folder / "encoder"), device=device)
        query_encoder = (
            SentenceTransformer(str(folder / "query_encoder"), device=device)
            if config.get("separate_query_encoder")
            else None
        )
        index = SettingIndex.load(folder, expected_dim=encoder.get_embedding_dimension())
        retriever = cls(encoder, index, config, query_encoder)
        if check_fingerprint and config.get("encoder_fingerprint"):
            got = encoder_fingerprint(lambda t: encoder.encode(t, normalize_embeddings=True))
            if got != config["encoder_fingerprint"]:
                raise ValueError(f"{folder}: encoder/ does not match the encoder the index was built with")
        return retriever

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(**self.config.get("template", {}))

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.query_encoder.encode(list(queries), normalize_embeddings=True, convert_to_numpy=True)

    def search(
        self,
        character_id: str,
        query: str,
        k: int | None = None,
        *,
        prior_weight: float | None = None,
        threshold: float | None = None,
        context: str = "",
    ) -> list[Hit]:
        """Top-k settings of one character for ``query``, best first, those under the threshold dropped.

        ``prior_weight`` and ``threshold`` default to the values fitted at export (retriever.json).
        ``context`` is prepended when the retriever was trained with ``query_text: context_and_query``.
        """
        if not query or not query.strip():
            raise ValueError("query is empty")
        k = k or self.config.get("k", 5)
        lam = self.config.get("prior_weight", 0.0) if prior_weight is None else prior_weight
        tau = self.config.get("threshold") if threshold is None else threshold
        text = (
            (context + "\n" + query)
            if context and self.config.get("query_text") == "context_and_query"
            else query
        )
        scores, ids = self.index.search(
            self.embed_queries([text]), k, character_ids=[character_id], prior_weight=lam
        )
        hits = []
        for score, sid in zip(scores[0].tolist(), ids[0].tolist()):
            if sid < 0:
                continue
            rec, prior = self.index.records[sid], float(self.index.priors[sid])
            if tau is not None and score < tau:
                continue
            hits.append(Hit(rec.text, sid, rec.index_in_character, score - lam * prior, prior, score))
        return hits


@torch.inference_mode()
def replug_next_token_logprobs(
    model,
    tokenizer,
    template: PromptTemplate,
    hits: Sequence[Hit],
    context: Sequence,
    query: str,
    response_prefix: str = "",
    temperature: float = 1.0,
) -> torch.Tensor:
    """REPLUG ensemble: log Σ_i softmax(score/temperature)_i · P_LM(next token | setting_i, dialogue, prefix).

    One forward pass per retrieved setting (batched); returns (vocab,) log-probabilities. With no hits it is
    the LM's own next-token distribution without settings.
    """
    groups = [(h.setting,) for h in hits] or [()]
    weights = torch.softmax(torch.tensor([h.score for h in hits] or [0.0]) / temperature, 0)
    prefix = template.response.format(text=response_prefix) if response_prefix else ""
    texts = [template.render(s, context, query) + prefix for s in groups]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = side
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(**batch, position_ids=position_ids, logits_to_keep=1).logits[:, -1].float()  # (k, vocab)
    logp = torch.log_softmax(logits, -1)
    return torch.logsumexp(logp + weights.log().to(logp.device)[:, None], dim=0)
