"""Frozen-LM log-likelihood speed: naive per-pair loop vs the package's batched likelihood vs raw forward vs the cache.

Four ways of obtaining log P(response | setting, dialogue) for the same (example, setting) pairs:

(a) naive   -- one forward per pair, full-vocabulary log-softmax at every position, gather the response tokens;
(b) batched -- :meth:`replugchar.lm.likelihood.LMLikelihood.loglik`: length-sorted token-budget batches, left padding,
               the LM head and log-softmax on the response positions only (``logits_to_keep``);
(c) limit   -- the forward pass alone on exactly the padded batches (b) builds, ``logits_to_keep=1``, no
               log-softmax, no tokenisation, no Python bookkeeping: what (b) would cost if scoring were free;
(d) cached  -- :class:`replugchar.lm.loglik_cache.CachedLikelihood` on a second epoch over the same pairs, after a
               restart (log-likelihoods read back from Parquet shards): zero LM calls, asserted.

Prints one Markdown table (and writes every figure as JSON with ``--json``). Figures are measured in one run on
one machine; compare ratios, not absolute numbers, across machines.

``--prefix_share`` measures something else: the settings-after template
(``PromptTemplate(settings_position="after")``) scored per prompt (``LMLikelihood(share_prefix=False)``) and
prefix-shared (each turn's dialogue run once, its KV cache reused by all k + 1 candidates) on the same turns, at
each k of ``--ks`` (default 5, 10, 60; candidates: no setting, the character's own settings, then other
characters' settings in a seeded per-turn order). It prints the tokens through the model per scored pair, pairs/s,
the speed-up and the largest |Δ log P| between the two paths; its last line reads
``prefix-shared vs per-prompt at k=5: X.XXx pairs/s``.

    python benchmarks/lm_likelihood.py --lm tiny:gpt2 --pairs 40 --naive_pairs 10       # smoke run
    python benchmarks/lm_likelihood.py                                                  # SmolLM2, CPU
    python benchmarks/lm_likelihood.py --lm random:SmolLM2-135M --device cuda           # GPU, random weights
    python benchmarks/lm_likelihood.py --prefix_share                                   # SmolLM2, ConvAI2 valid
    python benchmarks/lm_likelihood.py --prefix_share --lm tiny:gpt2 --data demo --pairs 24 --min_turns 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from replugchar.core.atomic import write_text
from replugchar.core.data import Corpus
from replugchar.lm.likelihood import (
    NO_SETTING,
    LMLikelihood,
    LoglikRequest,
    Logliks,
    PromptTemplate,
    fix_tokenizer,
)
from replugchar.lm.loglik_cache import CachedLikelihood, request_key
from replugchar.lm.models import byte_tokenizer, load_causal_lm

RANDOM_SMOLLM2 = "random:SmolLM2-135M"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "synthetic_persona_chat"
PREFIX_SHARE_DATA = REPO_ROOT.parent / "shared" / "data" / "convai2_valid"


# ----------------------------------------------------------------------------------------------- setup
def random_smollm2(dtype: torch.dtype):
    """SmolLM2-135M's architecture with random weights and the byte tokenizer: speed only, log-likelihoods meaningless."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(8192)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    fix_tokenizer(tok, model)
    return model.to(dtype=dtype).eval().requires_grad_(False), tok


def resolve_data(data: str) -> str:
    """``data``, or "demo" (with a notice) when that folder is missing: the benchmark still runs anywhere."""
    if data != "demo" and not Path(data).is_dir():
        print(f"NOTICE: data folder {data} not found; using the bundled demo data instead")
        data = "demo"
    return data


def load_requests(data: str, n_pairs: int) -> tuple[list[LoglikRequest], str]:
    """(example, (setting,)) for every setting of each example's character, in data order, first ``n_pairs``."""
    corpus = Corpus.load(resolve_data(data))
    requests: list[LoglikRequest] = []
    for ex in corpus.examples:
        for setting in corpus.characters[ex.character_id].settings:
            requests.append(LoglikRequest(ex, (setting,)))
            if len(requests) == n_pairs:
                return requests, corpus.source
    if len(requests) < n_pairs:
        print(f"NOTICE: {corpus.source} yields only {len(requests)} pairs (asked for {n_pairs})")
    return requests, corpus.source


