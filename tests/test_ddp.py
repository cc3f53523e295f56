"""Scale out: ``replugchar fit`` under Lightning DDP (2 CPU processes, gloo) scores the same (example, setting)
pairs into the log-likelihood cache as 1 process, each rank into its own shards, and reports the same validation loss
before training."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow

# configs/debug.yaml: 24 training + 8 validation examples of the demo data, batch 4, k = 5 = every demo
# character's number of settings, so each example is scored with all 5 of its settings whatever the encoder:
# one epoch scores (24 + 8) x 5 pairs in either run; then ExportRetriever fits the dialogue scale on the
# validation examples, which adds one no-setting prompt per validation example.
N_PAIRS = (24 + 8) * 5 + 8


def fit(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "replugchar.cli", "fit", "--config", "configs/debug.yaml",
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
        "--model.lm.loglik_cache_dir", str(run_dir / "cache"),
        "--trainer.max_epochs", "1", "--trainer.max_steps", "-1",  # one epoch: every pair is scored
        *extra,
    ]  # fmt: skip
    # $REPLUGCHAR_CACHE (tiny models) comes from conftest; the DDP launcher re-runs this command for rank 1
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def read_cache(cache: Path) -> tuple[dict[str, list[float]], list[str]]:
    """key -> logp_sum of every shard that holds it (one entry per shard), and the shard names."""
    shards = sorted(cache.glob("*/shard-*.parquet"))
    scores: dict[str, list[float]] = {}
    for shard in shards:
        table = pq.read_table(shard, columns=["key", "logp_sum"])
        for key, value in zip(table.column("key").to_pylist(), table.column("logp_sum").to_pylist()):
            scores.setdefault(key, []).append(value)
    return scores, [s.name for s in shards]


def val_before_training(run_dir: Path) -> dict[str, float]:
    """The first validation row of metrics.csv: the before-training validation that LSRCLI.before_fit runs."""
    path = next(run_dir.rglob("metrics.csv"))
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("val/loss"):
                return {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
    raise AssertionError(f"no validation row in {path}")


def printed_val_loss(stdout: str) -> tuple[float, float]:
    m = re.search(r"val/loss\s+(-?\d+\.\d+) -> (-?\d+\.\d+)", stdout)
    assert m, stdout[-3000:]
    return float(m.group(1)), float(m.group(2))


def test_ddp_two_cpu_processes_fill_the_same_cache_and_report_the_same_val_loss(tmp_path):
    one, two = tmp_path / "one", tmp_path / "ddp"
    single = fit(one, "--trainer.devices", "1")  # first: it also builds the tiny models in $REPLUGCHAR_CACHE
    assert single.returncode == 0, single.stderr[-4000:]
    ddp = fit(two, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stderr  # really 2 processes

    # (b) the same pairs, the same scores (float32 LM batches of other composition: last-bit differences)
    scores_1, shards_1 = read_cache(one / "cache")
    scores_2, shards_2 = read_cache(two / "cache")
    assert len(scores_1) == N_PAIRS
    assert set(scores_2) == set(scores_1)
    keys = sorted(scores_1)
    np.testing.assert_allclose(
        [scores_2[k][0] for k in keys], [scores_1[k][0] for k in keys], rtol=1e-5, atol=1e-4
    )

    # (c) each rank wrote its own shards, and each pair went through the LM on one rank only. The DDP sampler
    # gives rank r the examples r, r + 2, ... and pads a rank with another rank's examples only when the split
    # is uneven (24 and 8 examples over 2 ranks are even): a padded example would be scored on both ranks, and
    # then the two shards must agree on it. No duplicate also shows that no validation example was repeated.
    assert {re.match(r"shard-(r\d+)-", s).group(1) for s in shards_1} == {"r0"}
    assert {re.match(r"shard-(r\d+)-", s).group(1) for s in shards_2} == {"r0", "r1"}
    duplicated = {k: v for k, v in scores_2.items() if len(v) > 1}
    for key, values in duplicated.items():
        np.testing.assert_allclose(values, values[0], rtol=1e-5, atol=1e-4, err_msg=key)
    assert not duplicated

    # the training set was sharded, not repeated: 24 examples / (batch 4 x 2 ranks) = 3 steps on each rank
    assert [p.name for p in two.rglob("*.ckpt")] == ["epoch=0-step=3.ckpt"]
    assert [p.name for p in one.rglob("*.ckpt")] == ["epoch=0-step=6.ckpt"]

    # (d) before training both runs validate the same initial encoder on the whole validation set. Under DDP each
    # rank sees 4 of the 8 queries; the module logs with sync_dist=True, so the epoch value is the mean of the
    # two ranks' means, which with equal (unpadded, see above) shards is the mean over all 8 queries.
    before_1, before_2 = val_before_training(one), val_before_training(two)
    for key in ("val/loss", "val/top1_agreement", "val/retriever_entropy", "val/lm_entropy"):
        assert before_2[key] == pytest.approx(before_1[key], abs=1e-4), key
    assert printed_val_loss(ddp.stdout)[0] == pytest.approx(printed_val_loss(single.stdout)[0], abs=1e-4)

    # rank 0 alone reports and exports; its paired change covers both ranks' validation examples
    assert ddp.stdout.count("validation before -> after training") == 1
    assert ddp.stdout.count("(8 examples,") == 2 and single.stdout.count("(8 examples,") == 2
    assert f"exported retriever: {two / 'retriever'}" in ddp.stdout
    assert (two / "retriever" / "index.faiss").is_file()
