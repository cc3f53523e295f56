"""Benchmarks stay runnable: each script's smoke invocation (tiny models / sizes, seconds) finishes and prints its
table, and its JSON holds the figures the docs quote."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replugchar.retrieval.index import SettingIndex

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"benchmarks/{script}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    return proc


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_ceiling_smoke_run_prints_every_probe_against_similarity(tmp_path):
    out_json = tmp_path / "ceiling.json"
    proc = run_script(
        "agreement_ceiling.py", "--folds", "3", "--steps", "20", "--json", out_json,
        "--config", "configs/debug.yaml", "--data.max_train_examples", "12", "--data.max_val_examples", "4",
    )  # fmt: skip
    result = json.loads(out_json.read_text())
    assert result["folds"] == 3 and result["k"] == 5 and result["n"] == 12 + 4  # the caps reach load_run
    probes = [r["probe"] for r in result["rows"]]
    assert probes[0].startswith("similarity") and len(probes) == 1 + 3 * 2  # 3 probes x 2 default l2 values
    for row in result["rows"]:
        assert 0.0 <= row["agreement"] <= 1.0
        if "diff" in row:
            assert row["lo"] <= row["diff"] <= row["hi"]
        assert f"| {row['probe']} | {row['agreement']:.4f} |" in proc.stdout
    assert "16 examples" in proc.stdout and "3-fold CV by character" in proc.stdout


def test_lm_likelihood_smoke_run_prints_the_four_methods(tmp_path):
    out_json = tmp_path / "lm.json"
    proc = run_script(
        "lm_likelihood.py", "--lm", "tiny:gpt2", "--data", "demo", "--pairs", "40", "--naive_pairs", "10",
        "--threads", "1", "--json", out_json,
    )  # fmt: skip
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert rows["naive"]["pairs"] == 10 and rows["batched"]["pairs"] == rows["cached"]["pairs"] == 40
    assert result["cache"]["lm_calls_second_epoch"] == 0  # the cached epoch never calls the LM
    agree = result["naive_vs_batched"]
    assert agree["same_token_counts"] and agree["max_abs_diff_logp_sum"] < 1e-3  # same scores, batched or not
    assert 0 < result["padding_efficiency"] <= 1
    for label in (
        "(a) naive per-pair loop",
        "(b) LMLikelihood.loglik",
        "(c) raw forward",
        "(d) CachedLikelihood 2nd epoch",
    ):
        assert f"| {label}" in proc.stdout
    assert "demo_data" in result["config"]["data_source"]


def test_lm_likelihood_prefix_share_smoke_run_prints_both_paths_at_every_k(tmp_path):
    out_json = tmp_path / "prefix.json"
    proc = run_script(
        "lm_likelihood.py", "--prefix_share", "--lm", "tiny:gpt2", "--data", "demo", "--pairs", "24",
        "--min_turns", "2", "--threads", "1", "--json", out_json,
    )  # fmt: skip
    result = json.loads(out_json.read_text())
    rows = {r["k"]: r for r in result["rows"]}
    assert list(rows) == [5, 10, 60]
    assert rows[5]["turns"] == 4 and rows[5]["pairs"] == 4 * 6 and rows[60]["pairs"] == 2 * 61
    for row in rows.values():
        assert (
            row["same_token_counts"] and row["max_abs_diff_logp_sum"] < 1e-3
        )  # the same scores on both paths
        # the dialogue goes through the model once per turn, not k + 1 times
        assert row["shared"]["tokens_per_pair"] < row["per_prompt"]["tokens_per_pair"]
        assert f"| {row['k']} | {row['turns']} | {row['pairs']} |" in proc.stdout
    assert rows[60]["tokens_ratio"] > rows[5]["tokens_ratio"]  # the saving grows with k
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"prefix-shared vs per-prompt at k=5: \d+\.\d\dx pairs/s", last), last
    assert f"{rows[5]['speedup_pairs_per_s']:.2f}x" in last
    assert "demo_data" in result["config"]["data_source"]


def test_index_scale_smoke_run_reports_the_package_search_defaults(tmp_path):
    out_json = tmp_path / "index.json"
    proc = run_script(
        "index_scale.py", "--sizes", "400", "--dim", "16", "--queries", "20", "--repeats", "1",
        "--cluster_size", "20", "--json", out_json,
    )  # fmt: skip
    result = json.loads(out_json.read_text())
    [size] = result["sizes"]
    kinds = size["kinds"]
    assert size["n"] == 400 and set(kinds) == {"flat", "ivf", "hnsw"}
    assert kinds["flat"]["default"]["recall"] == 1.0  # exact: the ground truth
    params = inspect.signature(SettingIndex.search).parameters
    assert kinds["ivf"]["default"]["nprobe"] == params["nprobe"].default
    assert kinds["hnsw"]["default"]["ef_search"] == params["ef_search"].default == 256
    assert 1 < kinds["ivf"]["params"]["nlist"] <= 400 // 39  # several lists: a real approximate search
    for kind in ("ivf", "hnsw"):
        assert all(0.0 <= s["recall"] <= 1.0 for s in kinds[kind]["sweep"])
    assert "| 400 | flat |" in proc.stdout and "| 400 | hnsw M=32" in proc.stdout
    assert "ef_search=256" in proc.stdout  # the default is measured even when the sweep stops before it
    # the serving path: every kind gives flat's per-character top-k, scores included
    for kind in ("flat", "ivf", "hnsw"):
        served = kinds[kind]["per_character"]
        assert served["same_ids_as_flat"] and served["max_abs_score_diff"] < 1e-5 and served["qps"] > 0, kind
    assert "Serving path" in proc.stdout and "| 400 | ivf |" in proc.stdout


def test_index_scale_reads_its_defaults_from_the_search_signature(monkeypatch):
    index_scale = load_benchmark("index_scale")
    params = inspect.signature(SettingIndex.search).parameters
    assert {
        "ivf": {"nprobe": params["nprobe"].default},
        "hnsw": {"ef_search": params["ef_search"].default},
        "flat": {},
    } == index_scale.DEFAULTS

    def search(self, query_emb, k, *, character_ids=None, prior_weight=0.0, nprobe=3, ef_search=77):
        raise AssertionError("not called")

    monkeypatch.setattr(SettingIndex, "search", search)
    assert index_scale.search_defaults() == {"ivf": {"nprobe": 3}, "hnsw": {"ef_search": 77}, "flat": {}}


def test_training_signal_smoke_run_prints_every_variant_with_an_interval(tmp_path):
    out_json = tmp_path / "signal.json"
    proc = run_script(
        "training_signal.py", "--config", "configs/debug.yaml", "--epochs", "2", "--n_boot", "50",
        "--json", out_json, "--data.max_train_examples", "16",
    )  # fmt: skip
    rows = json.loads(out_json.read_text())
    bench = load_benchmark("training_signal")
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    for row in rows:
        assert row["n"] == 16 and len(row["weights"]) == 2 and len(row["weights"][0]) == 4
        assert row["ci"][0] <= row["delta"] <= row["ci"][1]
        assert f"| {row['variant']} | {row['delta']:+.4f}" in proc.stdout
