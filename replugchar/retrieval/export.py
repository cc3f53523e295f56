"""Export a trained retriever as one folder that other RAG stacks load without replugchar.

Layout (all standard formats, no pickle)::

    encoder/          plain sentence-transformers folder (safetensors) + model card (README.md)
    index.faiss       FAISS index over [embedding, prior] vectors (see replugchar.retrieval.index)
    settings.jsonl    setting_id <-> character_id, index_in_character, text, prior
    index.json        index metadata (kind, dim, encoder fingerprint)
    manifest.json     sha256 and size of every other file (checked by Retriever.load)
    retriever.json    format, k, the scoring rule (dialogue-evidence weights, λ, τ, history window), the scorer's LM and
                      template, models, versions, training characters, metrics

The folder is assembled under a temp name and renamed into place: it is visible whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_folder
from ..core.scoring import FEATURES, ScoringRule
from .export_schema import FORMAT, write_manifest
from .index import SettingIndex, encoder_fingerprint, setting_records

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("replugchar", "torch", "transformers", "sentence-transformers", "faiss-cpu", "lightning"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _model_card(hp: dict, metrics: dict[str, float], rule: ScoringRule) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    weights = "\n".join(f"| {f} | {w:+.4f} |" for f, w in zip(FEATURES, rule.weights))
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, retrieval, replugchar, replug-lsr, role-play]
---
# replugchar setting retriever

A sentence-transformers bi-encoder fine-tuned with **LM-supervised retrieval** (REPLUG LSR, Shi et al. 2023) to
rank a role-play character's settings by how much they help a frozen LM produce the character's replies.

- Base encoder: `{hp.get("encoder")}`
- Frozen LM (supervision only, not included): `{hp.get("lm")}`
- Loss: LSRLoss, {hp.get("kl_direction")}, γ={hp.get("gamma")}, β={hp.get("beta")}, k={hp.get("k")}, LM target = {hp.get("lm_score")} log-likelihood
- Query text: {hp.get("query_text")}
- Training data: {hp.get("data_dir", "see retriever.json")}

## Scoring rule (retriever.json, "scoring")
score(s) = cos(query, s) + Σ_f w_f·φ_f(s | last {rule.history_window} turns) + λ·prior(s), λ = {rule.prior_weight},
threshold τ = {rule.threshold}. φ: closest / latest similarity of the setting to the character's own earlier turns
(own_*) and to the partner's (partner_*). All w = 0 and λ = 0 is plain cosine similarity of this encoder.

| feature | w |
|---|---|
{weights}

This encoder alone (e.g. in LangChain's `HuggingFaceEmbeddings`) gives the cosine term only; the replugchar
`Retriever` and `ReplugcharRetriever` (LangChain) apply the whole rule.

## Validation metrics at export
| metric | value |
|---|---|
{rows}

## Use
```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/export/encoder")
emb = model.encode(["Hello!"], normalize_embeddings=True)
```
Pair it with `../index.faiss` and `../settings.jsonl` (see the replugchar README).
"""


def export_retriever(
    module,
    out_dir: str | Path,
    *,
    priors: np.ndarray | None = None,
    rule: ScoringRule | None = None,
    kind: str = "flat",
    metrics: dict[str, float] | None = None,
    data_dir: str | None = None,
    train_characters: list[str] | None = None,
) -> Path:
    """Write the export folder for ``module`` (an :class:`~replugchar.training.module.LSRModule`) over its characters.

    ``rule`` defaults to the module's learned weights with λ = 0 and no threshold (``priors fit-weight`` fits
    those on validation characters)."""
    out = Path(out_dir)
    rule = rule or module.rule
    records = setting_records(module.characters)
    fingerprint = encoder_fingerprint(lambda t: module.encode_all(t))
    index = SettingIndex.build(
        module.encode_all([r.text for r in records]),
        records,
        priors,
        kind=kind,
        encoder_fingerprint=fingerprint,
    )
    hp = {**dict(module.hparams), "data_dir": data_dir}
    with atomic_folder(out) as tmp:
        module.encoder.save(str(tmp / "encoder"), create_model_card=False)
        (tmp / "encoder" / "README.md").write_text(_model_card(hp, metrics or {}, rule), encoding="utf-8")
        if module.query_encoder is not None:
            module.query_encoder.save(str(tmp / "query_encoder"), create_model_card=False)
        index.write_files(tmp)
        scorer = {k: v for k, v in module.scorer_config().items() if k != "trust_remote_code"}
        config = {
            "format": FORMAT,
            "k": module.hparams.k,
            "scoring": rule.to_dict(),
            "query_text": module.hparams.query_text,
            "separate_query_encoder": module.query_encoder is not None,
            "template": dataclasses.asdict(module.template),
            "scorer": scorer,  # what evaluate/chat default to; trust_remote_code is never stored
            "encoder_base": module.hparams.encoder,
            "lm": module.hparams.lm,
            "encoder_fingerprint": fingerprint,
            "metrics": metrics or {},
            "train_characters": train_characters or [],
            "versions": _versions(),
        }
        (tmp / "retriever.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        write_manifest(tmp)  # last: it lists every other file
    log.info("retriever exported to %s", out)
    return out
