"""SIGKILL at the worst moment, then run again: finished work is kept, nothing half-written is ever read.

(a) LM scoring behind the Parquet log-likelihood cache, (b) LightningCLI training resumed from last.ckpt,
(c) SettingIndex.save and export_retriever killed while writing.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, score_requests, sigkill, start_python, subprocess_env, tiny_gpt2, wait_until
from torch.utils.data import DataLoader

from replugchar.lm.likelihood import LMLikelihood
from replugchar.lm.loglik_cache import CachedLikelihood

pytestmark = pytest.mark.usefixtures("rc_cache")

N_REQUESTS, CHUNK, SHARD = 64, 4, 8

VICTIM_SCRIPT = f"""
import sys, threading, time
from pathlib import Path
import numpy as np
import pyarrow.parquet as pq
sys.path.insert(0, {str(REPO / "tests")!r})
from conftest import score_requests  # tests/conftest.py
from replugchar.core.data import Character
from replugchar.retrieval.export import export_retriever
from replugchar.retrieval.index import SettingIndex, setting_records
from replugchar.lm.likelihood import LMLikelihood
from replugchar.lm.models import load_causal_lm
from replugchar.training.module import LSRModule
from replugchar.lm.loglik_cache import CachedLikelihood, LikelihoodOptions

root = Path(sys.argv[1])
characters = {{"c1": Character("c1", ("I bake bread.", "I have a cat.")), "c2": Character("c2", ("I sail.",))}}
records = setting_records(characters)
emb = np.eye(len(records), 8, dtype=np.float32)
module = LSRModule(encoder="tiny:bert", lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None))
module.characters = characters
module.eval()

# (c) version 1, complete, of the two folders that already exist when the kill comes
SettingIndex.build(emb, records, encoder_fingerprint="v1").save(root / "index_old")
export_retriever(module, root / "export_old", metrics={{"version": 1.0}})

original = SettingIndex.write_files

def slow_write(self, folder):
    original(self, folder)
    settings = folder / "settings.jsonl"
    settings.write_bytes(settings.read_bytes()[:30])  # half-written, as if the disk were slow
    (root / "ready" / threading.current_thread().name).touch()
    time.sleep(600)

SettingIndex.write_files = slow_write
jobs = {{
    "index_new": lambda: SettingIndex.build(emb, records, encoder_fingerprint="v2").save(root / "index_new"),
    "index_old": lambda: SettingIndex.build(emb, records, encoder_fingerprint="v2").save(root / "index_old"),
    "export_new": lambda: export_retriever(module, root / "export_new", metrics={{"version": 2.0}}),
    "export_old": lambda: export_retriever(module, root / "export_old", metrics={{"version": 2.0}}),
}}
(root / "ready").mkdir()
for name, job in jobs.items():
    threading.Thread(target=job, name=name, daemon=True).start()

# (a) LM scoring into the cache; the third shard write hangs half-way, as a slow disk would
real_write_table, shard_writes = pq.write_table, []

def hanging_write_table(table, where, **kwargs):
    real_write_table(table, where, **kwargs)
    shard_writes.append(where)
    if len(shard_writes) == 3:
        path = Path(where)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        (root / "ready" / "shard-writer").touch()
        time.sleep(600)

pq.write_table = hanging_write_table
model, tok = load_causal_lm("tiny:gpt2")
cache = CachedLikelihood(LMLikelihood(model, tok, max_length=256), root / "scores", shard_size={SHARD})
requests = score_requests({N_REQUESTS})
for i in range(0, len(requests), {CHUNK}):
    cache.loglik(requests[i : i + {CHUNK}])
