"""Persistent, resumable cache of the frozen LM's log-likelihoods in front of
:class:`~replugchar.lm.likelihood.LMLikelihood`.

Why: the LM's forward passes are where LSR spends its time and their inputs never change, so each (LM, template,
example, settings) pair is computed once, ever. Log-likelihoods live in Parquet shards under one folder per LM
fingerprint; each shard is written to a temp file and renamed, so a run killed at any point leaves only whole
shards, and a rerun recomputes only what no shard holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.atomic import atomic_file
from ..core.options import check_ranges
from .likelihood import LMLikelihood, LoglikRequest, Logliks, PromptTemplate
from .models import LMOptions

log = logging.getLogger(__name__)


def _example_digest(request: LoglikRequest) -> str:
    ex = request.example
    h = hashlib.sha1()
    for part in (ex.query, ex.response, *(f"{t.role}:{t.text}" for t in ex.context)):
        h.update(part.encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def settings_id(settings: Sequence[str]) -> str:
    """Content id of a setting combination; ``"none"`` for the empty prompt."""
    if not settings:
        return "none"
    return hashlib.sha1("\x1f".join(settings).encode()).hexdigest()[:16]


def request_key(request: LoglikRequest) -> str:
    return f"{request.example.example_id}|{_example_digest(request)}|{settings_id(request.settings)}"


class CachedLikelihood:
    """``loglik(requests)`` like :class:`LMLikelihood`, reading and filling the cache.

    Args:
        uncached: the frozen LM's own LMLikelihood; ``None`` makes a read-only cache that raises on a miss.
        cache_dir: root folder; ``None`` keeps log-likelihoods in memory only (tests, notebooks).
        shard_size: new log-likelihoods buffered before a shard is written.
        rank: process rank, part of shard names so DDP workers never write the same file.
    """

    def __init__(
        self,
        uncached: LMLikelihood | None,
        cache_dir: str | Path | None = None,
        *,
        fingerprint: str = "",
        shard_size: int = 256,
        rank: int = 0,
    ) -> None:
        self.uncached = uncached
        self.fingerprint = fingerprint or (uncached.fingerprint if uncached else "")
        if not self.fingerprint:
            raise ValueError("a read-only CachedLikelihood needs the fingerprint of the LM that filled it")
        self.folder = (
            Path(cache_dir) / hashlib.sha1(self.fingerprint.encode()).hexdigest()[:16] if cache_dir else None
        )
        self.shard_size = shard_size
        self.rank = rank
        self._logliks: dict[str, tuple[float, int]] = {}
        self._pending: dict[str, tuple[float, int]] = {}
        self._shards: set[str] = set()
        self.hits = 0
        self.misses = 0
        if self.folder is not None:
            self._load()

    def _load(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "FINGERPRINT").write_text(self.fingerprint + "\n", encoding="utf-8")
        self.refresh()

    def refresh(self) -> None:
        """Read the shards written since this cache was opened (other processes, other DDP ranks)."""
        if self.folder is None:
            return
        for shard in sorted(self.folder.glob("shard-*.parquet")):
            if shard.name in self._shards:
                continue
            self._shards.add(shard.name)
            try:
                table = pq.read_table(shard, columns=["key", "logp_sum", "n_tokens"])
                keys = table.column("key").to_pylist()
                sums = table.column("logp_sum").to_numpy()
                ns = table.column("n_tokens").to_numpy()
            except (pa.ArrowException, OSError, KeyError) as err:
                # a shard damaged outside our write path (disk full, copy): its pairs are computed again
                log.warning("log-likelihood cache: skipping unreadable shard %s (%s)", shard, err)
                continue
            ok = np.isfinite(sums) | (sums == -np.inf)  # NaN / +inf cannot be log-likelihoods
            if not ok.all():
                log.warning(
                    "log-likelihood cache: %s holds %d non-finite values; they will be recomputed",
                    shard,
                    int((~ok).sum()),
                )
            self._logliks.update(
                (k, (s, n)) for k, s, n, good in zip(keys, sums.tolist(), ns.tolist(), ok) if good
            )
        if self._logliks:
            log.info("log-likelihood cache %s: %d pairs loaded", self.folder, len(self._logliks))

    def __len__(self) -> int:
        return len(self._logliks)

    def __contains__(self, request: LoglikRequest) -> bool:
        return request_key(request) in self._logliks

    def loglik(self, requests: Sequence[LoglikRequest]) -> Logliks:
        keys = [request_key(r) for r in requests]
        missing: dict[str, LoglikRequest] = {}
        for k, r in zip(keys, requests):
            if k not in self._logliks and k not in missing:
                missing[k] = r
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        if missing:
            if self.uncached is None:
                raise KeyError(
                    f"{len(missing)} pairs are not in the log-likelihood cache {self.folder} (run `replugchar loglik`)"
                )
            fresh = self.uncached.loglik(list(missing.values()))
            for k, s, n in zip(missing, fresh.logp_sum.tolist(), fresh.n_tokens.tolist()):
                if not np.isfinite(s) and s != -np.inf:
                    raise FloatingPointError(
                        f"LM log-likelihood of {k} is {s}: check the LM's dtype and weights"
                    )
                self._logliks[k] = self._pending[k] = (s, n)
            if len(self._pending) >= self.shard_size:
                self.flush()
        values = [self._logliks[k] for k in keys]
        return Logliks(
            np.array([v[0] for v in values], dtype=np.float64),
            np.array([v[1] for v in values], dtype=np.int64),
        )

    def flush(self) -> None:
        """Write pending log-likelihoods as one shard: temp file + rename, so a kill leaves no partial shard."""
        if not self._pending or self.folder is None:
            self._pending.clear()
            return
        table = pa.table(
            {
                "key": list(self._pending),
                "logp_sum": [v[0] for v in self._pending.values()],
                "n_tokens": [v[1] for v in self._pending.values()],
            }
        )
        name = f"shard-r{self.rank}-{uuid.uuid4().hex[:12]}.parquet"
        with atomic_file(self.folder / name) as tmp:
            pq.write_table(table, tmp)
        self._shards.add(name)  # already in memory: refresh() need not read it back
        self._pending.clear()


CACHE_FOLDER = "logliks"
"""Name of the ``auto`` cache folder under $REPLUGCHAR_CACHE."""
_OLD_CACHE_FOLDER = "scores"
"""Its name in 0.1 (when "score" meant both the retrieval rule's output and this)."""


def resolve_cache_dir(option: str | None) -> Path | None:
    """``"auto"`` -> ``$REPLUGCHAR_CACHE/logliks``; a path -> that path; None -> no persistent cache.

    An ``auto`` cache filled before the rename (``$REPLUGCHAR_CACHE/scores``) is moved to the new name, once, by
    one ``rename``: hours of LM time are not thrown away for a name, and a kill cannot leave half of it behind."""
    from .models import cache_dir

    if option is None:
        return None
    if option != "auto":
        return Path(option).expanduser()
    new, old = cache_dir() / CACHE_FOLDER, cache_dir() / _OLD_CACHE_FOLDER
    if old.is_dir() and not new.exists():
        try:
            old.rename(new)
            log.info("log-likelihood cache moved from %s to %s", old, new)
        except OSError:  # another process (a DDP rank) moved it first, or the old one is read-only
            if not new.exists():
                return old
    return new


def _folder_digest(spec: str) -> str | None:
    """Content id of a local model folder: ``finetune-lm`` may rewrite the same folder, whose old log-likelihoods
    must then miss the cache. Sizes and the first MiB of each weight file: cheap, and changes with any retraining."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return None
    h = hashlib.sha1()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
    return "sha1:" + h.hexdigest()[:12]


@dataclass(frozen=True)
class LikelihoodOptions(LMOptions):
    """The frozen LM that supervises retrieval (``model.lm`` of ``fit``): which LM and how it loads
    (:class:`~replugchar.lm.models.LMOptions`), its batching and its log-likelihood cache. With the prompt template
    this is what a log-likelihood depends on (:meth:`record`, stored in retriever.json)."""

    max_batch_tokens: int = 4096
    """Token budget of one LM forward pass, padded tokens counted
    (:class:`~replugchar.lm.likelihood.LMLikelihood`)."""
    loglik_cache_dir: str | None = "auto"
    """Persistent folder of the LM's log-likelihoods: ``auto`` = $REPLUGCHAR_CACHE/logliks (default
    ~/.cache/replugchar/logliks); null keeps them in memory for this run only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges("model.lm", self, {"max_batch_tokens": self.max_batch_tokens > 0})

    def record(self, template: PromptTemplate) -> dict[str, Any]:
        """The retriever.json ``"scorer"`` record, which ``evaluate`` and ``chat`` default to. It keeps the key
        names of export format 1 (``lm``, ``lm_revision``, ``lm_dtype``, ``lm_batch_tokens``, ...), so exports
        written before the option groups and after them read the same."""
        return {
            "lm": self.name,
            "lm_revision": self.revision,
            "lm_dtype": self.dtype,
            "template": dataclasses.asdict(template),
            "max_length": self.max_length,
            "lm_batch_tokens": self.max_batch_tokens,
            "trust_remote_code": self.trust_remote_code,
        }


def build_likelihood(
    options: LikelihoodOptions,
    template: PromptTemplate | dict | None = None,
    *,
    device: str = "cpu",
    rank: int = 0,
) -> CachedLikelihood:
    """The frozen LM behind its log-likelihood cache: the one constructor used by ``fit``, ``evaluate`` and the
    tools, so a pair computed by one is a cache hit for the others."""
    from .models import load_causal_lm

    if isinstance(template, dict):
        template = PromptTemplate(**template)
    model, tok = load_causal_lm(
        options.name,
        dtype=options.resolved_dtype(device),
        revision=options.revision,
        trust_remote_code=options.trust_remote_code,
        device=str(device),
    )
    lm = LMLikelihood(
        model,
        tok,
        template,
        max_length=options.max_length,
        max_batch_tokens=options.max_batch_tokens,
        lm_key=f"{options.name}@{options.revision or _folder_digest(options.name) or 'main'}",
    )
    return CachedLikelihood(lm, resolve_cache_dir(options.loglik_cache_dir), rank=rank)
