"""Shared helpers of the reliability/security tests: data folders, tiny models, subprocess plumbing.

Kept out of conftest.py on purpose (another suite owns it); import what you need from here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def session_cache(tmp_path_factory) -> Path:
    """One REPLUGCHAR_CACHE per session (the tiny BERT is built once), never the user's ~/.cache."""
    folder = tmp_path_factory.getbasetemp() / "replugchar-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def rc_cache(tmp_path_factory, monkeypatch) -> Path:
    folder = session_cache(tmp_path_factory)
    monkeypatch.setenv("REPLUGCHAR_CACHE", str(folder))
    return folder


# ----------------------------------------------------------------------------------------------- data
def character(cid: str = "c1", n_settings: int = 3, **extra) -> dict:
    return {"character_id": cid, "settings": [f"{cid} trait number {i}." for i in range(n_settings)], **extra}


def dialogue(eid: str = "e1", cid: str = "c1", **extra) -> dict:
    return {
        "example_id": eid,
        "character_id": cid,
        "query": "Hello! How are you?",
        "response": "Fine, thanks.",
        **extra,
    }


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw str/bytes lines (written as they are)."""
    out = bytearray()
    for row in rows:
        if isinstance(row, bytes):
            out += row
        elif isinstance(row, str):
            out += row.encode()
        else:
            out += json.dumps(row, ensure_ascii=False).encode()
        out += b"\n"
    path.write_bytes(bytes(out))
    return path


def data_dir(tmp_path: Path, characters: list | None = None, dialogues: list | None = None) -> Path:
    """A data folder with two well-formed characters and four dialogues unless given."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    if characters is None:
        characters = [character("c1"), character("c2")]
    if dialogues is None:
        dialogues = [dialogue(f"e{i}", "c1" if i < 2 else "c2") for i in range(4)]
    write_jsonl(folder / "characters.jsonl", characters)
    write_jsonl(folder / "dialogues.jsonl", dialogues)
    return folder


# ----------------------------------------------------------------------------------------------- models
@functools.lru_cache(maxsize=1)
def tiny_gpt2():
    """(model, tokenizer) of the 2-layer GPT-2 with the byte tokenizer (one token per byte of ASCII)."""
    from replugchar.models import load_causal_lm

    return load_causal_lm("tiny:gpt2")


# ----------------------------------------------------------------------------------------------- processes
def subprocess_env(cache: Path | None = None) -> dict[str, str]:
    """This process's environment ($REPLUGCHAR_CACHE from ``rc_cache`` unless ``cache``), one thread."""
    env = dict(os.environ)
    if cache is not None:
        env["REPLUGCHAR_CACHE"] = str(cache)
    # one intra-op thread: the models are tiny and the 2 cores are shared with the test process
    env.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def start_python(script: str | Path, *args: str, log: Path, cache: Path | None = None) -> subprocess.Popen:
    """Run ``python script args`` from the repository root, stdout+stderr into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=REPO,
            env=subprocess_env(cache),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Poll ``condition`` while ``proc`` runs; fail with the process log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"process exited with {proc.returncode} before the condition held:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"condition not met in {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def sigkill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL on POSIX: no cleanup handlers, no finally blocks
    proc.wait(timeout=30)
    assert proc.returncode == -9, f"expected death by SIGKILL, got return code {proc.returncode}"


def score_requests(n: int):
    """``n`` distinct, deterministic (example, setting) requests of varied lengths (no model needed)."""
    from replugchar.data import Example, Turn
    from replugchar.lm_scoring import ScoreRequest

    out = []
    for i in range(n):
        context = tuple(Turn("user" if j % 2 == 0 else "character", f"turn {j} of {i}") for j in range(i % 3))
        ex = Example(
            f"ex{i}",
            "c1",
            f"d{i}",
            query=f"Question {i}?" + " more" * (i % 5),
            response=f"Answer number {i}.",
            context=context,
        )
        out.append(ScoreRequest(ex, (f"I am trait {i % 4}.",)))
    return out
