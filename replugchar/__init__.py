"""replugchar: a dense retriever of role-play character settings, trained with supervision from a frozen LM.

The public API is imported lazily (``replugchar --help`` must not load torch)::

    from replugchar import Retriever, ScoringRule, LSRLoss, LMScorer, PromptTemplate, SettingIndex, fix_tokenizer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    "Retriever": "retriever",
    "Hit": "retriever",
    "ScoringRule": "scoring",
    "FEATURES": "scoring",
    "LSRLoss": "losses",
    "LMScorer": "lm_scoring",
    "PromptTemplate": "lm_scoring",
    "ScoreRequest": "lm_scoring",
    "fix_tokenizer": "lm_scoring",
    "CachedScorer": "score_cache",
    "build_scorer": "score_cache",
    "SettingIndex": "index",
    "LSRModule": "module",
    "LSRDataModule": "data",
    "Corpus": "data",
    "Character": "data",
    "Example": "data",
    "Turn": "data",
    "DataError": "data",
    "iter_jsonl": "data",
    "load_run": "run",
    "export_retriever": "export",
    "evaluate": "evaluate",
}
__all__ = [
    "FEATURES",
    "CachedScorer",
    "Character",
    "Corpus",
    "DataError",
    "Example",
    "Hit",
    "LMScorer",
    "LSRDataModule",
    "LSRLoss",
    "LSRModule",
    "PromptTemplate",
    "Retriever",
    "ScoreRequest",
    "ScoringRule",
    "SettingIndex",
    "Turn",
    "build_scorer",
    "evaluate",
    "export_retriever",
    "fix_tokenizer",
    "iter_jsonl",
    "load_run",
]

if TYPE_CHECKING:
    from .data import Character, Corpus, DataError, Example, LSRDataModule, Turn, iter_jsonl
    from .evaluate import evaluate
    from .export import export_retriever
    from .index import SettingIndex
    from .lm_scoring import LMScorer, PromptTemplate, ScoreRequest, fix_tokenizer
    from .losses import LSRLoss
    from .module import LSRModule
    from .retriever import Hit, Retriever
    from .run import load_run
    from .score_cache import CachedScorer, build_scorer
    from .scoring import FEATURES, ScoringRule


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'replugchar' has no attribute {name!r}")