def padded_batches(likelihood: LMLikelihood, encoded: list[tuple[list[int], int]], device: torch.device):
    """The exact (ids, mask, position_ids) batches :meth:`LMLikelihood.loglik` builds, already on ``device``."""
    out = []
    for batch in likelihood.batches([len(ids) for ids, _ in encoded]):  # the package's own batching
        ids, mask, _ = likelihood.collate([encoded[i] for i in batch])  # (batch, width), left-padded
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out.append((ids.to(device), mask.to(device), position_ids.to(device)))
    return out


# ----------------------------------------------------------------------------------------------- measuring
class Meter:
    """Wall time (CUDA-synchronised) and peak memory above the level at entry: process RSS sampled every 2 ms
    by a thread (psutil), plus ``torch.cuda.max_memory_allocated`` on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.rss_peak_mib: float | None = None  # above the RSS at entry
        self.rss_abs_mib: float | None = None  # the process's RSS peak during the measurement
        self.cuda_peak_mib: float | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(0.002)

    def __enter__(self) -> Meter:
        self._thread = None
        try:
            import psutil

            self._proc = psutil.Process()
            self._rss0 = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        except ImportError:
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.cuda_peak_mib = (torch.cuda.max_memory_allocated() - self._cuda0) / 2**20
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.rss_peak_mib = (self._peak - self._rss0) / 2**20
            self.rss_abs_mib = self._peak / 2**20


@torch.inference_mode()
def naive_loglik(
    model, likelihood: LMLikelihood, requests: list[LoglikRequest], device: torch.device
) -> Logliks:
    """One forward per pair; log-softmax over the full vocabulary at every position; gather the response."""
    logp_sum = np.zeros(len(requests))
    n_tokens = np.zeros(len(requests), dtype=np.int64)
    for j, request in enumerate(requests):
        seq, n_resp = likelihood.encode(request)
        ids = torch.tensor([seq], device=device)  # (1, seq)
        logp = model(ids, use_cache=False).logits.float().log_softmax(-1)  # (1, seq, vocab)
        token_logp = logp[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # (seq-1,)
        logp_sum[j] = float(token_logp[-n_resp:].sum())
        n_tokens[j] = n_resp
    return Logliks(logp_sum, n_tokens)


@torch.inference_mode()
def raw_forward(model, batches) -> None:
    for ids, mask, position_ids in batches:
        model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1, use_cache=False
        )


class Replay:
    """Stands in for the LM to fill the cache with the log-likelihoods (b) already computed: no extra LM pass."""

    def __init__(self, fingerprint: str, requests: list[LoglikRequest], logliks: Logliks) -> None:
        self.fingerprint = fingerprint
        self._by_key = {
            request_key(r): (s, n) for r, s, n in zip(requests, logliks.logp_sum, logliks.n_tokens)
        }

    def loglik(self, requests) -> Logliks:
        values = [self._by_key[request_key(r)] for r in requests]
        return Logliks(np.array([v[0] for v in values]), np.array([v[1] for v in values], dtype=np.int64))


# ----------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """Every option of both modes (the four-method table and ``--prefix_share``); the defaults that depend on the
    mode are ``None`` here and filled in by :func:`parse_args`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--lm",
        default="embedded:SmolLM2-135M-Instruct",
        help=f"LM spec as in replugchar.lm.models (embedded:..., tiny:gpt2, a hub id/folder) or {RANDOM_SMOLLM2}",
    )
    p.add_argument(
        "--data",
        default=None,
        help=f"data folder, or 'demo' for the bundled subset (default {DEFAULT_DATA.name}; "
        f"{PREFIX_SHARE_DATA.name} with --prefix_share)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="(example, setting) pairs for (b), (c), (d) (default 2000); with --prefix_share, pairs per k "
        "(default 180): the first ceil(pairs / (k + 1)) turns, at least --min_turns",
    )
    p.add_argument("--naive_pairs", type=int, default=200, help="the first M of those pairs for (a)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto = float32 on CPU, bfloat16 on GPU",
    )
    p.add_argument("--max_batch_tokens", type=int, default=4096, help="LMLikelihood token budget per batch")
    p.add_argument(
        "--max_length",
        type=int,
        default=0,
        help="LMLikelihood max_length; 0 = 384 (as in configs/*.yaml), 1024 for the byte-tokenizer LMs "
        f"(tiny:gpt2, {RANDOM_SMOLLM2}) so that they see the same dialogue context",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="time (b) and (c) this many times, keep the fastest (default 1); with --prefix_share, passes over "
        "the chunks per path (default 2)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument(
        "--prefix_share",
        action="store_true",
        help="per-prompt vs prefix-shared scoring of the settings-after template, at each k of --ks",
    )
    p.add_argument("--ks", default="5,10,60", help="--prefix_share: settings per turn, comma-separated")
    p.add_argument("--min_turns", type=int, default=3, help="--prefix_share: turns at each k, at least")
    p.add_argument(
        "--seed", type=int, default=0, help="--prefix_share: turn sample and other-character draws"
    )
    p.add_argument("--chunks", type=int, default=4, help="--prefix_share: interleaved chunks of turns per k")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill in the mode-dependent defaults, so that the JSON's config records the
    values actually used; reject sizes that would make a figure meaningless (a division by zero, an empty run)."""
    args = build_parser().parse_args(argv)
    args.data = args.data or str(PREFIX_SHARE_DATA if args.prefix_share else DEFAULT_DATA)
    args.pairs = args.pairs or (180 if args.prefix_share else 2000)
    args.repeats = args.repeats or (2 if args.prefix_share else 1)
    if min(args.pairs, args.naive_pairs, args.repeats, args.max_batch_tokens) <= 0:
        raise ValueError("--pairs, --naive_pairs, --repeats and --max_batch_tokens must be positive")
    return args


def pick_device(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device and dtype name the options ask for ("auto": the GPU if there is one, bfloat16 there)."""
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, dtype_name


