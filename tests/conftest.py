"""Shared fixtures and helpers: tiny models built in code, a small in-code corpus, data-folder writers, and the
subprocess plumbing of the reliability tests (kill/resume, bad input through the console script).

Everything here runs offline: ``tiny:gpt2`` / ``tiny:bert`` are 2-layer models with a byte-level tokenizer,
built from a fixed seed (see :mod:`replugchar.lm.models`). The embedded SmolLM2 / MiniLM models are never loaded.

Plain helpers (not fixtures) are imported by test modules with ``from conftest import ...`` (pytest puts
``tests/`` on ``sys.path``): ``REPO``, ``character``, ``dialogue``, ``write_jsonl``, ``data_dir``, ``tiny_gpt2``,
``subprocess_env``, ``start_python``, ``wait_until``, ``sigkill``, ``score_requests``.
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
import torch

from replugchar.core.data import Character, Example, Turn
from replugchar.lm.models import load_causal_lm, load_encoder


@pytest.fixture(scope="session", autouse=True)
def _isolated_replugchar_cache(tmp_path_factory):
    """Point ``$REPLUGCHAR_CACHE`` at a session temp folder so no test writes to ``~/.cache``.

    Also pins torch to one thread: the models are tiny, and on a 2-core machine shared with another job
    two intra-op threads make every tiny forward pass several times slower.
    """
    cache = tmp_path_factory.mktemp("replugchar-cache")
    saved = os.environ.get("REPLUGCHAR_CACHE")
    saved_threads = torch.get_num_threads()
    os.environ["REPLUGCHAR_CACHE"] = str(cache)
    torch.set_num_threads(1)
    yield cache
    torch.set_num_threads(saved_threads)
    if saved is None:
        os.environ.pop("REPLUGCHAR_CACHE", None)
    else:
        os.environ["REPLUGCHAR_CACHE"] = saved


@pytest.fixture(scope="session")
def session_cache(_isolated_replugchar_cache) -> Path:
    """The session's ``$REPLUGCHAR_CACHE`` folder (the tiny BERT is built once), never the user's ~/.cache;
    for session- or module-scoped fixtures that start subprocesses."""
    return _isolated_replugchar_cache


@pytest.fixture
def rc_cache(session_cache, monkeypatch) -> Path:
    """``$REPLUGCHAR_CACHE`` pinned to the session cache for one test (even if another test changed it)."""
    monkeypatch.setenv("REPLUGCHAR_CACHE", str(session_cache))
    return session_cache


@functools.lru_cache(maxsize=1)
def tiny_gpt2():
    """(model, tokenizer) of the 2-layer GPT-2 with the byte tokenizer (one token per byte of ASCII), built once
    per process; the same objects as the ``tiny_lm`` fixture. Do not mutate: deepcopy first."""
    return load_causal_lm("tiny:gpt2")


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer) of the frozen 2-layer GPT-2 with the byte tokenizer. Do not mutate: deepcopy first."""
    return tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_encoder():
    """The tiny BERT bi-encoder (32-d, normalised). Session-wide: tests must not train it."""
    return load_encoder("tiny:bert")


@pytest.fixture(scope="session")
def characters() -> dict[str, Character]:
    return {
        "alice": Character(
            "alice",
            (
                "I am a cheerful baker.",
                "I have two cats named Miso and Tofu.",
                "I run marathons every spring.",
                "I grew up by the sea.",
            ),
            name="Alice",
        ),
        "bob": Character(
            "bob",
            ("I am a retired sailor.", "I collect old maps.", "I hate loud music."),
        ),
        "chen": Character(
            "chen",
            (
                "I study astronomy.",
                "I play the violin in an orchestra.",
                "My favourite food is dumplings.",
                "I have never seen snow.",
                "I speak three languages.",
            ),
        ),
    }


