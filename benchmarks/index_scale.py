"""FAISS setting index at scale: build time, queries/s, recall@10 vs exact search, and memory, per index kind.

For each size n (default 10^4, 10^5, 10^6 settings) this builds :class:`replugchar.retrieval.index.SettingIndex` with the
generality prior dimension (unit embeddings of dimension ``--dim``, random z-scored priors, 10 settings per
character) as ``flat`` (exact), ``ivf`` and ``hnsw``, and searches a batch of unit queries unrestricted
with ``SettingIndex.search(q, 10, prior_weight=0.1)``. Recall@10 is measured against the flat index (exact).
``nprobe`` (IVF) and ``efSearch`` (HNSW) are swept; the table reports the package defaults (``SettingIndex.search``'s
``nprobe`` and ``ef_search``, read from its signature: 16 and 256) and the fastest setting that reaches
recall@10 >= 0.95, with its speed-up over flat.

It also times the path that serves (``Retriever.search``): one character's settings per query, through
``SettingIndex.search(..., character_ids=...)`` (a FAISS id selector), ``--character_queries`` queries, one at a
time as a chat turn asks, and checks that every kind returns exactly flat's per-character top-k (it must: the
selector search is exact for Flat, for IVF over the lists that hold the character and for HNSW's flat storage). So the table
says what the index kind costs the serving path as n grows, beside what it buys pool-wide search.

``--vectors clustered`` (default) draws settings and queries from a mixture of Gaussians on the unit sphere, one
centre per ``--cluster_size`` (100) settings, with per-vector noise so that the mean cosine to the own centre is
about ``--cluster_cos`` (0.65): a stand-in for sentence embeddings, which are clustered by topic.
``--vectors random`` draws uniform random unit vectors: a worst case for IVF and HNSW (no cluster structure,
distances concentrate).

    python benchmarks/index_scale.py --sizes 10000 --queries 200        # smoke run
    python benchmarks/index_scale.py --sizes 10000,100000 --threads 16 --json index_small.json
    python benchmarks/index_scale.py --sizes 1000000 --nlist 1024 --threads 16 --json index_1e6.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import threading
import time
from collections.abc import Callable

import faiss
import numpy as np

from replugchar.core.atomic import write_text
from replugchar.retrieval.index import SettingIndex, SettingRecord

K = 10
RECALL_TARGET = 0.95
SETTINGS_PER_CHARACTER = 10
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EF_SEARCHES = (10, 16, 32, 64, 128, 256, 512, 1024)


def search_defaults() -> dict[str, dict[str, int]]:
    """The search parameters ``SettingIndex.search`` uses when not given, per index kind (from its signature)."""
    params = inspect.signature(SettingIndex.search).parameters
    return {
        "ivf": {"nprobe": params["nprobe"].default},
        "hnsw": {"ef_search": params["ef_search"].default},
        "flat": {},
    }


DEFAULTS = search_defaults()
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the wall-clock time and the seconds since the script started."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


class PeakRSS:
    """Process RSS at entry, at exit and its peak in between (sampled every 2 ms by a thread), in MiB;
    ``None`` figures when psutil is not installed."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self._proc = None
        else:
            self._proc = psutil.Process()
        self.delta_mib = self.peak_delta_mib = None

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        if self._proc is None:
            return self
        self.start = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._stop.set()
        self._thread.join()
        self.end = self._proc.memory_info().rss
        self.peak = max(self._peak, self.end)
        self.delta_mib = (self.end - self.start) / 2**20  # what the built index keeps
        self.peak_delta_mib = (self.peak - self.start) / 2**20  # what building it needs