class LoadedLM(NamedTuple):
    """The LM both modes measure, loaded once, and how: the figures are reported with it."""

    model: Any
    tok: Any
    device: torch.device
    dtype_name: str
    max_length: int
    load_s: float


def load_model(args: argparse.Namespace, device: torch.device, dtype_name: str) -> tuple[Any, Any, float]:
    """(model, tokenizer, load seconds); the load time is reported, kept apart from every measured method."""
    t0 = time.perf_counter()
    if args.lm == RANDOM_SMOLLM2:
        model, tok = random_smollm2(getattr(torch, dtype_name))
        model = model.to(device)
    else:
        model, tok = load_causal_lm(args.lm, dtype=dtype_name, device=str(device))
    load_s = time.perf_counter() - t0
    if args.lm == RANDOM_SMOLLM2:
        print(
            f"NOTE: {RANDOM_SMOLLM2} has RANDOM weights and a byte tokenizer (~4x the tokens of SmolLM2's BPE): "
            "only speed is meaningful, the log-likelihoods are not"
        )
    return model, tok, load_s


def machine_info(device: torch.device) -> dict:
    """Where the figures were measured: they only compare within one machine."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def write_json(path: str | None, results: dict) -> None:
    """Write ``results`` to ``path`` (``--json``, atomically); nothing when no path was given."""
    if path:
        write_text(path, json.dumps(results, indent=2))
        print(f"\nwrote {path}")


# ----------------------------------------------------------------------------------------------- the four methods
class Prepared(NamedTuple):
    """Tokenisation of every pair, timed on its own (part of (a) and (b), absent from (c)), and (c)'s batches."""

    tokenize_s: float
    tokens: int  # response + context tokens over all pairs
    naive_tokens: int  # the same over (a)'s subset
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    padded_tokens: int


class BatchedTiming(NamedTuple):
    """(b) and (c), the fastest of ``--repeats`` each: the other passes measure the machine's noise."""

    logliks: Logliks  # (b)'s log-likelihoods, for the agreement check and to fill (d)'s cache
    batched: Meter
    limit: Meter
    forward_passes: int  # LM calls (b) made (in its last pass)


class CachedEpoch(NamedTuple):
    """(d): the second epoch served from a cache on disk, and what loading that cache cost."""

    meter: Meter
    load_s: float
    parquet_bytes: int
    lm_calls: int


def prepare(
    likelihood: LMLikelihood, requests: list[LoglikRequest], n_naive: int, device: torch.device
) -> Prepared:
    """Tokenise as (b) does and build the padded batches (c) runs, so that (c) times the forward pass alone."""
    t = time.perf_counter()
    encoded = likelihood.encode_many(requests)
    tokenize_s = time.perf_counter() - t
    lengths = np.array([len(ids) for ids, _ in encoded])
    batches = padded_batches(likelihood, encoded, device)
    return Prepared(
        tokenize_s=tokenize_s,
        tokens=int(lengths.sum()),
        naive_tokens=int(lengths[:n_naive].sum()),
        batches=batches,
        padded_tokens=sum(ids.numel() for ids, _, _ in batches),
    )