cache.flush()
print("FINISHED", flush=True)
"""
WRITERS = ("index_new", "index_old", "export_new", "export_old")
HANGING = (*WRITERS, "shard-writer")


@pytest.fixture(scope="module")
def killed_victim(tmp_path_factory, session_cache) -> Path:
    """One process (one interpreter start) scoring into a cache while four index/export writes hang
    mid-write; SIGKILLed once those and the third score-shard write are stuck half-way."""
    root = tmp_path_factory.mktemp("victim")
    script, log = root / "victim.py", root / "victim.log"
    script.write_text(VICTIM_SCRIPT)
    out = root / "out"
    out.mkdir()
    proc = start_python(script, str(out), log=log, cache=session_cache)

    wait_until(lambda: all((out / "ready" / name).exists() for name in HANGING), proc, log, timeout=150)
    sigkill(proc)
    assert "FINISHED" not in log.read_text()
    return out


def test_loglik_killed_mid_run_keeps_whole_shards_and_resumes(killed_victim, tmp_path):
    import shutil

    cache_dir = shutil.copytree(killed_victim / "scores", tmp_path / "scores")  # the rerun below adds shards

    [folder] = [p for p in cache_dir.iterdir() if p.is_dir()]
    shards = sorted(folder.glob("shard-*.parquet"))
    [half_written] = folder.glob(".shard-*.parquet.tmp-*")  # the third write, cut by the kill ...
    assert len(shards) == 2  # ... never visible under a final shard name
    assert {p.name for p in folder.iterdir()} == {"FINGERPRINT", half_written.name, *(p.name for p in shards)}
    for shard in shards:  # every visible shard is whole: readable, exactly one flush worth of rows
        assert pq.read_table(shard).num_rows == SHARD
    with pytest.raises(pa.ArrowException):  # the temp file really is broken
        pq.read_table(half_written)

    model, tok = tiny_gpt2()
    lm = LMLikelihood(model, tok, max_length=256)
    rerun = CachedLikelihood(lm, cache_dir, shard_size=SHARD)
    cached = len(rerun)
    assert cached == 2 * SHARD
    requests = score_requests(N_REQUESTS)
    resumed = rerun.loglik(requests)
    assert lm.pairs_computed == N_REQUESTS - cached  # nothing that a shard holds is scored again
    assert rerun.hits == cached
    # the cached scores are the LM's scores, not garbage from the killed process
    hit = [r for r in requests[:40] if r in CachedLikelihood(None, cache_dir, fingerprint=lm.fingerprint)]
    fresh = LMLikelihood(model, tok, max_length=256).loglik(hit)
    idx = [requests.index(r) for r in hit]
    np.testing.assert_allclose(resumed.logp_sum[idx], fresh.logp_sum, rtol=1e-5, atol=1e-5)


def test_damaged_shard_is_skipped_and_recomputed(tmp_path, caplog):
    model, tok = tiny_gpt2()
    requests = score_requests(12)
    first = CachedLikelihood(LMLikelihood(model, tok, max_length=256), tmp_path, shard_size=6)
    first.loglik(requests[:6])
    first.loglik(requests[6:])
    shards = sorted(first.folder.glob("shard-*.parquet"))
    assert len(shards) == 2
    shards[0].write_bytes(shards[0].read_bytes()[:40])  # e.g. a copy cut short by a full disk
    lm = LMLikelihood(model, tok, max_length=256)
    with caplog.at_level(logging.WARNING, logger="replugchar.lm.loglik_cache"):
        again = CachedLikelihood(lm, tmp_path, shard_size=6)
    assert len(again) == 6 and "skipping unreadable shard" in caplog.text
    np.testing.assert_allclose(again.loglik(requests).logp_sum, first.loglik(requests).logp_sum, rtol=1e-5)
    assert lm.pairs_computed == 6


# ----------------------------------------------------------------------------------------------- training
def _fit_overrides(root: Path) -> Path:
    path = root / "kill.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        trainer:
          max_steps: 200
          limit_val_batches: 0
          enable_model_summary: false
          default_root_dir: {root}
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args:
              save_dir: {root}
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args:
                dirpath: {root / "ckpts"}
                every_n_train_steps: 2
                save_last: true
                save_top_k: -1
        data:
          max_train_examples: 8
        """)
    )
    return path


