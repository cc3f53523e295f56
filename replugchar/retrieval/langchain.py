"""A LangChain retriever over an exported replugchar folder (needs ``langchain-core``).

::

    from replugchar.retrieval.langchain import ReplugcharRetriever

    retriever = ReplugcharRetriever.from_export("runs/demo/retriever", character_id="pc-valid-012")
    docs = retriever.invoke("Hello!")                  # best first; the settings under the threshold dropped
    docs[0].page_content, docs[0].metadata["score"]
    retriever.with_character("pc-valid-013").invoke("Any pets?")

Every document is one setting of ``character_id`` (a character never sees another character's settings), ranked
by the whole scoring rule of :mod:`replugchar.core.scoring`: cosine similarity, the dialogue evidence of ``history``
and λ·prior, with the fitted threshold τ applied. Ranking is :meth:`replugchar.retrieval.retriever.Retriever.search`
itself, not a copy of it, so a LangChain pipeline retrieves what ``replugchar`` evaluated.

``replugchar`` itself never imports this module: LangChain is an optional extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

from .retriever import Retriever


class ReplugcharRetriever(BaseRetriever):
    """One character's settings for a query, as LangChain documents, best first.

    Args (pydantic fields):
        retriever: a loaded :class:`~replugchar.retrieval.retriever.Retriever` (see :meth:`from_export`).
        character_id: whose settings to rank; required at query time (see :meth:`with_character`).
        k: how many settings at most; default the export's ``k`` (retriever.json).
        history: the session before the query, oldest first: ``{"role": "user" | "character", "text": ...}``
            dicts (or :class:`~replugchar.core.data.Turn`); read by the rule's dialogue features, ignored when their
            weights are all 0.
        prior_weight: λ override; default the fitted value (retriever.json). ``0.0`` = no prior.
        threshold: τ override; default the fitted value. ``float("-inf")`` keeps every setting.

    Document metadata: ``character_id``, ``setting_id`` (row of settings.jsonl / id in index.faiss),
    ``index_in_character``, ``score`` (the full rule), ``similarity`` (cosine), ``prior`` (g(s)) and
    ``dialogue`` (the dialogue-evidence part of the score).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    retriever: Retriever
    character_id: str | None = None
    k: int | None = None
    history: list[Any] = Field(default_factory=list)
    prior_weight: float | None = None
    threshold: float | None = None

    @field_validator("k")
    @classmethod
    def _positive_k(cls, k: int | None) -> int | None:
        if k is not None and k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        return k

    @field_validator("history", mode="before")
    @classmethod
    def _history_list(cls, history: Any) -> list:
        return [] if history is None else list(history)

    @classmethod
    def from_export(
        cls,
        folder: str | Path,
        character_id: str | None = None,
        k: int | None = None,
        history: list | None = None,
        *,
        device: str | None = None,
        **fields: Any,
    ) -> ReplugcharRetriever:
        """Load an export folder (``replugchar export`` / the training run's ``retriever/``)."""
        return cls(
            retriever=Retriever.load(folder, device=device),
            character_id=character_id,
            k=k,
            history=history,
            **fields,
        )

    def with_character(self, character_id: str) -> ReplugcharRetriever:
        """A copy for another character (same loaded encoder and index, so the embedding cache is shared)."""
        self._check_character(character_id)
        return self.model_copy(update={"character_id": character_id})

    def with_history(self, history: list | None) -> ReplugcharRetriever:
        """A copy that ranks for a query after ``history`` (oldest first)."""
        return self.model_copy(update={"history": self._history_list(history)})

    def _check_character(self, character_id: str | None) -> str:
        if character_id is None:
            raise ValueError(
                "ReplugcharRetriever has no character_id: pass character_id=... or use .with_character(cid)"
            )
        index = self.retriever.index
        if index is None or character_id not in index.ranges:
            raise KeyError(f"unknown character '{character_id}' (not in the exported index)")
        return character_id

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        cid = self._check_character(self.character_id)
        hits = self.retriever.search(
            cid,
            query,
            self.k,
            history=self.history,
            prior_weight=self.prior_weight,
            threshold=self.threshold,
        )
        return [
            Document(
                page_content=h.setting,
                metadata={
                    "character_id": cid,
                    "setting_id": h.setting_id,
                    "index_in_character": h.index_in_character,
                    "score": h.score,
                    "similarity": h.similarity,
                    "prior": h.prior,
                    "dialogue": h.dialogue,
                },
            )
            for h in hits
        ]


__all__ = ["ReplugcharRetriever"]