def warm_up(
    model, likelihood: LMLikelihood, requests: list[LoglikRequest], prepared: Prepared, device: torch.device
) -> None:
    """One pair naive, one batch raw, a few pairs batched: first-call costs (allocation, kernels) stay untimed."""
    naive_loglik(model, likelihood, requests[:1], device)
    raw_forward(model, prepared.batches[:1])
    likelihood.loglik(requests[: min(8, len(requests))])
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batched(
    model,
    likelihood: LMLikelihood,
    requests: list[LoglikRequest],
    prepared: Prepared,
    device: torch.device,
    repeats: int,
) -> BatchedTiming:
    """Time (b) and (c) alternately ``repeats`` times and keep the fastest of each."""
    m_batched = m_limit = None
    for _ in range(repeats):
        passes0 = likelihood.forward_passes
        with Meter(device) as m:
            batched = likelihood.loglik(requests)
        n_forward = likelihood.forward_passes - passes0
        m_batched = m if m_batched is None or m.seconds < m_batched.seconds else m_batched
        with Meter(device) as m:
            raw_forward(model, prepared.batches)
        m_limit = m if m_limit is None or m.seconds < m_limit.seconds else m_limit
    return BatchedTiming(batched, m_batched, m_limit, n_forward)


def time_cached_epoch(
    likelihood: LMLikelihood, requests: list[LoglikRequest], batched: Logliks, device: torch.device
) -> CachedEpoch:
    """(d): fill a cache on disk from (b)'s log-likelihoods (no extra LM pass), "restart" by opening it afresh,
    then time one more epoch over the same pairs; it must make no LM call and return (b)'s numbers exactly."""
    with tempfile.TemporaryDirectory() as cache_dir:
        filler = CachedLikelihood(Replay(likelihood.fingerprint, requests, batched), cache_dir)
        filler.loglik(requests)
        filler.flush()
        t = time.perf_counter()
        cached = CachedLikelihood(likelihood, cache_dir)
        cache_load_s = time.perf_counter() - t
        cache_bytes = sum(f.stat().st_size for f in Path(cache_dir).rglob("*.parquet"))
        passes0 = likelihood.forward_passes
        with Meter(device) as m_cached:
            again = cached.loglik(requests)
        lm_calls = likelihood.forward_passes - passes0
    if lm_calls != 0 or cached.misses != 0:
        raise RuntimeError(f"cached epoch made {lm_calls} LM calls ({cached.misses} misses); expected 0")
    if not np.array_equal(again.logp_sum, batched.logp_sum):
        raise RuntimeError("cached log-likelihoods differ from the batched ones they were filled with")
    return CachedEpoch(m_cached, cache_load_s, cache_bytes, lm_calls)


def meter_row(meter: Meter, pairs: int, toks: int) -> dict:
    """One method's row of the table: throughput per pair and per token, and peak memory."""
    return {
        "pairs": pairs,
        "tokens": toks,
        "seconds": meter.seconds,
        "pairs_per_s": pairs / meter.seconds,
        "tokens_per_s": toks / meter.seconds,
        "rss_peak_delta_mib": meter.rss_peak_mib,
        "rss_peak_mib": meter.rss_abs_mib,
        "cuda_peak_delta_mib": meter.cuda_peak_mib,
    }


def naive_vs_batched(naive: Logliks, batched: Logliks) -> dict:
    """Agreement of (a) and (b) on (a)'s subset: the same tokens, so differences are padding/dtype numerics."""
    n = len(naive.logp_sum)
    diff = np.abs(naive.logp_sum - batched.logp_sum[:n])
    return {
        "max_abs_diff_logp_sum": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "same_token_counts": bool(np.array_equal(naive.n_tokens, batched.n_tokens[:n])),
    }


def method_ratios(rows: dict, timing: BatchedTiming, tokenize_s: float) -> dict:
    """The ratios the report quotes: (b) over (a), (b) against the raw-forward limit, (d) over (a)."""
    return {
        "batched_over_naive_pairs_per_s": rows["batched"]["pairs_per_s"] / rows["naive"]["pairs_per_s"],
        "batched_over_naive_tokens_per_s": rows["batched"]["tokens_per_s"] / rows["naive"]["tokens_per_s"],
        "batched_pct_of_limit": 100 * timing.limit.seconds / timing.batched.seconds,
        "cached_over_naive_pairs_per_s": rows["cached"]["pairs_per_s"] / rows["naive"]["pairs_per_s"],
        "tokenize_pct_of_batched": 100 * tokenize_s / timing.batched.seconds,
    }


