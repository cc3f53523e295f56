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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_folder
from ..core.scoring import FEATURES, ScoringRule
from .export_schema import FORMAT, MANIFEST, write_manifest
from .index import SettingIndex, SettingRecord, encoder_fingerprint, setting_records

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
    """The encoder's README.md from the module's hparams (option groups as dicts: ``lm``, ``loss``, ...)."""
    lm, loss = hp.get("lm") or {}, hp.get("loss") or {}
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
- Frozen LM (supervision only, not included): `{lm.get("name")}`
- Loss: LSRLoss, {loss.get("direction")}, γ={loss.get("gamma")}, β={loss.get("beta")}, k={hp.get("k")}, LM target = {loss.get("lm_loglik")} log-likelihood
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


def blended_priors(emb: np.ndarray, priors: np.ndarray | None, rule: ScoringRule) -> np.ndarray | None:
    """The index's prior coordinate G(s) = imported prior + learned generality v·e_s (see
    :class:`~replugchar.core.scoring.ScoringRule`): computed from each setting's text, so rebuilding the index
    is what gives a new character its generality."""
    if not rule.uses_generality:
        return priors
    g = np.asarray(emb, dtype=np.float64) @ np.asarray(rule.generality, dtype=np.float64)
    return g if priors is None else np.asarray(priors, dtype=np.float64) + g


def add_characters(folder: str | Path, characters: dict, *, out: str | Path | None = None) -> Path:
    """Add ``characters`` to an export folder without retraining: their settings are embedded with the
    folder's encoder and get the folder's learned generality; the index, settings.jsonl and the manifest are
    rewritten, the whole folder replaced atomically (``out`` = another folder instead)."""
    import shutil

    from .retriever import Retriever

    folder = Path(folder)
    retriever = Retriever.load(folder)
    index = retriever.index
    clash = sorted(set(characters) & set(index.ranges))
    if clash:
        raise ValueError(f"{folder}: already holds character(s) {', '.join(clash[:5])}")
    records, n0 = list(index.records), len(index.records)
    for cid, char in characters.items():
        for i, text in enumerate(char.settings):
            records.append(SettingRecord(len(records), cid, i, text))
    new = records[n0:]
    emb_new = retriever.embed_settings([r.text for r in new])
    emb_old = np.asarray(index.index.reconstruct_n(0, n0))[:, :-1] if n0 else emb_new[:0]
    g_new = blended_priors(emb_new, None, retriever.rule)
    priors = np.concatenate([index.priors, np.zeros(len(new)) if g_new is None else g_new])
    kind = index.meta["kind"]
    extra = {k: index.meta[k] for k in ("hnsw_m", "hnsw_ef_construction") if k in index.meta}
    rebuilt = SettingIndex.build(
        np.concatenate([emb_old, emb_new]),
        records,
        priors if (index.meta.get("has_prior") or g_new is not None) else None,
        kind=kind,
        encoder_fingerprint=index.meta.get("encoder_fingerprint", ""),
        **extra,
    )
    target = Path(out) if out else folder
    with atomic_folder(target) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        (tmp / MANIFEST).unlink()
        rebuilt.write_files(tmp)
        write_manifest(tmp)
    log.info("%d character(s), %d settings added to %s", len(characters), len(new), target)
    return target


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
    split: dict | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the export folder for ``module`` (an :class:`~replugchar.training.module.LSRModule`) over its characters.

    ``rule`` defaults to the module's learned weights with λ = 0 and no threshold (``priors fit-weight`` fits
    those on validation characters). ``extra(folder)`` writes more files into the folder before its manifest
    (``export --priors`` keeps the priors table there): a file added after the manifest would make the folder
    fail to load."""
    out = Path(out_dir)
    rule = rule or module.rule
    records = setting_records(module.characters)
    fingerprint = encoder_fingerprint(lambda t: module.encode_all(t))
    emb = module.encode_all([r.text for r in records])
    index = SettingIndex.build(
        emb, records, blended_priors(emb, priors, rule), kind=kind, encoder_fingerprint=fingerprint
    )
    hp = {**dict(module.hparams), "data_dir": data_dir}
    with atomic_folder(out) as tmp:
        module.encoder.save(str(tmp / "encoder"), create_model_card=False)
        (tmp / "encoder" / "README.md").write_text(_model_card(hp, metrics or {}, rule), encoding="utf-8")
        if module.query_encoder is not None:
            module.query_encoder.save(str(tmp / "query_encoder"), create_model_card=False)
        index.write_files(tmp)
        lm_record = {k: v for k, v in module.lm_record().items() if k != "trust_remote_code"}
        config = {
            "format": FORMAT,
            "k": module.hparams.k,
            "scoring": rule.to_dict(),
            "query_text": module.hparams.query_text,
            "separate_query_encoder": module.query_encoder is not None,
            "template": dataclasses.asdict(module.template),
            "scorer": lm_record,  # the frozen LM: what evaluate/chat default to; trust_remote_code is never stored
            "encoder_base": module.hparams.encoder,
            "lm": module.lm_options.name,
            "encoder_fingerprint": fingerprint,
            "metrics": metrics or {},
            "train_characters": train_characters or [],
            "split": split or {},  # the character split of training: evaluate reads it, never re-declares it
            "versions": _versions(),
        }
        (tmp / "retriever.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        if extra is not None:
            extra(tmp)
        write_manifest(tmp)  # last: it lists every other file
    log.info("retriever exported to %s", out)
    return out