def _fit_args(overrides: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--config", str(overrides), *extra]


def _start_fit(overrides: Path, log: Path, *extra: str) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replugchar.cli", *_fit_args(overrides, *extra)],
            cwd=REPO,
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _trained_steps(root: Path) -> list[int]:
    """Steps with a train/loss row in the newest CSVLogger version (the latest run)."""
    version = max((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with (version / "metrics.csv").open() as f:
        rows = csv.DictReader(f)
        return sorted(
            {
                int(r["step"])
                for r in rows
                if any(v for k, v in r.items() if k.startswith("train/") and not k.endswith("_epoch"))
            }
        )


def _stable(path: Path) -> bool:
    if not path.exists():
        return False
    size = path.stat().st_size
    time.sleep(0.2)
    return size > 0 and path.stat().st_size == size


def test_training_killed_then_resumed_from_last_ckpt(tmp_path, monkeypatch):
    from replugchar.cli import main

    root, log = tmp_path / "run", tmp_path / "fit.log"
    root.mkdir()
    overrides = _fit_overrides(root)
    last = root / "ckpts" / "last.ckpt"

    proc = _start_fit(overrides, log)
    wait_until(lambda: _stable(last), proc, log, timeout=120)
    sigkill(proc)
    killed_at = _step(last)
    assert killed_at >= 2 and killed_at % 2 == 0

    # resume from the file, in-process through the console script's entry point (a second interpreter start
    # costs more than the whole resumed run): main() returns normally, i.e. the command would exit 0, and it
    # trains steps killed_at+1 .. killed_at+2 only
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    assert (
        main(_fit_args(overrides, "--trainer.max_steps", str(killed_at + 2), "--ckpt_path", str(last)))
        is None
    )
    assert _step(last) == killed_at + 2
    assert _trained_steps(root) == [killed_at, killed_at + 1]  # CSV rows are 0-based steps before the update

    # LightningCLI's ckpt_path=last finds ModelCheckpoint's last.ckpt (dirpath is fixed across runs)
    main(_fit_args(overrides, "--trainer.max_steps", str(killed_at + 4), "--ckpt_path", "last"))
    assert _step(last) == killed_at + 4
    assert _trained_steps(root) == [killed_at + 2, killed_at + 3]


# ----------------------------------------------------------------------------------------------- index / export
def test_index_and_export_killed_while_writing_are_absent_or_whole(killed_victim):
    from sentence_transformers import SentenceTransformer

    from replugchar.retrieval.index import SettingIndex

    root = killed_victim

    # every temp folder of the four killed writes is still there, under a hidden temp name only
    assert len(list(root.glob(".*.tmp-*"))) == 4
    assert not (root / "index_new").exists() and not (root / "export_new").exists()
    old = SettingIndex.load(root / "index_old", expected_dim=8)  # the previous version, whole
    assert old.meta["encoder_fingerprint"] == "v1" and len(old.records) == 3
    exported = root / "export_old"
    assert json.loads((exported / "retriever.json").read_text())["metrics"] == {"version": 1.0}
    index = SettingIndex.load(exported, expected_dim=32)
    encoder = SentenceTransformer(str(exported / "encoder"), device="cpu")
    assert encoder.encode(["hello"]).shape == (1, index.dim)

    # the next write of a target removes what its killed writer left; other targets' leftovers stay
    old.save(root / "index_old")
    assert not list(root.glob(".index_old.*")) and len(list(root.glob(".*.tmp-*"))) == 3
    assert SettingIndex.load(root / "index_old", expected_dim=8).meta["encoder_fingerprint"] == "v1"


def test_logliks_computed_during_training_reach_the_disk_cache(tmp_path):
    # the cache buffers shard_size=256 scores; the module must flush what an epoch/fit leaves behind,
    # or every run loses its last <256 pairs and the next run scores them again
    from replugchar.core.data import Character, Example
    from replugchar.lm.loglik_cache import LikelihoodOptions
    from replugchar.training.module import LSRModule

    module = LSRModule(
        encoder="tiny:bert",
        k=2,
        lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=str(tmp_path), max_length=256),
    )
    module.characters = {"c1": Character("c1", ("I bake bread.", "I have a cat.", "I sail."))}
    batches = [[Example(f"e{i}", "c1", f"d{i}", query=f"Hi {i}?", response=f"Hello {i}.")] for i in range(3)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=list))
    scored = len(module.likelihood)
    assert scored == 6
    on_disk = CachedLikelihood(None, tmp_path, fingerprint=module.likelihood.fingerprint)
    assert len(on_disk) == scored