def compare_methods(args: argparse.Namespace, lm: LoadedLM) -> dict:
    """Measure (a)-(d) on the same pairs, print the table, write the JSON; returns every figure."""
    model, tok, device, dtype_name, max_length, load_s = lm
    requests, data_source = load_requests(args.data, args.pairs)
    naive_requests = requests[: args.naive_pairs]
    likelihood = LMLikelihood(model, tok, max_length=max_length, max_batch_tokens=args.max_batch_tokens)
    prepared = prepare(likelihood, requests, len(naive_requests), device)
    warm_up(model, likelihood, requests, prepared, device)
    with Meter(device) as m_naive:
        naive = naive_loglik(model, likelihood, naive_requests, device)
    timing = time_batched(model, likelihood, requests, prepared, device, args.repeats)
    cache = time_cached_epoch(likelihood, requests, timing.logliks, device)
    agreement = naive_vs_batched(naive, timing.logliks)
    tokens = prepared.tokens
    rows = {
        "naive": meter_row(m_naive, len(naive_requests), prepared.naive_tokens),
        "batched": meter_row(timing.batched, len(requests), tokens),
        "limit": meter_row(timing.limit, len(requests), tokens),
        "cached": meter_row(cache.meter, len(requests), tokens),
    }
    config = {**vars(args), "max_length": max_length, "device": str(device), "dtype": dtype_name}
    results = {
        "config": {**config, "data_source": data_source},
        "random_weights": args.lm == RANDOM_SMOLLM2,
        "machine": machine_info(device),
        "model_load_s": load_s,
        "tokenize_s": prepared.tokenize_s,
        "batches": len(prepared.batches),
        "forward_passes_batched": timing.forward_passes,
        "padding_efficiency": tokens / prepared.padded_tokens,
        "mean_tokens_per_pair": tokens / len(requests),
        "cache": {
            "load_s": cache.load_s,
            "parquet_bytes": cache.parquet_bytes,
            "lm_calls_second_epoch": cache.lm_calls,
        },
        "naive_vs_batched": agreement,
        "rows": rows,
        "ratios": method_ratios(rows, timing, prepared.tokenize_s),
    }
    print_report(results)
    write_json(args.json, results)
    return results


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    """Load the LM once, then run the mode asked for: the four-method table, or ``--prefix_share``."""
    args = parse_args(argv)
    byte_level = args.lm in ("tiny:gpt2", RANDOM_SMOLLM2)
    max_length = args.max_length or (1024 if byte_level else 384)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype_name = pick_device(args)
    model, tok, load_s = load_model(args, device, dtype_name)
    lm = LoadedLM(model, tok, device, dtype_name, max_length, load_s)
    return prefix_share(args, lm) if args.prefix_share else compare_methods(args, lm)


