"""Shared fixtures: tiny models built in code, a small in-code corpus, and a data-folder writer.

Everything here runs offline: ``tiny:gpt2`` / ``tiny:bert`` are 2-layer models with a byte-level tokenizer,
built from a fixed seed (see :mod:`replugchar.models`). The embedded SmolLM2 / MiniLM models are never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from replugchar.data import Character, Example, Turn
from replugchar.models import load_causal_lm, load_encoder


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
def tiny_lm():
    """(model, tokenizer) of the frozen 2-layer GPT-2 with the byte tokenizer. Do not mutate: deepcopy first."""
    return load_causal_lm("tiny:gpt2")


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
