"""Inference: an exported retriever folder that ranks any character's settings for a dialogue turn.

:meth:`Retriever.rank` is the one entry to the scoring rule of :mod:`replugchar.core.scoring`; ``search``, ``chat``,
the LangChain retriever and ``evaluate`` all call it, so what was trained is what is served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.data import MAX_TEXT_CHARS, Example, query_text
from ..core.scoring import ScoringRule, query_weight, rank_numpy, turn_role, turn_text, window
from ..lm.likelihood import PromptTemplate
from .export_schema import FolderError
from .index import SettingIndex, encoder_fingerprint

History = Sequence  # of {"role": "user" | "character", "text": ...} dicts or data.Turn, oldest first


@dataclass(frozen=True)
class Hit:
    setting: str
    setting_id: int
    index_in_character: int
    similarity: float  # cos(query, setting)
    prior: float  # generality prior g(s)
    score: float  # the full rule: similarity + dialogue evidence + λ·prior
    dialogue: float = 0.0  # the dialogue-evidence part of the score, Σ w_f φ_f(s)


def check_text(text, what: str) -> None:
    """Queries and history turns are capped like data files: one 10 MB turn would cost gigabytes to embed."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} has {len(text)} characters (limit {MAX_TEXT_CHARS})")


class Retriever:
    """An export folder (see :mod:`replugchar.retrieval.export`): encoder(s), index of known characters, scoring rule."""

    def __init__(self, encoder, index: SettingIndex | None, config: dict, query_encoder=None) -> None:
        self.encoder = encoder
        self.query_encoder = query_encoder or encoder
        self.index = index
        self.config = config
        self.rule = ScoringRule.from_dict(config["scoring"]) if "scoring" in config else ScoringRule()
        self._cache: dict[tuple[bool, str], np.ndarray] = {}

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        device: str | None = None,
        check_fingerprint: bool = True,
        verify: bool = True,
    ) -> Retriever:
        """An export folder, checked before anything in it is used: retriever.json against its schema, every
        file against ``manifest.json`` (``verify=False`` skips only the manifest, for folders edited by hand),
        the encoder's modules against sentence-transformers' own. Every fault is one
        :class:`~replugchar.retrieval.export_schema.FolderError` naming the file."""
        from .export_schema import (
            check_retriever_config,
            load_sentence_transformer,
            read_json,
            verify_manifest,
        )

        folder = Path(folder)
        cfg_path = folder / "retriever.json"
        if not folder.is_dir():
            raise FolderError(f"{folder}: not a folder (expected a replugchar export folder)")
        if not cfg_path.is_file():
            raise FolderError(f"{folder}: no retriever.json (not a replugchar export folder)")
        config = check_retriever_config(read_json(cfg_path, what="retriever.json"), cfg_path)
        if verify:
            verify_manifest(folder)
        encoder = load_sentence_transformer(folder / "encoder", device=device)
        query_encoder = (
            load_sentence_transformer(folder / "query_encoder", device=device)
            if config.get("separate_query_encoder")
            else None
        )
        index = SettingIndex.load(folder, expected_dim=encoder.get_embedding_dimension())
        retriever = cls(encoder, index, config, query_encoder)
        if check_fingerprint and config.get("encoder_fingerprint"):
            got = encoder_fingerprint(lambda t: encoder.encode(t, normalize_embeddings=True))
            if got != config["encoder_fingerprint"]:
                raise FolderError(f"{folder}/encoder: does not match the encoder the index was built with")
        return retriever

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(**self.config.get("template", {}))

    @property
    def query_mode(self) -> str:
        return self.config.get("query_text", "query")

    # ------------------------------------------------------------------------------------------- embeddings
    def _embed(self, texts: Sequence[str], *, queries: bool) -> np.ndarray:
        """(n, d) unit-norm embeddings, cached by text: a session's turns come back at every later turn, and a
        character's settings at every turn."""
        encoder = self.query_encoder if queries else self.encoder
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if (queries, t) not in self._cache]
        if todo:
            emb = encoder.encode(todo, normalize_embeddings=True, convert_to_numpy=True)
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache.update(((queries, t), v) for t, v in zip(todo, emb))
        if not texts:
            return np.zeros((0, encoder.get_embedding_dimension()), np.float32)
        return np.stack([self._cache[(queries, t)] for t in texts])

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) embeddings of utterances: queries and history turns (the query encoder)."""
        return self._embed(texts, queries=True)

    def embed_settings(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) embeddings of settings (the setting encoder)."""
        return self._embed(texts, queries=False)

    # ------------------------------------------------------------------------------------------- scoring
    def _scores(
        self, query: str, settings_emb: np.ndarray, history: History, priors, rule: ScoringRule
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, similarities) of embedded settings under ``rule``: the one path every caller takes."""
        check_text(query, "query")
        turns = window(history, rule.history_window) if rule.uses_history else []
        for i, t in enumerate(turns):
            check_text(turn_text(t), f"history turn {len(history) - len(turns) + i}")
        own = [turn_role(t) == "character" for t in turns]
        emb = self.embed_queries([query, *(turn_text(t) for t in turns)])
        sims = settings_emb @ emb[0]
        empty = len(history) == 0
        return rank_numpy(emb[0], settings_emb, emb[1:], own, rule, priors, empty), sims.astype(np.float64)

    def generality(self, settings_emb: np.ndarray, priors: np.ndarray | None, rule: ScoringRule):
        """G(s) = imported prior + learned generality g(s) = v·e_s: what the index stores as its prior
        coordinate, computed here from the text for a character the index does not hold."""
        if not rule.uses_generality:
            return priors
        g = settings_emb.astype(np.float64) @ np.asarray(rule.generality, dtype=np.float64)
        return g if priors is None else priors + g

    def rank(
        self,
        settings: Sequence[str],
        query: str,
        history: History = (),
        priors: Sequence[float] | None = None,
        *,
        rule: ScoringRule | None = None,
    ) -> np.ndarray:
        """One score per setting, in input order, for any character (also one not in the index).

        ``history`` is the session before ``query``: ``{"role": "user"|"character", "text": ...}`` turns, oldest
        first (the data schema). ``priors`` are imported generality priors (z-normalised within the character);
        the learned generality of the export (if any) is added to them from the settings' text, so a new
        character gets it too. The threshold is not applied here: scores are comparable to it.
        """
        if not settings:
            raise ValueError("a character with no settings cannot be ranked")
        rule = rule or self.rule
        p = None if priors is None else np.asarray(priors, dtype=np.float64)
        if p is not None and (p.shape != (len(settings),) or not np.isfinite(p).all()):
            raise ValueError(f"priors must be {len(settings)} finite numbers, one per setting")
        emb = self.embed_settings(settings)
        return self._scores(query, emb, history, self.generality(emb, p, rule), rule)[0]

    def rank_example(
        self, example: Example, settings: Sequence[str], priors=None, *, rule=None
    ) -> np.ndarray:
        """:meth:`rank` of a data-set example: its query text and its whole session history."""
        return self.rank(settings, query_text(example, self.query_mode), example.dialogue, priors, rule=rule)

    def search(
        self,
        character_id: str,
        query: str,
        k: int | None = None,
        *,
        history: History = (),
        prior_weight: float | None = None,
        threshold: float | None = None,
    ) -> list[Hit]:
        """Top-k settings of an indexed character for ``query`` after ``history``, best first, those under the
        threshold dropped. ``prior_weight`` and ``threshold`` default to the fitted values (retriever.json); a
        ``prior_weight`` given here is a constant λ (the gate off; 0.0 = no prior term). ``threshold=-inf`` keeps
        all. With an empty history and no gate this is exactly the FAISS search."""
        if self.index is None:
            raise ValueError("this retriever has no index: use rank(settings, query, history)")
        k = k or self.config.get("k", 5)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        rule = self._search_rule(prior_weight, threshold)
        if character_id not in self.index.ranges:
            raise KeyError(f"unknown character '{character_id}' (not in the index)")
        check_text(query, "query")
        lo, hi = self.index.ranges[character_id]
        q = self.embed_queries([query])  # (1, d)
        # FAISS scores cos + w·G(s) over the prior-blended vectors of this character's settings
        found, ids = self.index.search(
            q,
            hi - lo,
            character_ids=[character_id],
            prior_weight=self._prior_weight(q, character_id, history, rule),
        )
        vecs = self.index.character_vectors(character_id)[:, :-1]  # (n, d) the stored embeddings
        sims = (vecs @ q[0]).astype(np.float64)
        scores = np.empty(hi - lo)
        scores[ids[0] - lo] = found[0]  # positions within the character, best first by FAISS
        dialogue = np.zeros(hi - lo)
        if rule.uses_history and len(history):  # the dialogue evidence, the one part FAISS cannot hold
            plain = dataclasses.replace(rule, prior_weight=0.0, gate=(0.0, 0.0))
            dialogue = self._scores(query, vecs, history, None, plain)[0] - sims
            scores = scores + dialogue
        return self._hits(lo, scores, sims, dialogue, k, rule.threshold)

    def _search_rule(self, prior_weight: float | None, threshold: float | None) -> ScoringRule:
        """The exported rule with :meth:`search`'s overrides: a given λ is a constant (the gate off)."""
        rule = dataclasses.replace(
            self.rule, threshold=self.rule.threshold if threshold is None else threshold
        )
        if prior_weight is not None:
            rule = dataclasses.replace(rule, prior_weight=prior_weight, gate=(0.0, 0.0))
        return rule

    def _prior_weight(self, q: np.ndarray, character_id: str, history: History, rule: ScoringRule) -> float:
        """w(x, h) of the rule; the gate reads the query's best cosine: one FAISS search with the prior off."""
        if not rule.uses_gate:
            return rule.prior_weight
        best = float(self.index.search(q, 1, character_ids=[character_id])[0][0, 0])
        return float(
            query_weight(torch.tensor(best), torch.tensor(len(history) == 0), rule.prior_weight,
                         torch.tensor(rule.gate))
        )  # fmt: skip

    def _hits(self, lo: int, scores, sims, dialogue, k: int, threshold: float | None) -> list[Hit]:
        """The top-k of a character's settings (global rows from ``lo``) at or over the threshold, best first."""
        priors = self.index.priors  # G(s): imported prior + learned generality
        hits = []
        for j in np.argsort(-scores, kind="stable")[:k]:
            if threshold is not None and scores[j] < threshold:
                continue
            rec = self.index.records[lo + j]
            similarity, prior, score = float(sims[j]), float(priors[lo + j]), float(scores[j])
            hits.append(
                Hit(
                    rec.text,
                    rec.setting_id,
                    rec.index_in_character,
                    similarity,
                    prior,
                    score,
                    float(dialogue[j]),
                )
            )
        return hits