def print_report(r: dict) -> None:
    """The four-method table and the ratios below it, in Markdown."""
    c, mach = r["config"], r["machine"]
    where = mach["gpu"] or f"{mach['cpu_count']} CPU cores, {mach['torch_threads']} torch threads"
    print(f"\n## LM scoring: {c['lm']} ({c['dtype']}) on {c['device']} ({where}), torch {mach['torch']}")
    if r["random_weights"]:
        print(
            "**Random weights, byte tokenizer: speed only; log-likelihoods and token counts are not SmolLM2's.**"
        )
    print(
        f"data: {c['data_source']}; {r['rows']['batched']['pairs']} pairs, {r['mean_tokens_per_pair']:.0f} "
        f"tokens/pair; {r['batches']} batches of <= {c['max_batch_tokens']} tokens, padding efficiency "
        f"{r['padding_efficiency']:.0%}; tokenisation {r['tokenize_s']:.2f} s\n"
    )
    mem = "CUDA peak MiB" if c["device"].startswith("cuda") else "RSS peak Δ MiB"
    print(f"| method | pairs | s | pairs/s | tokens/s | vs naive (pairs/s) | {mem} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = {
        "naive": "(a) naive per-pair loop",
        "batched": "(b) LMLikelihood.loglik",
        "limit": "(c) raw forward, same batches",
        "cached": "(d) CachedLikelihood 2nd epoch",
    }
    naive_ps = r["rows"]["naive"]["pairs_per_s"]
    for key, label in labels.items():
        x = r["rows"][key]
        m = x["cuda_peak_delta_mib"] if c["device"].startswith("cuda") else x["rss_peak_delta_mib"]
        m_txt = "n/a" if m is None else f"{m:.0f}"
        print(
            f"| {label} | {x['pairs']} | {x['seconds']:.3g} | {x['pairs_per_s']:.1f} | {x['tokens_per_s']:.0f} "
            f"| {x['pairs_per_s'] / naive_ps:.1f}x | {m_txt} |"
        )
    q, nb = r["ratios"], r["naive_vs_batched"]
    print(
        f"\nbatched / naive: {q['batched_over_naive_pairs_per_s']:.1f}x per pair "
        f"({q['batched_over_naive_tokens_per_s']:.1f}x per token); batched runs at "
        f"{q['batched_pct_of_limit']:.0f}% of the raw-forward limit; cached epoch / naive: "
        f"{q['cached_over_naive_pairs_per_s']:.0f}x with {r['cache']['lm_calls_second_epoch']} LM calls "
        f"(cache load {r['cache']['load_s']:.3f} s, {r['cache']['parquet_bytes'] / 1024:.0f} KiB of Parquet)"
    )
    rest = r["rows"]["batched"]["seconds"] - r["rows"]["limit"]["seconds"] - r["tokenize_s"]
    print(
        f"(b) = tokenisation {r['tokenize_s']:.3g} s ({q['tokenize_pct_of_batched']:.0f}%) + raw forward "
        f"{r['rows']['limit']['seconds']:.3g} s + the rest {rest:.3g} s (LM head and log-softmax on the response "
        "positions, padding, copies)"
    )
    print(
        f"naive vs batched log P on the naive subset: max |Δ| {nb['max_abs_diff_logp_sum']:.2e}, "
        f"mean |Δ| {nb['mean_abs_diff']:.2e}, same response token counts: {nb['same_token_counts']}"
    )


# ----------------------------------------------------------------------------------------------- --prefix_share
def prefix_share_requests(corpus: Corpus, turns, k: int, seed: int) -> list[LoglikRequest]:
    """Each turn's k + 1 candidates: no setting, the character's own settings, then (past its own) other
    characters' settings in a per-turn seeded order, the same at every k (so a larger k extends a smaller one)."""
    pool = [(cid, s) for cid, ch in corpus.characters.items() for s in ch.settings]
    requests = []
    for ex in turns:
        own = list(corpus.characters[ex.character_id].settings)
        others = [s for cid, s in pool if cid != ex.character_id]
        random.Random(f"{seed}:{ex.example_id}").shuffle(others)
        chosen = (own + others)[:k]
        if len(chosen) < k:
            print(f"NOTICE: only {len(chosen)} settings in {corpus.source} (asked for k={k})")
        requests.append(LoglikRequest(ex, NO_SETTING))
        requests += [LoglikRequest(ex, (s,)) for s in chosen]
    return requests


def prefix_share_setup(args: argparse.Namespace) -> tuple[list[int], Corpus, list]:
    """The ks, the corpus and one seeded order of its turns (each k takes a prefix of it, so that a larger k
    scores the turns a smaller one did, and more)."""
    ks = [int(k) for k in args.ks.split(",")]
    if min(ks) <= 0 or args.min_turns <= 0 or args.chunks <= 0:
        raise ValueError("--ks, --min_turns and --chunks must be positive")
    corpus = Corpus.load(resolve_data(args.data))
    sample = random.Random(args.seed).sample(corpus.examples, len(corpus.examples))  # one seeded turn order
    return ks, corpus, sample


def new_run() -> dict:
    """One path's running totals over the chunks of one pass."""
    return {"seconds": 0.0, "cpu_s": 0.0, "tokens": 0, "passes": 0, "rss": [], "cuda": []}


def time_chunk(
    likelihood: LMLikelihood, chunk: list[LoglikRequest], run: dict, device: torch.device
) -> Logliks:
    """Score one chunk on one path, adding its wall time, CPU time, tokens, forward passes and memory to ``run``."""
    tokens0, passes0, cpu0 = likelihood.tokens_forwarded, likelihood.forward_passes, time.process_time()
    with Meter(device) as meter:
        logliks = likelihood.loglik(chunk)
    run["cpu_s"] += time.process_time() - cpu0
    run["seconds"] += meter.seconds
    run["tokens"] += likelihood.tokens_forwarded - tokens0
    run["passes"] += likelihood.forward_passes - passes0
    run["rss"].append(meter.rss_peak_mib)
    run["cuda"].append(meter.cuda_peak_mib)
    return logliks


