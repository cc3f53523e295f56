"""The FAISS index of settings, with the generality prior blended in exactly.

score(q, s) = cos(q, s) + λ·G(s) is computed *inside* FAISS: each setting vector is stored as [e_s, c·G(s)] and
each query is sent as [e_q, λ/c], so the inner product is the blended score for Flat, IVF and HNSW alike, and λ
is a query-time knob (λ = 0 is plain cosine retrieval). The prior scale c = 1/√d (``prior_scale`` in index.json) puts the prior coordinate on the scale of one
embedding coordinate: with c = 1 a z-normalised prior dominates IVF's k-means (lists 17x unbalanced at 10^4
settings in benchmarks/index_scale.py) and HNSW's graph. Settings of one character have contiguous ids, so a
search restricted to one character is exact for every kind: a FAISS search with an id selector
(``IDSelectorRange``) for Flat, for HNSW (its flat storage) and for IVF (over just the lists that hold the
character's settings); the ANN structures pay for searches across characters. One builder serves the training refresh,
``replugchar index`` and export.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from ..core.atomic import atomic_folder
from ..core.data import Character

IndexKind = Literal["flat", "ivf", "hnsw"]
FORMAT_VERSION = 1
PROBE = "replugchar encoder fingerprint: Hello! How are you today?"


def encoder_fingerprint(embed) -> str:
    """Hash of one probe embedding (rounded): tells whether an index and an encoder belong together."""
    v = np.asarray(embed([PROBE]), dtype=np.float32).reshape(-1)
    return hashlib.sha1(np.round(v, 3).tobytes()).hexdigest()[:16]


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
    def __init__(
        self, index: faiss.Index, records: list[SettingRecord], priors: np.ndarray, meta: dict
    ) -> None:
        self.index = index
        self.records = records
        self.priors = priors  # (n,) float32, zeros when no prior
        self.meta = meta
        self._vectors: dict[str, np.ndarray] = {}
        self._lists: dict[str, np.ndarray] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        for r in records:
            lo, hi = self.ranges.get(r.character_id, (r.setting_id, r.setting_id))
            if hi != r.setting_id:  # a range search would then return other characters' settings
                raise ValueError(
                    f"settings of character '{r.character_id}' must have contiguous setting ids, "
                    f"got {r.setting_id} after {hi - 1}"
                )
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
        hnsw_ef_construction: int = 200,
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
        scale = 1.0 / np.sqrt(d)
        vectors = np.concatenate([emb, scale * prior[:, None]], axis=1)  # (n, d+1)
        if kind == "flat":
            index = faiss.IndexFlatIP(d + 1)
        elif kind == "ivf":
            # ~4√n lists, but never more than n/39 (FAISS's minimum training points per list)
            nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
            if not 1 <= nlist <= n:
                raise ValueError(f"index nlist must be in [1, {n}] for {n} settings, got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d + 1), d + 1, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d + 1, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw_ef_construction  # FAISS's default 40 gives a poorer graph
        else:
            raise ValueError(f"index kind must be flat, ivf or hnsw, got {kind!r}")
        index.add(vectors)
        if kind == "ivf":
            index.make_direct_map()  # reconstruct() for per-character search
        meta = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "dim": d,
            "n": n,
            "has_prior": priors is not None,
            "prior_scale": scale,
            "encoder_fingerprint": encoder_fingerprint,
        }
        if kind == "hnsw":
            meta.update(hnsw_m=hnsw_m, hnsw_ef_construction=hnsw_ef_construction)
        return cls(index, list(records), prior, meta)

    def character_vectors(self, character_id: str) -> np.ndarray:
        """The stored (n_settings, d+1) vectors of one character, read back from FAISS (cached)."""
        if character_id not in self.ranges:
            raise KeyError(f"unknown character '{character_id}' (not in the index)")
        if character_id not in self._vectors:
            lo, hi = self.ranges[character_id]
            self._vectors[character_id] = self.index.reconstruct_n(lo, hi - lo)
        return self._vectors[character_id]

    def query_vectors(self, query_emb: np.ndarray, prior_weight: float) -> np.ndarray:
        q = np.ascontiguousarray(query_emb, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have shape {q.shape}, the index expects (*, {self.dim})")
        weight = prior_weight / self.meta.get("prior_scale", 1.0)
        return np.concatenate([q, np.full((len(q), 1), weight, dtype=np.float32)], axis=1)

    def search(
        self,
        query_emb: np.ndarray,
        k: int,
        *,
        character_ids: Sequence[str] | None = None,
        prior_weight: float = 0.0,
        nprobe: int = 16,
        ef_search: int = 256,
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
        # A character's settings have contiguous ids: FAISS searches only them (an id selector). IVF scans just
        # the lists that hold them, and HNSW's restricted graph walk can miss some of a few ids, so it searches
        # its flat storage of the same vectors: exact, and what `index --kind` builds still serves every search.
        scores = np.full((len(qv), k), -np.inf, dtype=np.float32)
        ids = np.full((len(qv), k), -1, dtype=np.int64)
        for row, cid in enumerate(character_ids):
            if cid not in self.ranges:
                raise KeyError(f"unknown character '{cid}' (not in the index)")
            lo, hi = self.ranges[cid]
            sel = faiss.IDSelectorRange(lo, hi)
            kind, n = self.meta["kind"], min(k, hi - lo)
            if kind == "ivf":
                d, i = self._ivf_character_search(qv[row : row + 1], cid, n)
            else:
                index = faiss.downcast_index(self.index.storage) if kind == "hnsw" else self.index
                d, i = index.search(qv[row : row + 1], n, params=faiss.SearchParameters(sel=sel))  # (1, n)
            scores[row, :n], ids[row, :n] = d[0], i[0]
        return scores, ids

    def _ivf_character_search(
        self, query: np.ndarray, character_id: str, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` of one character from IVF: only the lists that hold its settings (found through the direct
        map) are scanned, with the character's id selector. Exact, at about flat's cost, where probing every list
        cost O(all settings): 0.04x flat's queries/s at 10^5 settings (benchmarks/index_scale.py).

        ``search_preassigned_c`` is FAISS's own C++ ``search_preassigned``, which takes search parameters (the
        Python wrapper of the same name refuses them, and without the selector it would have to return whole
        lists to be filtered here: 8x slower in that benchmark)."""
        lo, hi = self.ranges[character_id]
        if character_id not in self._lists:
            lists = {faiss.lo_listno(self.index.direct_map.get(i)) for i in range(lo, hi)}
            self._lists[character_id] = np.array(sorted(lists), dtype=np.int64)[None]  # (1, n_lists)
        lists = self._lists[character_id]
        params = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(lo, hi), nprobe=lists.shape[1])
        q = np.ascontiguousarray(query, dtype=np.float32)
        coarse = np.zeros(lists.shape, dtype=np.float32)  # IVFFlat scores the vectors themselves: unused
        d, i = np.empty((1, n), dtype=np.float32), np.empty((1, n), dtype=np.int64)
        ptr = faiss.swig_ptr
        self.index.search_preassigned_c(1, ptr(q), n, ptr(lists), ptr(coarse), ptr(d), ptr(i), False, params)
        return d, i

    # ------------------------------------------------------------------------------------------- files
    def write_files(self, folder: Path) -> None:
        """index.faiss + settings.jsonl + index.json into an existing (temp) folder."""
        faiss.write_index(self.index, str(folder / "index.faiss"))
        with (folder / "settings.jsonl").open("w", encoding="utf-8") as f:
            for r, g in zip(self.records, self.priors.tolist()):
                f.write(
                    json.dumps(
                        {
                            "setting_id": r.setting_id,
                            "character_id": r.character_id,
                            "index_in_character": r.index_in_character,
                            "text": r.text,
                            "prior": g,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        (folder / "index.json").write_text(json.dumps(self.meta, indent=2), encoding="utf-8")

    def save(self, folder: str | Path) -> None:
        """Write the index files; the folder appears whole or not at all (temp folder + rename)."""
        with atomic_folder(folder) as tmp:
            self.write_files(tmp)

    @classmethod
    def load(cls, folder: str | Path, *, expected_dim: int | None = None) -> SettingIndex:
        """The index of ``folder`` (index.json, index.faiss, settings.jsonl), each file checked: a bad file is a
        ``ValueError`` / ``FileNotFoundError`` that names it, never a FAISS crash or a silent mismatch."""
        folder = Path(folder)
        meta = _read_meta(folder / "index.json", expected_dim)
        index = _read_faiss(folder / "index.faiss")
        settings_path = folder / "settings.jsonl"
        records, priors = _read_settings(settings_path)
        if index.ntotal != len(records) or index.d != meta["dim"] + 1:
            raise ValueError(
                f"{folder}: index.faiss holds {index.ntotal}x{index.d - 1} vectors but the id map "
                f"{len(records)} settings of dim {meta['dim']}"
            )
        try:
            return cls(index, records, np.asarray(priors, dtype=np.float32), meta)
        except ValueError as err:
            raise ValueError(f"{settings_path}: {err}") from None


def _read_meta(meta_path: Path, expected_dim: int | None) -> dict:
    """index.json: format version, embedding dim (the encoder's, if ``expected_dim``) and kind."""
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path.parent}: no index.json (not a replugchar index folder)")
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
    return meta


def _read_faiss(faiss_path: Path):
    if not faiss_path.is_file():
        raise FileNotFoundError(f"{faiss_path}: missing (incomplete index folder)")
    try:
        return faiss.read_index(str(faiss_path))
    except RuntimeError as err:  # faiss reports a truncated or foreign file as a C++ exception
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{faiss_path}: not a readable FAISS index ({first})") from None


def _read_settings(settings_path: Path) -> tuple[list[SettingRecord], list[float]]:
    """settings.jsonl: one record per setting, ids 0..n-1 in order, finite priors; an error names its line."""
    if not settings_path.is_file():
        raise FileNotFoundError(f"{settings_path}: missing (incomplete index folder)")
    records: list[SettingRecord] = []
    priors: list[float] = []
    with settings_path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{settings_path}:{lineno}"
            record, prior = _setting_line(raw, where)
            if record.setting_id != len(records):
                raise ValueError(f"{where}: setting ids must be 0..n-1 in order")
            if not np.isfinite(prior):
                raise ValueError(f"{where}: field 'prior' must be finite, got {prior}")
            records.append(record)
            priors.append(prior)
    return records, priors


def _setting_line(raw: bytes, where: str) -> tuple[SettingRecord, float]:
    try:
        rec = json.loads(raw.decode("utf-8"))
        record = SettingRecord(
            int(rec["setting_id"]), str(rec["character_id"]), int(rec["index_in_character"]), str(rec["text"])
        )
        return record, float(rec.get("prior", 0.0))
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad record ({type(err).__name__}: {err})") from None
