"""``replugchar teacher-report``: how good a judge of settings an LM is, before LSR trains a retriever on it.

Why: LSR can only learn what the teacher distinguishes. If the LM's best setting for a reply beats the second
by a hair, or beats no setting at all only half the time, its preferences are noise and no retriever can learn
them; if similarity already picks the LM's best setting, there is little left to learn. The numbers, all from
the LM's log-likelihood per token of the gold reply (nats/token), over held-out turns:

* ``median_margin`` -- best setting minus second best (characters with at least two settings);
* ``oracle_minus_similarity`` -- mean log-likelihood under the LM's best setting minus under the top-1 setting
  by cosine similarity of the base encoder: the most a retriever could gain over similarity on this LM;
* ``best_beats_none`` -- share of turns where the best setting makes the reply likelier than no setting;
* ``similarity_top1_is_lm_best`` -- share of turns where similarity's top-1 is the LM's best setting;
* ``agreement_with_other`` -- given a second LM, share of turns where both pick the same best setting (e.g.
  the base LM against its ``finetune-lm`` version, or two LMs of different families).

It reads the shared log-likelihood cache (:func:`replugchar.lm.loglik_cache.build_likelihood`), so after ``fit``/``evaluate``
scored a split it costs no LM time. Characters a ``finetune-lm`` folder was trained on are left out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..core.atomic import write_text
from ..lm.finetuned import finetuned_characters
from ..lm.gains import LMTable, lm_table
from ..lm.likelihood import PromptTemplate
from ..lm.models import EMBEDDED_ENCODER, EMBEDDED_LM

log = logging.getLogger(__name__)


def teacher_report(
    table: LMTable, similarity: Sequence[np.ndarray] | None = None, other: LMTable | None = None
) -> dict[str, float]:
    """The report's numbers from an :class:`~replugchar.lm.gains.LMTable` (per example: log-likelihood/token
    with no setting and with each setting) and, optionally, per-example similarity scores over the same
    settings and the table of a second LM over the same examples. Ties go to the first setting."""
    n = len(table.per_setting)
    if n == 0:
        raise ValueError("teacher report: no examples")
    if similarity is not None and len(similarity) != n:
        raise ValueError(f"teacher report: {len(similarity)} similarity rows for {n} examples")
    if other is not None and (
        len(other.per_setting) != n
        or any(len(a) != len(b) for a, b in zip(table.per_setting, other.per_setting))
    ):
        raise ValueError("teacher report: the two LM tables do not cover the same examples and settings")
    best = [int(np.argmax(s)) for s in table.per_setting]
    margins = [float(np.diff(np.sort(s)[-2:])[0]) for s in table.per_setting if len(s) >= 2]
    out = {
        "n_examples": float(n),
        "median_margin": float(np.median(margins)) if margins else float("nan"),
        "best_beats_none": float(np.mean([s[b] > z for s, b, z in zip(table.per_setting, best, table.none)])),
        "mean_best_gain": float(np.mean([s[b] - z for s, b, z in zip(table.per_setting, best, table.none)])),
    }
    if similarity is not None:
        top = [int(np.argmax(np.asarray(sim))) for sim in similarity]
        out["oracle_minus_similarity"] = float(
            np.mean([s[b] - s[t] for s, b, t in zip(table.per_setting, best, top)])
        )
        out["similarity_top1_is_lm_best"] = float(np.mean([b == t for b, t in zip(best, top)]))
    if other is not None:
        other_best = [int(np.argmax(s)) for s in other.per_setting]
        out["agreement_with_other"] = float(np.mean([a == b for a, b in zip(best, other_best)]))
    return out


def report(
    lm: str = EMBEDDED_LM,
    other_lm: str | None = None,
    data_dir: str = "demo",
    split: Literal["val", "test", "all"] = "val",
    retriever: str | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    max_examples: int | None = 200,
    base_encoder: str = EMBEDDED_ENCODER,
    template: PromptTemplate | None = None,
    lm_dtype: str = "auto",
    max_length: int = 512,
    max_batch_tokens: int = 4096,
    loglik_cache_dir: str | None = "auto",
    device: str = "auto",
    out: str | None = None,
) -> dict[str, float]:
    """How well an LM separates a character's settings on held-out turns (see the module docstring).

    Args:
        lm: the LM to judge: hub id, local folder (e.g. a ``finetune-lm`` output), ``embedded:...`` or ``tiny:gpt2``.
        other_lm: a second LM for ``agreement_with_other`` (null: none).
        data_dir: data folder (shared schema) or "demo".
        split: "val" / "test" = that character split of (val_fraction, test_fraction, seed), as in the fit
            config; "all" = every example. Characters a ``finetune-lm`` folder (lm or other_lm) trained on are
            always left out.
        retriever: an export folder whose stored character split (retriever.json "split", what its ``fit``
            used) picks the characters, so the report judges the same held-out characters as ``evaluate``.
        val_fraction: None = the export's (``--retriever``), else 0.2.
        test_fraction: None = the export's, else 0.0.
        seed: split seed, also of the example sample; None = the export's, else 0.
        max_examples: cap on examples (LM cost: 1 + settings pairs per example, once; then cached).
        base_encoder: the encoder whose cosine similarity is the baseline retriever.
        template: LM prompt template (as in the fit config, so the log-likelihood cache is shared).
        lm_dtype: "auto" = bfloat16 on GPU, float32 on CPU.
        max_length: token limit of prompt + response (as in the fit config).
        max_batch_tokens: token budget per LM forward pass (padded tokens counted).
        loglik_cache_dir: shared log-likelihood cache ("auto" = $REPLUGCHAR_CACHE/logliks; null = in memory).
        device: where the LMs run: "auto" = cuda when available, else cpu.
        out: also write the numbers to this JSON file (null: print only).
    """
    import torch

    from ..lm.models import load_encoder
    from ..retrieval.retriever import Retriever
    from .evaluate import resolve_split, select_examples

    val_fraction, test_fraction, seed = resolve_split(
        _stored_config(retriever) if retriever else {}, val_fraction, test_fraction, seed
    )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    exclude = finetuned_characters(lm) | (finetuned_characters(other_lm) if other_lm else set())
    examples, characters = select_examples(
        data_dir, split, val_fraction, test_fraction, seed, max_examples, exclude
    )
    lm_options = dict(
        dtype=lm_dtype,
        max_length=max_length,
        max_batch_tokens=max_batch_tokens,
        loglik_cache_dir=loglik_cache_dir,
    )
    table = _table_of(lm, examples, characters, lm_options, template, device)
    other = _table_of(other_lm, examples, characters, lm_options, template, device) if other_lm else None
    base = Retriever(load_encoder(base_encoder, device=device), None, {"query_text": "query"})
    similarity = [base.rank_example(e, characters[e.character_id].settings) for e in examples]
    numbers = teacher_report(table, similarity, other)
    numbers["n_characters"] = float(len({e.character_id for e in examples}))
    print(f"teacher report: {lm} on {data_dir} ({split} split, {len(examples)} turns)")
    print("\n".join(f"  {key:<28} {value:.4f}" for key, value in numbers.items()))
    if out:
        meta = {
            "lm": lm,
            "other_lm": other_lm,
            "data_dir": data_dir,
            "split": split,
            "excluded": sorted(exclude),
        }
        write_text(out, json.dumps({**numbers, **meta}, indent=2) + "\n")
        log.info("teacher report written to %s", out)
    return numbers


def _stored_config(folder: str) -> dict:
    """retriever.json of an export folder, checked against its schema (only the split is read here)."""
    from pathlib import Path

    from ..retrieval.export_schema import check_retriever_config, read_json

    path = Path(folder) / "retriever.json"
    return check_retriever_config(read_json(path, what="retriever.json"), path)


def _table_of(spec: str, examples, characters, lm_options: dict, template, device: str) -> LMTable:
    """The LM table of ``spec`` over the examples, from the shared log-likelihood cache where it has the pairs."""
    from ..lm.loglik_cache import LikelihoodOptions, build_likelihood

    likelihood = build_likelihood(LikelihoodOptions(name=spec, **lm_options), template, device=device)
    table = lm_table(examples, characters, likelihood)
    log.info(
        "%s: %d pairs from the log-likelihood cache, %d computed now",
        spec,
        likelihood.hits,
        likelihood.misses,
    )
    return table