def interleaved_pass(
    likelihoods: dict[str, LMLikelihood], chunks: list[list[LoglikRequest]], device: torch.device
) -> dict[str, dict]:
    """One pass over the chunks, the two paths taking turns on each (which goes first alternates), so that both
    see the same machine load; each path's run holds its totals and its log-likelihoods in request order."""
    runs = {name: new_run() for name in likelihoods}
    sums: dict[str, list[Logliks]] = {name: [] for name in likelihoods}
    for c, chunk in enumerate(chunks):
        for name in list(likelihoods)[:: 1 if c % 2 == 0 else -1]:
            sums[name].append(time_chunk(likelihoods[name], chunk, runs[name], device))
    for name, run in runs.items():
        run["logp_sum"] = np.concatenate([x.logp_sum for x in sums[name]])
        run["n_tokens"] = np.concatenate([x.n_tokens for x in sums[name]])
    return runs


def fastest_passes(
    likelihoods: dict[str, LMLikelihood],
    chunks: list[list[LoglikRequest]],
    device: torch.device,
    repeats: int,
) -> dict[str, dict]:
    """Per path, the fastest of ``repeats`` interleaved passes: the slower ones measure the machine's noise."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, run in interleaved_pass(likelihoods, chunks, device).items():
            if name not in best or run["seconds"] < best[name]["seconds"]:
                best[name] = run
    return best


def path_figures(run: dict, n_pairs: int) -> dict:
    """One path's figures at one k: time (wall and CPU), tokens through the model, forward passes, peak memory."""
    return {
        "seconds": run["seconds"],
        "cpu_seconds": run["cpu_s"],
        "pairs_per_s": n_pairs / run["seconds"],
        "pairs_per_cpu_s": n_pairs / run["cpu_s"],
        "tokens": run["tokens"],
        "tokens_per_pair": run["tokens"] / n_pairs,
        "tokens_per_s": run["tokens"] / run["seconds"],
        "forward_passes": run["passes"],
        "rss_peak_delta_mib": None if None in run["rss"] else max(run["rss"]),
        "cuda_peak_delta_mib": None if None in run["cuda"] else max(run["cuda"]),
    }


def measure_k(
    k: int,
    args: argparse.Namespace,
    corpus: Corpus,
    sample: list,
    likelihoods: dict[str, LMLikelihood],
    device: torch.device,
) -> dict:
    """Both paths on the same turns at one k: the table's row, with the speed-ups and the agreement of the scores."""
    turns = sample[: max(args.min_turns, math.ceil(args.pairs / (k + 1)))]
    n_chunks = min(args.chunks, len(turns))
    chunks = [
        prefix_share_requests(corpus, turns[c::n_chunks], k, args.seed) for c in range(n_chunks)
    ]  # turn-aligned: a turn's k + 1 candidates stay together
    requests = [r for chunk in chunks for r in chunk]
    encoded = likelihoods["shared"].encode_split_many(requests)
    best = fastest_passes(likelihoods, chunks, device, args.repeats)
    a, b = best["per_prompt"], best["shared"]
    row = {
        "k": k,
        "turns": len(turns),
        "pairs": len(requests),
        "chunks": n_chunks,
        "mean_prefix_tokens": float(np.mean([len(p) for p, _, _ in encoded[:: k + 1]])),
        "mean_continuation_tokens": float(np.mean([len(c) for _, c, _ in encoded])),
        "max_abs_diff_logp_sum": float(np.abs(a["logp_sum"] - b["logp_sum"]).max()),
        "same_token_counts": bool(np.array_equal(a["n_tokens"], b["n_tokens"])),
    }
    for name, run in best.items():
        row[name] = path_figures(run, len(requests))
    row["speedup_pairs_per_s"] = row["shared"]["pairs_per_s"] / row["per_prompt"]["pairs_per_s"]
    row["speedup_pairs_per_cpu_s"] = row["shared"]["pairs_per_cpu_s"] / row["per_prompt"]["pairs_per_cpu_s"]
    row["tokens_ratio"] = row["per_prompt"]["tokens_per_pair"] / row["shared"]["tokens_per_pair"]
    print(
        f"k={k}: {row['pairs']} pairs, speed-up {row['speedup_pairs_per_s']:.2f}x "
        f"({row['speedup_pairs_per_cpu_s']:.2f}x per CPU-s), max |Δ log P| {row['max_abs_diff_logp_sum']:.2e}",
        flush=True,
    )
    return row


