"""Characters and dialogue examples: schema, validation, character-disjoint split.

The on-disk schema is the one of ``../shared/data`` (``characters.jsonl`` + ``dialogues.jsonl``). Every record
is validated line by line so a user sees ``file:line: field: problem`` instead of a KeyError deep in training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

QUERY_TYPES = ("greeting", "closing", "other")
ROLES = ("user", "character")
MAX_TEXT_CHARS = 4000
"""Texts longer than this are rejected at load time: a setting or turn this long is almost always a data bug,
and the LM prompt has a token budget anyway (see :mod:`replugchar.lm.likelihood` for the truncation policy)."""


class DataError(ValueError):
    """A malformed input record. The message names the file, the line and the field."""


@dataclass(frozen=True)
class Character:
    character_id: str
    settings: tuple[str, ...]
    language: str = "en"
    name: str | None = None


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class Example:
    """One (dialogue so far, query) -> gold response of ``character_id``.

    ``context`` is what the LM prompt shows (the data file's last turns); ``history`` is the whole session
    before the query (from ``sessions.jsonl`` when the folder has it, else ``context``), which the
    dialogue-aware retriever turns into features (see :mod:`replugchar.core.scoring`).
    """

    example_id: str
    character_id: str
    dialogue_id: str
    query: str
    response: str
    context: tuple[Turn, ...] = ()
    query_type: str = "other"
    shown_setting_indices: tuple[int, ...] | None = None
    history: tuple[Turn, ...] | None = None

    @property
    def dialogue(self) -> tuple[Turn, ...]:
        """The session before the query, oldest first: ``history`` when known, else ``context``."""
        return self.context if self.history is None else self.history


QueryText = Literal["query", "context_and_query"]
QUERY_TEXTS = get_args(QueryText)


def query_text(example: Example, mode: QueryText = "query") -> str:
    """The text the encoder embeds for a query: the one rule shared by training, ``Retriever`` and evaluation.

    ``context_and_query`` prepends the last context turn; it is kept for old runs only: pasting dialogue into the
    query raises the similarity of settings the character already voiced, the wrong direction (use the
    dialogue features of :mod:`replugchar.core.scoring` instead).
    """
    if mode == "query":
        return example.query
    if mode == "context_and_query":
        return (example.context[-1].text + "\n" if example.context else "") + example.query
    raise ValueError(f"query_text must be one of {QUERY_TEXTS}, got {mode!r}")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line; a bad line raises :class:`DataError` naming file:line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM (Windows editors)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _text(record: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    _check_text(value, f"field '{key}'", where)
    return value


def _check_text(value: str, field: str, where: str) -> None:
    if not value.strip():
        raise DataError(f"{where}: {field} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: {field} has {len(value)} characters (limit {MAX_TEXT_CHARS})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate such as "\ud800" is valid JSON but not text
        raise DataError(
            f"{where}: {field} is not valid Unicode ({err.reason} at character {err.start})"
        ) from None


def load_characters(path: str | Path) -> dict[str, Character]:
    path = Path(path)
    characters: dict[str, Character] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        cid = _text(rec, "character_id", where)
        if cid in characters:
            raise DataError(f"{where}: duplicate character_id '{cid}'")
        settings = rec.get("settings")
        if not isinstance(settings, list):
            raise DataError(f"{where}: field 'settings' must be a list of strings")
        if not settings:
            raise DataError(f"{where}: character '{cid}' has no settings")
        first: dict[str, int] = {}
        for i, s in enumerate(settings):
            if not isinstance(s, str):
                raise DataError(f"{where}: field 'settings[{i}]' must be a string, got {type(s).__name__}")
            _check_text(s, f"field 'settings[{i}]'", where)
            norm = " ".join(s.split())  # "I like dogs." and "I like  dogs. " are the same setting
            if norm in first:
                raise DataError(
                    f"{where}: character '{cid}' has duplicate settings: 'settings[{i}]' repeats "
                    f"'settings[{first[norm]}]' ({s!r})"
                )
            first[norm] = i
        language = _text(rec, "language", where, required=False) or "en"
        name = _text(rec, "name", where, required=False)
        characters[cid] = Character(cid, tuple(settings), language, name)
    if not characters:
        raise DataError(f"{path}: no characters")
    return characters


def load_sessions(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """``dialogue_id -> [(speaker_id, text), ...]`` from a ``sessions.jsonl``: the whole dialogues, whose
    history the dialogue-aware retriever reads (``dialogues.jsonl`` keeps only the last 4 turns)."""
    path = Path(path)
    sessions: dict[str, list[tuple[str, str]]] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        did = _text(rec, "dialogue_id", where)
        turns = rec.get("turns")
        if not isinstance(turns, list):
            raise DataError(f"{where}: field 'turns' must be a list")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: field 'turns[{i}]' must be an object")
            out.append(
                (
                    _text(turn, "speaker_id", f"{where}: turns[{i}]"),
                    _text(turn, "text", f"{where}: turns[{i}]"),
                )
            )
        sessions[did] = out
    return sessions


def _history(
    rec: dict, cid: str, query: str, sessions: dict[str, list[tuple[str, str]]], where: str
) -> tuple[Turn, ...] | None:
    """The session's turns before the query, roles relative to ``cid``; None when the session is unknown."""
    did, t = rec.get("dialogue_id"), rec.get("turn_index")
    if did not in sessions or t is None:
        return None
    turns = sessions[did]
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= len(turns):
        raise DataError(
            f"{where}: field 'turn_index' must be in [1, {len(turns)}] for session '{did}', got {t!r}"
        )
    if " ".join(turns[t - 1][1].split()) != " ".join(query.split()):
        raise DataError(f"{where}: field 'query' is not turn {t - 1} of session '{did}' in sessions.jsonl")
    return tuple(Turn("character" if spk == cid else "user", text) for spk, text in turns[: t - 1])


def load_examples(
    path: str | Path,
    characters: dict[str, Character],
    sessions: dict[str, list[tuple[str, str]]] | None = None,
) -> list[Example]:
    path = Path(path)
    examples: list[Example] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        eid = _text(rec, "example_id", where)
        if eid in seen:
            raise DataError(f"{where}: duplicate example_id '{eid}'")
        seen.add(eid)
        cid = _text(rec, "character_id", where)
        if cid not in characters:
            raise DataError(f"{where}: field 'character_id': unknown character '{cid}'")
        context = rec.get("context") or []
        if not isinstance(context, list):
            raise DataError(f"{where}: field 'context' must be a list")
        turns = []
        for i, turn in enumerate(context):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise DataError(f"{where}: field 'context[{i}].role' must be one of {ROLES}")
            turns.append(Turn(turn["role"], _text(turn, "text", f"{where}: context[{i}]")))
        query_type = rec.get("query_type") or "other"
        if query_type not in QUERY_TYPES:
            raise DataError(f"{where}: field 'query_type' must be one of {QUERY_TYPES}, got {query_type!r}")
        shown = rec.get("shown_setting_indices")
        n = len(characters[cid].settings)
        if shown is not None:
            if not isinstance(shown, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in shown
            ):
                raise DataError(f"{where}: field 'shown_setting_indices' must be indices in [0, {n})")
            shown = tuple(shown)
        query = _text(rec, "query", where)
        examples.append(
            Example(
                example_id=eid,
                character_id=cid,
                dialogue_id=_text(rec, "dialogue_id", where, required=False) or eid,
                query=query,
                response=_text(rec, "response", where),
                context=tuple(turns),
                query_type=query_type,
                shown_setting_indices=shown,
                history=_history(rec, cid, query, sessions or {}, where),
            )
        )
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


@dataclass
class Corpus:
    """A data folder: characters plus their examples."""

    characters: dict[str, Character]
    examples: list[Example]
    source: str = ""

    @classmethod
    def load(cls, data_dir: str | Path) -> Corpus:
        data_dir = resolve_data_dir(data_dir)
        characters = load_characters(data_dir / "characters.jsonl")
        sessions_path = data_dir / "sessions.jsonl"
        sessions = load_sessions(sessions_path) if sessions_path.exists() else None
        examples = load_examples(data_dir / "dialogues.jsonl", characters, sessions)
        return cls(characters, examples, str(data_dir))

    def to_dataset(self):
        """The examples as a :class:`datasets.Dataset` (for map/filter/Arrow caching in user code)."""
        import datasets

        rows = [
            {
                "example_id": e.example_id,
                "character_id": e.character_id,
                "dialogue_id": e.dialogue_id,
                "query": e.query,
                "response": e.response,
                "context": [{"role": t.role, "text": t.text} for t in e.context],
                "query_type": e.query_type,
                "settings": list(self.characters[e.character_id].settings),
            }
            for e in self.examples
        ]
        return datasets.Dataset.from_list(rows)


def resolve_data_dir(data_dir: str | Path) -> Path:
    """``"demo"`` names the small Synthetic-Persona-Chat subset shipped inside the package."""
    if str(data_dir) == "demo":
        return Path(__file__).parents[1] / "demo_data"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data_dir '{data_dir}' is not a folder (set data.data_dir, or 'demo')")
    return path


SPLITS = ("train", "val", "test")


def check_split(val_fraction: float, test_fraction: float = 0.0, where: str = "data.split") -> None:
    """``ValueError`` naming the option (under ``where``; ``""`` for a command's own ``--flags``) when the
    character split's fractions are out of range."""
    name = f"{where}." if where else "--"
    if not 0 <= val_fraction < 1:
        raise ValueError(f"{name}val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"{name}test_fraction must be in [0, 1 - val_fraction), got {test_fraction} "
            f"(val_fraction={val_fraction})"
        )


def split_of(character_id: str, val_fraction: float, test_fraction: float = 0.0, seed: int = 0) -> str:
    """ "train", "val" or "test" for one character, from a hash of (seed, id) alone.

    Why a hash: a character lands in the same split in every data set that has it (the ``pc-valid-*`` personas
    are in both ConvAI2 and Synthetic-Persona-Chat), and adding characters never moves the others, so a retriever
    trained on one set is evaluated on another only on characters it never saw.
    """
    u = int(hashlib.sha1(f"{seed}:{character_id}".encode()).hexdigest()[:12], 16) / 16**12
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


def split_characters(
    character_ids: Sequence[str], val_fraction: float, seed: int, test_fraction: float = 0.0
) -> dict[str, set[str]]:
    """Character-disjoint split: every character's dialogues are all in one of train / val / test."""
    out: dict[str, set[str]] = {name: set() for name in SPLITS}
    for cid in character_ids:
        out[split_of(cid, val_fraction, test_fraction, seed)].add(cid)
    # a handful of characters can leave a requested split empty: move the train character nearest to it
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not out[name] and len(out["train"]) > 1:
            cid = min(out["train"], key=lambda c: hashlib.sha1(f"{seed}:{name}:{c}".encode()).hexdigest())
            out["train"].remove(cid)
            out[name].add(cid)
    return out


@dataclass(frozen=True)
class SplitSpec:
    """Which character is in which split (``data.split``): a hash of (seed, character id) against two fractions.

    One group read by ``fit``, ``finetune-lm`` and the tools, and stored in retriever.json as ``"split"``
    (:meth:`to_dict`), which ``evaluate`` and ``teacher-report --retriever`` read back instead of re-declaring it;
    so no validation or test character reaches training data."""

    val_fraction: float = 0.2
    """Share of *characters* held out for validation (no character is in two splits); hashed per character id
    (:func:`split_of`), so a character lands in the same split in every data set."""
    test_fraction: float = 0.0
    """Share of characters kept out of training *and* validation, for ``evaluate --split test`` after
    ``priors fit-weight`` has tuned the mixing on validation."""
    seed: int = 0
    """Seed of the character split; the data modules also seed their example caps (and ``finetune-lm`` its
    example order and settings draws) with it."""

    def __post_init__(self) -> None:
        check_split(self.val_fraction, self.test_fraction)

    def assign(self, character_ids: Sequence[str]) -> dict[str, set[str]]:
        """``{"train", "val", "test"} -> character ids`` (:func:`split_characters`)."""
        return split_characters(character_ids, self.val_fraction, self.seed, self.test_fraction)

    def to_dict(self) -> dict[str, float | int]:
        """The retriever.json ``"split"`` record: ``{val_fraction, test_fraction, seed}``."""
        return {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed}