@pytest.fixture(scope="session")
def examples(characters) -> list[Example]:
    """12 examples over the 3 characters, with 0 to 3 context turns and responses of varying length."""
    rows = [
        ("alice", "Hello! How are you?", "Hi! I am great, just took bread out of the oven.", ()),
        ("alice", "Do you have pets?", "Yes, two cats.", (("user", "Hi."), ("character", "Hello there!"))),
        ("alice", "What do you do in spring?", "I run a marathon every year.", (("user", "Nice weather."),)),
        ("alice", "Where did you grow up?", "By the sea, in a small town.", ()),
        ("bob", "Hi, who are you?", "An old sailor, retired now.", ()),
        (
            "bob",
            "Do you like concerts?",
            "Not at all, loud music gives me a headache.",
            (("user", "What a day."), ("character", "Indeed."), ("user", "Any plans tonight?")),
        ),
        ("bob", "What is your hobby?", "I collect old maps of the world.", ()),
        ("bob", "Bye!", "Goodbye, take care.", (("user", "Thanks for the chat."),)),
        ("chen", "What do you study?", "Astronomy, mostly variable stars.", ()),
        ("chen", "Do you play music?", "The violin.", (("user", "I love music."), ("character", "Me too."))),
        ("chen", "Favourite food?", "Dumplings, without a doubt!", ()),
        (
            "chen",
            "Have you been skiing?",
            "No, I have never even seen snow.",
            (("user", "It is cold today."),),
        ),
    ]
    out = []
    for i, (cid, query, response, context) in enumerate(rows):
        assert cid in characters
        out.append(
            Example(
                example_id=f"ex-{i:02d}",
                character_id=cid,
                dialogue_id=f"dlg-{i:02d}",
                query=query,
                response=response,
                context=tuple(Turn(role, text) for role, text in context),
                query_type="greeting" if i % 4 == 0 else "other",
            )
        )
    return out


def character_record(character: Character) -> dict:
    return {
        "character_id": character.character_id,
        "settings": list(character.settings),
        "language": character.language,
        "name": character.name,
    }


def example_record(example: Example) -> dict:
    return {
        "example_id": example.example_id,
        "character_id": example.character_id,
        "dialogue_id": example.dialogue_id,
        "context": [{"role": t.role, "text": t.text} for t in example.context],
        "query": example.query,
        "response": example.response,
        "query_type": example.query_type,
    }


DataWriter = Callable[..., Path]


@pytest.fixture
def write_data(tmp_path) -> DataWriter:
    """``write_data(characters, dialogues, name="data") -> folder`` with characters.jsonl and dialogues.jsonl.

    Each item is a dict (written as one JSON line), a :class:`Character` / :class:`Example` (converted to its
    on-disk record), or a str (written verbatim, to inject malformed lines).
    """

    def _line(item) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, Character):
            item = character_record(item)
        elif isinstance(item, Example):
            item = example_record(item)
        return json.dumps(item, ensure_ascii=False)

    def write(characters, dialogues, name: str = "data") -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "characters.jsonl").write_text(
            "".join(_line(c) + "\n" for c in characters), encoding="utf-8"
        )
        (folder / "dialogues.jsonl").write_text("".join(_line(d) + "\n" for d in dialogues), encoding="utf-8")
        return folder

    return write


# ----------------------------------------------------------------------------------------------- raw data records
def three_turn_example() -> Example:
    """A turn after three marked context turns (FIRST, SECOND, THIRD): truncation tests see which turn went."""
    turns = (
        Turn("user", "FIRST turn: good morning to you."),
        Turn("character", "SECOND turn: morning! Lovely day."),
        Turn("user", "THIRD turn: it is indeed."),
    )
    return Example(
        "ex-long", "c", "d", query="Shall we walk?", response="Yes, let us walk by the sea.", context=turns
    )


def character(cid: str = "c1", n_settings: int = 3, **extra) -> dict:
    """A characters.jsonl record with ``n_settings`` distinct settings; ``extra`` adds or overrides fields."""
    return {"character_id": cid, "settings": [f"{cid} trait number {i}." for i in range(n_settings)], **extra}


def dialogue(eid: str = "e1", cid: str = "c1", **extra) -> dict:
    """A dialogues.jsonl record; ``extra`` adds or overrides fields."""
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
    """``tmp_path/data`` with two well-formed characters and four dialogues unless given (rows as for
    :func:`write_jsonl`: dicts, or raw str/bytes lines to inject malformed records)."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    if characters is None:
        characters = [character("c1"), character("c2")]
    if dialogues is None:
        dialogues = [dialogue(f"e{i}", "c1" if i < 2 else "c2") for i in range(4)]
    write_jsonl(folder / "characters.jsonl", characters)
    write_jsonl(folder / "dialogues.jsonl", dialogues)
    return folder


def score_requests(n: int):
    """``n`` distinct, deterministic (example, setting) requests of varied lengths (no model needed)."""
    from replugchar.lm.likelihood import LoglikRequest

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
        out.append(LoglikRequest(ex, (f"I am trait {i % 4}.",)))
    return out


# ----------------------------------------------------------------------------------------------- processes
REPO = Path(__file__).resolve().parents[1]


def subprocess_env(cache: Path | None = None) -> dict[str, str]:
    """This process's environment (``$REPLUGCHAR_CACHE`` = the session cache unless ``cache``), one thread."""
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
    env.pop("REPLUGCHAR_DEBUG", None)  # a user's debug setting would turn one-line errors into tracebacks
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