def prefix_share(args: argparse.Namespace, lm: LoadedLM) -> dict:
    """Per-prompt vs prefix-shared :meth:`LMLikelihood.loglik` on the same turns and the same settings-after template,
    at each k.

    Why interleaved: on a shared machine the load changes within seconds, so the turns are cut into ``--chunks``
    chunks and the two paths take turns on each chunk (which path goes first alternates), so both see the same
    conditions; a path's time is the sum over chunks, and the fastest of ``--repeats`` such passes is kept.
    CPU time (``time.process_time``, all threads) is recorded too: it is what the work costs whatever else runs.
    """
    model, tok, device, dtype_name, max_length, load_s = lm
    ks, corpus, sample = prefix_share_setup(args)
    template = PromptTemplate(settings_position="after")
    kwargs = dict(max_length=max_length, max_batch_tokens=args.max_batch_tokens)
    likelihoods = {
        "per_prompt": LMLikelihood(model, tok, template, share_prefix=False, **kwargs),
        "shared": LMLikelihood(model, tok, template, **kwargs),
    }
    warm = prefix_share_requests(corpus, sample[:2], min(ks), args.seed)
    for likelihood in likelihoods.values():
        likelihood.loglik(warm)
    rows = [measure_k(k, args, corpus, sample, likelihoods, device) for k in ks]
    config = {**vars(args), "max_length": max_length, "device": str(device), "dtype": dtype_name}
    results = {
        "config": {**config, "data_source": corpus.source, "template": "settings_position=after"},
        "random_weights": args.lm == RANDOM_SMOLLM2,
        "machine": machine_info(device),
        "model_load_s": load_s,
        "rows": rows,
    }
    print_prefix_share_report(results)
    write_json(args.json, results)
    head = next((r for r in rows if r["k"] == 5), rows[0])
    print(
        f"prefix-shared vs per-prompt at k={head['k']}: {head['speedup_pairs_per_s']:.2f}x pairs/s"
    )  # last line
    return results


def print_prefix_share_report(r: dict) -> None:
    """The per-k table of both paths, in Markdown."""
    c, mach = r["config"], r["machine"]
    where = mach["gpu"] or f"{mach['cpu_count']} CPU cores, {mach['torch_threads']} torch threads"
    print(
        f"\n## Prefix-shared LM scoring: {c['lm']} ({c['dtype']}) on {c['device']} ({where}), torch {mach['torch']}"
    )
    if r["random_weights"]:
        print(
            "**Random weights, byte tokenizer: speed only; log-likelihoods and token counts are not SmolLM2's.**"
        )
    print(
        f"data: {c['data_source']}; template settings_position=after; max_length {c['max_length']}, "
        f"max_batch_tokens {c['max_batch_tokens']}; the two paths take turns on each of up to {c['chunks']} chunks "
        f"of turns; fastest of {c['repeats']} pass(es) per path\n"
    )
    mem = "CUDA peak Δ MiB" if c["device"].startswith("cuda") else "RSS peak Δ MiB"
    print(
        "| k | turns | pairs | prefix tokens | tokens/pair per-prompt | tokens/pair prefix-shared | pairs/s per-prompt "
        f"| pairs/s prefix-shared | speed-up (pairs/s) | speed-up (pairs/CPU-s) | tokens ratio | max abs Δ log P "
        f"| {mem} per-prompt / shared |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in r["rows"]:
        a, b = x["per_prompt"], x["shared"]
        key = "cuda_peak_delta_mib" if c["device"].startswith("cuda") else "rss_peak_delta_mib"
        m = "n/a" if a[key] is None else f"{a[key]:.0f} / {b[key]:.0f}"
        print(
            f"| {x['k']} | {x['turns']} | {x['pairs']} | {x['mean_prefix_tokens']:.0f} | {a['tokens_per_pair']:.1f} "
            f"| {b['tokens_per_pair']:.1f} | {a['pairs_per_s']:.2f} | {b['pairs_per_s']:.2f} "
            f"| {x['speedup_pairs_per_s']:.2f}x | {x['speedup_pairs_per_cpu_s']:.2f}x | {x['tokens_ratio']:.2f}x "
            f"| {x['max_abs_diff_logp_sum']:.1e} | {m} |"
        )
    same = all(x["same_token_counts"] for x in r["rows"])
    print(f"\nsame response token counts on both paths: {same}")


if __name__ == "__main__":
    main()
