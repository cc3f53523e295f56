"""Benchmarks stay runnable: each one's smoke invocation (tiny models, seconds) finishes and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_agreement_ceiling_smoke_run_prints_every_probe_against_similarity(tmp_path):
    out_json = tmp_path / "ceiling.json"
    cmd = [
        sys.executable, "benchmarks/agreement_ceiling.py", "--folds", "3", "--steps", "20", "--json", str(out_json),
        "--config", "configs/debug.yaml",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["folds"] == 3 and result["k"] == 5
    probes = [r["probe"] for r in result["rows"]]
    assert probes[0].startswith("similarity") and len(probes) == 1 + 3 * 2  # 3 probes x 2 default l2 values
    for row in result["rows"]:
        assert 0.0 <= row["agreement"] <= 1.0
        if "diff" in row:
            assert row["lo"] <= row["diff"] <= row["hi"]
        assert f"| {row['probe']} | {row['agreement']:.4f} |" in proc.stdout
