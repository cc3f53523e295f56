"""replugchar: a dense retriever of role-play character settings, trained with supervision from a frozen LM.

The public API is imported lazily (``replugchar --help`` must not load torch)::

    from replugchar import Retriever, ScoringRule, LSRLoss, LMScorer, PromptTemplate, SettingIndex, fix_tokenizer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    "Retriever": "retrieval.retriever",
    "Hit": "retrieval.retriever",
    "ScoringRule": "core.scoring",
    "FEATURES": "core.scoring",
    "LSRLoss": "training.losses",
    "LMScorer": "lm.scoring",
    "PromptTemplate": "lm.scoring",
    "ScoreRequest": "lm.scoring",
    "fix_tokenizer": "lm.scoring",
    "CachedScorer": "lm.score_cache",
    "build_scorer": "lm.score_cache",
    "ScorerOptions": "lm.score_cache",
    "SplitSpec": "core.data",
    "SettingIndex": "retrieval.index",
    "LSRModule": "training.module",
    "LSRDataModule": "training.datamodule",
    "Corpus": "core.data",
    "Character": "core.data",
    "Example": "core.data",
    "Turn": "core.data",
    "DataError": "core.data",
    "iter_jsonl": "core.data",
    "load_run": "training.run",
    "export_retriever": "retrieval.export",
    "evaluate": "evaluation.evaluate",
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
    "ScorerOptions",
    "ScoringRule",
    "SettingIndex",
    "SplitSpec",
    "Turn",
    "build_scorer",
    "evaluate",
    "export_retriever",
    "fix_tokenizer",
    "iter_jsonl",
    "load_run",
]

if TYPE_CHECKING:
    from .core.data import Character, Corpus, DataError, Example, SplitSpec, Turn, iter_jsonl
    from .core.scoring import FEATURES, ScoringRule
    from .evaluation.evaluate import evaluate
    from .lm.score_cache import CachedScorer, ScorerOptions, build_scorer
    from .lm.scoring import LMScorer, PromptTemplate, ScoreRequest, fix_tokenizer
    from .retrieval.export import export_retriever
    from .retrieval.index import SettingIndex
    from .retrieval.retriever import Hit, Retriever
    from .training.datamodule import LSRDataModule
    from .training.losses import LSRLoss
    from .training.module import LSRModule
    from .training.run import load_run


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'replugchar' has no attribute {name!r}")
