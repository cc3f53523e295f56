"""The FAISS index of settings, with the generality prior blended in exactly.

score(q, s) = cos(q, s) + λ·g(s) is computed *inside* FAISS: each setting vector is stored as [e_s, g(s)] and
each query is sent as [e_q, λ], so the inner product is the blended score for Flat, IVF and HNSW alike, and λ
is a query-time knob (λ = 0 is plain cosine retrieval). Settings of one character have contiguous ids, so a
search restricted to one character is a FAISS ``IDSelectorRange``. One builder serves the training refresh,
``replugchar index`` and export.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from .data import Character
from .models import atomic_dir, publish_dir

IndexKind = Literal["flat", "ivf", "hnsw"]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SettingRecord:
    setting_id: int
    character_id: str
    index_in_character: int
    text: str


def setting_records(characters: dict[str, Character]) -> list[SettingRecord]:
    """Global setting ids, contiguous per character, in the characters' order."""
    out: list[SettingRecord] = []
    for cid, char in characters.items():
        for i, text in enumerate(char.settings):
            out.append(SettingRecord(len(out), cid, i, text))
    return out


class SettingIndex:
    def __init__(self, index: faiss.Index, records: list[SettingRecord], priors: np.ndarray, meta: dict) -> None:
        self.index = index
        self.records = records
        self.priors = priors  # (n,) float32, zeros when no prior
        self.meta = meta
        self.ranges: dict[str, tuple[int, int]] = {}
        for r in records:
            lo, hi = self.ranges.get(r.character_id, (r.setting_id, r.setting_id))
            if hi != r.setting_id:  # a range search would then return other characters' settings
                raise ValueError(f"settings of character '{r.character_id}' must have contiguous setting ids, "
                                 f"got {r.setting_id} after {hi - 1}")
            self.ranges[r.character_id] = (lo, r.setting_id + 1)

    @property
    def dim(self) -> int:
        """Embedding dimension (without the prior coordinate)."""
        return self.index.d - 1

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        records: Sequence[SettingRecord],
        priors: np.ndarray | None = None,
        *,
        kind: IndexKind = "flat",
        nlist: int | None = None,
        hnsw_m: int = 32,
        encoder_fingerprint: str = "",
    ) -> SettingIndex:
        """Index (n, d) L2-normalised ``embeddings`` of ``records`` with optional (n,) ``priors``."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, d = emb.shape
        if n != len(records):
            raise ValueError(f"{n} embeddings for {len(records)} settings")
        prior = np.zeros(n, dtype=np.float32) if priors is None else np.asarray(priors, dtype=np.float32)
        if prior.shape != (n,) or not np.isfinite(prior).all():
            raise ValueError("priors must be a finite vector with one value per setting")
        vectors = np.concatenate([emb, prior[:, None]], axis=1)  # (n, d+1)
        if kind == "flat":
            index = faiss.IndexFlatIP(d + 1)
        elif kind == "ivf":
            nlist = nlist or max(1, int(4 * np.sqrt(n)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d + 1), d + 1, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d + 1, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"index kind must be flat, ivf or hnsw, got {kind!r}")
        index.add(vectors)
        meta = {"format": FORMAT_VERSION, "kind": kind, "dim": d, "n": n, "has_prior": priors is not None,
                "encoder_fingerprint": encoder_fingerprint}
        return cls(index, list(records), prior, meta)

    def _params(self, lo: int, hi: int, nprobe: int, ef_search: int):
        sel = faiss.IDSelectorRange(lo, hi)
        kind = self.meta["kind"]
        if kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe), sel
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search), sel
        return faiss.SearchParameters(sel=sel), sel

    def query_vectors(self, query_emb: np.ndarray, prior_weight: float) -> np.ndarray:
        q = np.ascontiguousarray(query_emb, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have shape {q.shape}, the index expects (*, {self.dim})")
        return np.concatenate([q, np.full((len(q), 1), prior_weight, dtype=np.float32)], axis=1)

    def search(
        self,
        query_emb: np.ndarray,
        k: int,
        *,
        character_ids: Sequence[str] | None = None,
        prior_weight: float = 0.0,
        nprobe: int = 16,
        ef_search: int = 64,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, setting ids) per query, -1 where fewer exist; restricted to each query's character."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        qv = self.query_vectors(query_emb, prior_weight)
        if character_ids is None:
            if self.meta["kind"] == "ivf":
                self.index.nprobe = nprobe
            elif self.meta["kind"] == "hnsw":
                self.index.hnsw.efSearch = ef_search
            return self.index.search(qv, k)
        if len(character_ids) != len(qv):
            raise ValueError(f"{len(qv)} queries but {len(character_ids)} character ids")
        scores = np.full((len(qv), k), -np.inf, dtype=np.float32)
        ids = np.full((len(qv), k), -1, dtype=np.int64)
        for row, cid in enumerate(character_ids):
            if cid not in self.ranges:
                raise KeyError(f"unknown character '{cid}' (not in the index)")
            lo, hi = self.ranges[cid]
            params, _sel = self._params(lo, hi, nprobe, ef_search)  # keep _sel alive during the search
            s, i = self.index.search(qv[row : row + 1], min(k, hi - lo), params=params)
            scores[row, : s.shape[1]], ids[row, : i.shape[1]] = s[0], i[0]
        return scores, ids

    # ------------------------------------------------------------------------------------------- files
    def write_files(self, folder: Path) -> None:
        """index.faiss + settings.jsonl + index.json into an existing (temp) folder."""
        faiss.write_index(self.index, str(folder / "index.faiss"))
        with (folder / "settings.jsonl").open("w", encoding="utf-8") as f:
            for r, g in zip(self.records, self.priors.tolist()):
                f.write(json.dumps({"setting_id": r.setting_id, "character_id": r.character_id,
                                    "index_in_character": r.index_in_character, "text": r.text,
                                    "prior": g}, ensure_ascii=False) + "\n")
        (folder / "index.json").write_text(json.dumps(self.meta, indent=2))

    def save(self, folder: str | Path) -> None:
        """Write the index files; the folder appears whole or not at all (temp folder + rename)."""
        folder = Path(folder)
        tmp = atomic_dir(folder)
        try:
            self.write_files(tmp)
            publish_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | Path, *, expected_dim: int | None = None) -> SettingIndex:
        folder = Path(folder)
        meta_path = folder / "index.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{folder}: no index.json (not a replugchar index folder)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{meta_path}: unsupported index format {fmt}")
        if not isinstance(meta.get("dim"), int) or meta.get("kind") not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"{meta_path}: fields 'dim' (int) and 'kind' (flat/ivf/hnsw) are required")
        if expected_dim is not None and meta["dim"] != expected_dim:
            raise ValueError(
                f"{meta_path}: index was built with {meta['dim']}-d embeddings but the encoder gives "
                f"{expected_dim}-d: rebuild it with `replugchar index` for this encoder"
            )
        faiss_path = folder / "index.faiss"
        if not faiss_path.is_file():
            raise FileNotFoundError(f"{faiss_path}: missing (incomplete index folder)")
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as err:  # faiss reports a truncated or foreign file as a C++ exception
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(f"{faiss_path}: not a readable FAISS index ({first})") from None
        records, priors = [], []
        settings_path = folder / "settings.jsonl"
        if not settings_path.is_file():
            raise FileNotFoundError(f"{settings_path}: missing (incomplete index folder)")
        with settings_path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{settings_path}:{lineno}"
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    records.append(SettingRecord(int(rec["setting_id"]), str(rec["character_id"]),
                                                 int(rec["index_in_character"]), str(rec["text"])))
                    priors.append(float(rec.get("prior", 0.0)))
                except UnicodeDecodeError as err:
                    raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
                except (AttributeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{where}: bad record ({type(err).__name__}: {err})") from None
                if records[-1].setting_id != len(records) - 1:
                    raise ValueError(f"{where}: setting ids must be 0..n-1 in order")
                if not np.isfinite(priors[-1]):
                    raise ValueError(f"{where}: field 'prior' must be finite, got {priors[-1]}")
        if index.ntotal != len(records) or index.d != meta["dim"] + 1:
            raise ValueError(f"{folder}: index.faiss holds {index.ntotal}x{index.d - 1} vectors but the id map "
                             f"{len(records)} settings of dim {meta['dim']}")
        try:
            return cls(index, records, np.asarray(priors, dtype=np.float32), meta)
        except ValueError as err:
            raise ValueError(f"{settings_path}: {err}") from None
