"""replugchar: a dense retriever of role-play character settings, trained with supervision from a frozen LM.

The public API is imported lazily (``replugchar --help`` must not load torch)::

    from replugchar import Retriever, ScoringRule, LSRLoss, LMLikelihood, PromptTemplate, SettingIndex, fix_tokenizer

"Score" is the retrieval rule's (:class:`ScoringRule`); the frozen LM gives log-likelihoods (:class:`LMLikelihood`,
``loglik``). An LM name of 0.1 (``LMScorer``, ``CachedScorer``, ...) is an ``ImportError`` that names its new
spelling (README "Renamed in 0.2"): its methods were renamed too, so an alias would only fail one call later.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

_API = {
    "Retriever": "retrieval.retriever",
    "Hit": "retrieval.retriever",
    "ScoringRule": "core.scoring",
    "FEATURES": "core.scoring",
    "LSRLoss": "training.losses",
    "LMLikelihood": "lm.likelihood",
    "PromptTemplate": "lm.likelihood",
    "LoglikRequest": "lm.likelihood",
    "fix_tokenizer": "lm.likelihood",
    "CachedLikelihood": "lm.loglik_cache",
    "build_likelihood": "lm.loglik_cache",
    "LikelihoodOptions": "lm.loglik_cache",
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
_RENAMED = {
    "LMScorer": "LMLikelihood (its .score is .loglik, returning Logliks)",
    "ScoreRequest": "LoglikRequest",
    "CachedScorer": "CachedLikelihood (its .score is .loglik, its .scorer is .uncached)",
    "ScorerOptions": "LikelihoodOptions (score_cache_dir is loglik_cache_dir)",
    "build_scorer": "build_likelihood",
}
"""0.1 name -> today's: "score" now means only the retrieval rule's."""
__all__ = [
    "FEATURES",
    "CachedLikelihood",
    "Character",
    "Corpus",
    "DataError",
    "Example",
    "Hit",
    "LMLikelihood",
    "LSRDataModule",
    "LSRLoss",
    "LSRModule",
    "LikelihoodOptions",
    "LoglikRequest",
    "PromptTemplate",
    "Retriever",
    "ScoringRule",
    "SettingIndex",
    "SplitSpec",
    "Turn",
    "build_likelihood",
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
    from .lm.likelihood import LMLikelihood, LoglikRequest, PromptTemplate, fix_tokenizer
    from .lm.loglik_cache import CachedLikelihood, LikelihoodOptions, build_likelihood
    from .retrieval.export import export_retriever
    from .retrieval.index import SettingIndex
    from .retrieval.retriever import Hit, Retriever
    from .training.datamodule import LSRDataModule
    from .training.losses import LSRLoss
    from .training.module import LSRModule
    from .training.run import load_run


def __getattr__(name: str):
    if name in _RENAMED:  # ImportError, not AttributeError: `from replugchar import X` would drop the message
        raise ImportError(
            f"replugchar.{name} was renamed in 0.2: it is replugchar.{_RENAMED[name]}", name=name
        )
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'replugchar' has no attribute {name!r}")