def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) uniform random unit vectors, drawn in chunks so that the temporaries stay small at 10^6 settings."""
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - lo), dim), dtype=np.float32)
        out[lo : lo + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def clustered_vectors(
    rng: np.random.Generator,
    centres: np.ndarray,
    n: int,
    cluster_cos: float,
    chunk: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors ``normalise(c + s·z)`` around random ``centres`` (z ~ N(0, I/dim), so |z| ≈ 1) and
    the cosine of each to its own centre. The noise scale s varies per vector (uniform in 0.7 … 1.3 times
    √(1/cluster_cos² − 1)), so the cosine to the own centre spreads around ``cluster_cos`` (tight and loose
    members, as topics in real embeddings)."""
    dim = centres.shape[1]
    base = np.sqrt(1.0 / cluster_cos**2 - 1.0)
    out = np.empty((n, dim), dtype=np.float32)
    cos = np.empty(n, dtype=np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        c = centres[rng.integers(0, len(centres), m)]
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        scale = (base * rng.uniform(0.7, 1.3, m)).astype(np.float32)
        block = c + scale[:, None] * noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo : lo + m] = block
        cos[lo : lo + m] = np.einsum("ij,ij->i", block, c)
    return out, cos


def make_vectors(rng: np.random.Generator, n: int, args) -> tuple[np.ndarray, np.ndarray, dict]:
    """Setting embeddings (n, dim), query embeddings (queries, dim) and a description of how they were drawn."""
    if args.vectors == "random":
        return (
            unit_vectors(rng, n, args.dim),
            unit_vectors(rng, args.queries, args.dim),
            {"vectors": "random"},
        )
    centres = unit_vectors(rng, max(1, n // args.cluster_size), args.dim)
    emb, cos = clustered_vectors(rng, centres, n, args.cluster_cos)
    queries, qcos = clustered_vectors(rng, centres, args.queries, args.cluster_cos)  # the same centres
    sample = emb[rng.choice(n, size=min(n, 2000), replace=False)]
    pair = sample @ sample.T
    info = {
        "vectors": "clustered",
        "centres": len(centres),
        "cos_to_own_centre_mean": float(cos.mean()),
        "cos_to_own_centre_p5_p95": [float(np.percentile(cos, 5)), float(np.percentile(cos, 95))],
        "query_cos_to_own_centre_mean": float(qcos.mean()),
        "cos_random_pairs_mean": float(pair[np.triu_indices(len(sample), 1)].mean()),
    }
    return emb, queries, info


def recall_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |top-k ∩ exact top-k| / k."""
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(ids, truth)]))


def timed_search(index: SettingIndex, queries: np.ndarray, args, **params) -> tuple[float, np.ndarray]:
    """Queries per second (best of ``args.repeats`` batched searches) and the result ids."""
    best, ids = float("inf"), None
    for _ in range(args.repeats):
        t = time.perf_counter()
        _, ids = index.search(queries, K, prior_weight=args.prior_weight / args.prior_scale, **params)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, ids


def timed_character_search(
    index: SettingIndex, queries: np.ndarray, characters: list[str], args
) -> tuple[float, np.ndarray, np.ndarray]:
    """Per-character queries/s (one query per call, best of ``args.repeats``), and the (scores, ids) found."""
    best, scores, ids = float("inf"), None, None
    weight = args.prior_weight / args.prior_scale
    for _ in range(args.repeats):
        found = []
        t = time.perf_counter()
        for q, cid in zip(queries, characters):
            found.append(index.search(q[None], K, character_ids=[cid], prior_weight=weight))
        best = min(best, time.perf_counter() - t)
        scores = np.concatenate([s for s, _ in found])
        ids = np.concatenate([i for _, i in found])
    return len(queries) / best, scores, ids


class FlatReference:
    """Exact search's answers and speeds at one size, filled when flat (always first) is measured: every other
    kind's recall, agreement and speed-ups are taken against these."""

    def __init__(self) -> None:
        self.qps = 0.0  # batched pool-wide search
        self.ids: np.ndarray | None = None  # (queries, K) exact top-k
        self.char_qps = 0.0  # per-character serving path
        self.char_scores: np.ndarray | None = None
        self.char_ids: np.ndarray | None = None


def draw_pool(
    n: int, args: argparse.Namespace, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray, list[SettingRecord]]:
    """The n settings (embeddings, priors, records: ``SETTINGS_PER_CHARACTER`` per character) and the queries,
    drawn from ``rng`` in a fixed order so that a seed gives the same pool whatever kinds are measured."""
    log(f"n={n:,}: drawing {args.vectors} vectors")
    emb, queries, vec_info = make_vectors(rng, n, args)  # (n, dim), (queries, dim)
    if args.vectors == "clustered":
        log(
            f"n={n:,}: {vec_info['centres']:,} centres, cosine to own centre mean "
            f"{vec_info['cos_to_own_centre_mean']:.3f} (p5-p95 {vec_info['cos_to_own_centre_p5_p95'][0]:.2f}-"
            f"{vec_info['cos_to_own_centre_p5_p95'][1]:.2f}), random pairs {vec_info['cos_random_pairs_mean']:.3f}"
        )
    priors = rng.standard_normal(n).astype(np.float32)  # z-scored, as replugchar.training.priors writes them
    priors *= args.prior_scale  # stored c·g, queried with λ/c: the same scores (see --prior_scale)
    records = [
        SettingRecord(i, f"c{i // SETTINGS_PER_CHARACTER:07d}", i % SETTINGS_PER_CHARACTER, "")
        for i in range(n)
    ]
    return emb, queries, vec_info, priors, records


def build_kind(
    kind: str,
    emb: np.ndarray,
    records: list[SettingRecord],
    priors: np.ndarray,
    args: argparse.Namespace,
    n: int,
) -> tuple[SettingIndex, dict]:
    """Build one index kind, timing it and measuring the memory it keeps and needs; returns the index and the
    start of its row (build figures and the kind's parameters)."""
    gc.collect()
    build_kwargs = {"nlist": args.nlist or None} if kind == "ivf" else {}
    if kind == "hnsw":
        build_kwargs.update(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction)
    log(f"n={n:,}: building {kind}")
    with PeakRSS() as mem:
        t = time.perf_counter()
        index = SettingIndex.build(emb, records, priors, kind=kind, **build_kwargs)
        build_s = time.perf_counter() - t
    log(f"n={n:,}: {kind} built in {build_s:.1f} s")
    row = {
        "build_s": build_s,
        "index_mib": len(faiss.serialize_index(index.index)) / 2**20,
        "rss_delta_mib": mem.delta_mib,
        "rss_build_peak_delta_mib": mem.peak_delta_mib,
        "params": {},
    }
    if kind == "ivf":
        row["params"] = {"nlist": index.index.nlist}
        # 1 = equal lists; k = searches scan k times the vectors a balanced partition would
        row["ivf_imbalance_factor"] = index.index.invlists.imbalance_factor()
    elif kind == "hnsw":
        row["params"] = {"M": args.hnsw_m, "efConstruction": index.index.hnsw.efConstruction}
    return index, row


def serving_path(
    kind: str,
    index: SettingIndex,
    queries: np.ndarray,
    served_by: list[str],
    args: argparse.Namespace,
    n: int,
    ref: FlatReference,
) -> dict:
    """The per-character search ``Retriever.search`` runs, one query per call: its speed, and whether it returns
    exactly flat's top-k (flat itself fills ``ref``)."""
    char_qps, char_scores, char_ids = timed_character_search(index, queries, served_by, args)
    if kind == "flat":
        ref.char_scores, ref.char_ids, ref.char_qps = char_scores, char_ids, char_qps
    figures = {
        "queries": len(queries),
        "qps": char_qps,
        "qps_over_flat": char_qps / ref.char_qps,
        "same_ids_as_flat": bool(np.array_equal(char_ids, ref.char_ids)),
        "max_abs_score_diff": float(np.max(np.abs(char_scores - ref.char_scores))),
    }
    log(f"n={n:,}: {kind} per-character search {char_qps:.0f} QPS, same top-{K} as flat: "
        f"{figures['same_ids_as_flat']}")  # fmt: skip
    return figures


def pool_sweep(
    kind: str, index: SettingIndex, queries: np.ndarray, args: argparse.Namespace, n: int, ref: FlatReference
) -> list[dict]:
    """Batched pool-wide search over the kind's search parameter (``nprobe`` / ``ef_search``), stopping once
    recall saturates, plus the package default if the sweep stopped before it; flat is one exact point (and
    fills ``ref``: the ground truth of every recall)."""
    if kind == "flat":
        ref.qps, ref.ids = timed_search(index, queries, args)
        log(f"n={n:,}: flat {ref.qps:.0f} QPS")
        return [{"qps": ref.qps, "recall": 1.0}]
    name, values = ("nprobe", NPROBES) if kind == "ivf" else ("ef_search", EF_SEARCHES)
    if kind == "ivf":  # up to nprobe = nlist, which visits every list (exhaustive)
        values = [*(v for v in values if v < index.index.nlist), index.index.nlist]
    sweep = []
    for v in values:
        qps, ids = timed_search(index, queries, args, **{name: v})
        sweep.append({name: v, "qps": qps, "recall": recall_at_k(ids, ref.ids)})
        log(f"n={n:,}: {kind} {name}={v}: {qps:.0f} QPS, recall@10 {sweep[-1]['recall']:.3f}")
        if sweep[-1]["recall"] >= 0.999:  # larger values cannot gain recall, only lose speed
            break
    if not any(s[name] == DEFAULTS[kind][name] for s in sweep):
        qps, ids = timed_search(index, queries, args, **DEFAULTS[kind])
        sweep.append({name: DEFAULTS[kind][name], "qps": qps, "recall": recall_at_k(ids, ref.ids)})
    return sweep


def summarise_sweep(kind: str, sweep: list[dict], flat_qps: float) -> dict:
    """The sweep, its point at the package defaults and its fastest point reaching ``RECALL_TARGET`` (or None),
    each with its speed-up over flat."""
    default = next(s for s in sweep if all(s.get(k) == v for k, v in DEFAULTS[kind].items()))
    ok = [s for s in sweep if s["recall"] >= RECALL_TARGET]
    best = max(ok, key=lambda s: s["qps"]) if ok else None
    return {
        "sweep": sweep,
        "default": {**default, "qps_over_flat": default["qps"] / flat_qps},
        "best_at_target": None if best is None else {**best, "qps_over_flat": best["qps"] / flat_qps},
    }


def bench_size(
    n: int,
    args: argparse.Namespace,
    rng: np.random.Generator,
    out: dict,
    checkpoint: Callable[[], None] = lambda: None,
) -> dict:
    """Fill ``out`` (the row of size n) kind by kind, calling ``checkpoint()`` after each kind."""
    emb, queries, vec_info, priors, records = draw_pool(n, args, rng)
    out.update({"n": n, **vec_info, "kinds": {}})
    m = min(args.character_queries, len(queries))
    served_by = [f"c{int(i):07d}" for i in rng.integers(0, n // SETTINGS_PER_CHARACTER, m)]
    ref = FlatReference()
    for kind in ("flat", *(k for k in args.kinds if k != "flat")):  # flat first: it is the ground truth
        index, row = build_kind(kind, emb, records, priors, args, n)
        index.search(queries[:10], K, prior_weight=args.prior_weight / args.prior_scale)  # warm-up
        row["per_character"] = serving_path(kind, index, queries[:m], served_by, args, n, ref)
        row.update(summarise_sweep(kind, pool_sweep(kind, index, queries, args, n, ref), ref.qps))
        out["kinds"][kind] = row
        checkpoint()
        del index
    return out


def build_parser() -> argparse.ArgumentParser:
    """Sizes, vector distribution, index parameters and timing options (add_argument calls only)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated numbers of settings")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (all-MiniLM-L6-v2: 384)")
    p.add_argument("--queries", type=int, default=1000, help="queries per batched search")
    p.add_argument(
        "--character_queries",
        type=int,
        default=200,
        help="per-character searches, one query per call (serving)",
    )
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads; 0 keeps FAISS's default")
    p.add_argument(
        "--kinds", default="flat,ivf,hnsw", help="index kinds (flat is always built: ground truth)"
    )
    p.add_argument("--nlist", type=int, default=0, help="IVF lists; 0 = the package default 4*sqrt(n)")
    p.add_argument("--hnsw_m", type=int, default=32, help="HNSW graph degree M (the package default)")
    p.add_argument(
        "--ef_construction", type=int, default=200, help="HNSW efConstruction (the package default)"
    )
    p.add_argument(
        "--vectors",
        choices=("clustered", "random"),
        default="clustered",
        help="clustered: mixture of Gaussians on the sphere (like sentence embeddings); random: uniform (worst case)",
    )
    p.add_argument("--cluster_size", type=int, default=100, help="settings per centre (clustered)")
    p.add_argument(
        "--cluster_cos", type=float, default=0.65, help="target mean cosine to the own centre (clustered)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="time each search this many times, keep the fastest"
    )
    p.add_argument("--prior_weight", type=float, default=0.1, help="λ in score = cos + λ·g (query side)")
    p.add_argument(
        "--prior_scale",
        type=float,
        default=1.0,
        help="store c·g and query with λ/c: identical scores, different index geometry (1 = package)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    """The options (``args.kinds`` as a list) and the sizes, rejected before any index is built when one of
    them would fail or mean nothing later."""
    args = build_parser().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not sizes or min(sizes) < K or min(args.dim, args.queries, args.repeats, args.character_queries) <= 0:
        raise ValueError(f"--sizes must be >= {K}; --dim, --queries, --character_queries, --repeats positive")
    if args.prior_scale <= 0:
        raise ValueError("--prior_scale must be positive")
    if args.cluster_size <= 0 or not 0 < args.cluster_cos < 1 or args.ef_construction <= 0:
        raise ValueError("--cluster_size and --ef_construction must be positive, --cluster_cos in (0, 1)")
    if bad := set(args.kinds) - {"flat", "ivf", "hnsw"}:
        raise ValueError(f"--kinds: unknown index kind(s) {sorted(bad)}; use flat, ivf, hnsw")
    return args, sizes


def new_results(args: argparse.Namespace, sizes: list[int]) -> dict:
    """The JSON's frame: the config and the machine (figures compare within one machine), no size measured yet."""
    return {
        "config": {
            **vars(args),
            "sizes": sizes,
            "k": K,
            "recall_target": RECALL_TARGET,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss": faiss.__version__,
        },
        "sizes": [],
    }


def main(argv: list[str] | None = None) -> dict:
    """Measure every size, writing the JSON after each index kind, then print the report; returns the figures."""
    args, sizes = parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    results = new_results(args, sizes)

    def checkpoint() -> None:  # after every index kind, so that a run cut short keeps what it finished
        if args.json:
            write_text(args.json, json.dumps(results, indent=2))

    for n in sizes:
        t = time.perf_counter()
        results["sizes"].append({})
        bench_size(n, args, rng, results["sizes"][-1], checkpoint)
        log(f"n={n:,}: done in {time.perf_counter() - t:.1f} s")
    print_report(results)
    if args.json:
        print(f"\nwrote {args.json}")
    return results


def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _fmt_params(s: dict) -> str:
    return (
        ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("qps", "recall", "qps_over_flat")) or "exact"
    )


def print_setup(r: dict) -> None:
    """The heading (dimension, queries, prior weight, FAISS threads) and how the vectors were drawn, per size."""
    c, m = r["config"], r["machine"]
    print(
        f"\n## SettingIndex at scale: dim {c['dim']} + 1 prior coordinate, {c['queries']} queries, k={c['k']}, "
        f"prior weight {c['prior_weight']} (prior coordinate stored x{c['prior_scale']}); faiss {m['faiss']}, "
        f"{m['faiss_threads']} threads, "
        f"{m['cpu_count']} CPU cores"
    )
    if c["vectors"] == "random":
        print(
            "Vectors: **random** unit vectors, random priors: a worst case for IVF/HNSW (no cluster structure).\n"
        )
    else:
        print(
            f"Vectors: **clustered** (mixture of Gaussians on the sphere, {c['cluster_size']} settings per centre, "
            f"target cosine to own centre {c['cluster_cos']}; queries from the same centres), random priors."
        )
        for size in r["sizes"]:
            lo, hi = size["cos_to_own_centre_p5_p95"]
            print(
                f"- n={size['n']:,}: {size['centres']:,} centres, cosine to own centre mean "
                f"{size['cos_to_own_centre_mean']:.3f} (p5-p95 {lo:.2f}-{hi:.2f}), queries "
                f"{size['query_cos_to_own_centre_mean']:.3f}, random pairs {size['cos_random_pairs_mean']:.3f}"
            )
        print()


def print_pool_table(r: dict) -> None:
    """Build cost, memory and pool-wide search per size and kind: at the defaults and at the recall target."""
    c = r["config"]
    print(
        "| n | kind | build s | index MiB | RSS Δ MiB | defaults: QPS (recall@10) | "
        f"best with recall@10 >= {c['recall_target']} | QPS | vs flat |"
    )
    print("|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for size in r["sizes"]:
        for kind, x in size["kinds"].items():
            d, b = x["default"], x["best_at_target"]
            best = (
                ("none in sweep", "-", "-")
                if b is None
                else (
                    f"{_fmt_params(b)} (recall {b['recall']:.3f})",
                    f"{b['qps']:.0f}",
                    f"{b['qps_over_flat']:.1f}x",
                )
            )
            print(
                f"| {size['n']:,} | {kind}{' ' + _fmt_params(x['params']) if x['params'] else ''} | {x['build_s']:.2f} "
                f"| {x['index_mib']:.0f} | {_fmt_mib(x['rss_delta_mib'])} | {d['qps']:.0f} ({d['recall']:.3f}) "
                f"| {best[0]} | {best[1]} | {best[2]} |"
            )
    for size in r["sizes"]:
        if "ivf" in size["kinds"]:
            print(
                f"IVF list imbalance factor at n={size['n']:,}: {size['kinds']['ivf']['ivf_imbalance_factor']:.2f} "
                "(1 = balanced lists)"
            )


def print_serving_table(r: dict) -> None:
    """The per-character serving path per size and kind, and whether it returns exactly flat's top-k."""
    c = r["config"]
    print(
        f"\nServing path: one character's top-{c['k']} per query (`Retriever.search`: FAISS id selector), "
        f"{c['character_queries']} queries one at a time"
    )
    print("| n | kind | per-character QPS | vs flat | same top-k as flat | max abs score diff |")
    print("|---:|---|---:|---:|---|---:|")
    for size in r["sizes"]:
        for kind, x in size["kinds"].items():
            pc = x["per_character"]
            print(
                f"| {size['n']:,} | {kind} | {pc['qps']:.0f} | {pc['qps_over_flat']:.2f}x | "
                f"{'yes' if pc['same_ids_as_flat'] else '**no**'} | {pc['max_abs_score_diff']:.1e} |"
            )


def print_sweeps(r: dict) -> None:
    """Every point of each approximate kind's sweep, so that a reader can pick another trade-off."""
    print("\nSweeps (QPS / recall@10):")
    for size in r["sizes"]:
        for kind, x in size["kinds"].items():
            if kind != "flat":
                cells = ", ".join(f"{_fmt_params(s)}: {s['qps']:.0f}/{s['recall']:.3f}" for s in x["sweep"])
                print(f"- n={size['n']:,} {kind}: {cells}")


def print_report(r: dict) -> None:
    """The Markdown tables: build and pool-wide search per kind, the serving path, and the sweeps."""
    print_setup(r)
    print_pool_table(r)
    print_serving_table(r)
    print_sweeps(r)


if __name__ == "__main__":
    main()
