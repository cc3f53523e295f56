"""What an export folder may hold, and the checks that it holds exactly that.

An export folder is *data* that users pass around (a colleague's drive, a model hub), so a reader trusts nothing
in it beyond what this module can check:

* ``retriever.json`` has a ``"format"`` version and a fixed schema: every key known, every value of its type.
  A newer format, an unknown key or a misspelled feature name is refused, naming it, instead of being read as
  "weight 0" (which silently turns the learned rule into plain similarity).
* ``manifest.json`` lists the sha256 and size of every other file of the folder, encoder weights included;
  :func:`verify_manifest` refuses a swapped, changed, truncated, missing or added file, naming it. This is what
  keeps "visible whole or not at all" true after the folder has been copied around.
* Nothing in the folder can switch on code execution: ``trust_remote_code`` is never read from it, and the
  encoder's ``modules.json`` may only name sentence-transformers' own modules.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.data import DataError

FORMAT = 1
"""Version of the export folder's layout and of retriever.json's schema."""
MANIFEST = "manifest.json"
MAX_JSON_BYTES = 64 * 2**20
"""retriever.json, index.json, fitted.json and the like are small; a huge one is damage, not data."""


class FolderError(DataError):
    """An export folder (or one of its files) that a reader refuses. The message names the file."""


# ----------------------------------------------------------------------------------------------- JSON files
def read_json(path: Path, *, what: str = "JSON") -> Any:
    """Parsed JSON of ``path`` or one :class:`FolderError` naming it: missing, a folder, too large, not UTF-8,
    not JSON, or nested too deep for the parser."""
    path = Path(path)
    if not path.exists():
        raise FolderError(f"{path}: file not found")
    if not path.is_file():
        raise FolderError(f"{path}: not a file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise FolderError(f"{path}: {path.stat().st_size} bytes, more than a {what} file may have")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise FolderError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise FolderError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise FolderError(f"{path}: JSON nested too deeply") from None


def is_number(value: Any) -> bool:
    """A finite JSON number (bools are not numbers here: ``true`` is not 1.0)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


Check = Callable[[Any], bool]
_INT: Check = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
_POS_INT: Check = lambda v: _INT(v) and v > 0  # noqa: E731
_STR: Check = lambda v: isinstance(v, str)  # noqa: E731
_OPT_STR: Check = lambda v: v is None or isinstance(v, str)  # noqa: E731
_BOOL: Check = lambda v: isinstance(v, bool)  # noqa: E731


def check_fields(
    obj: Any, spec: dict[str, tuple[Check, str]], where: str, *, required: tuple[str, ...] = ()
) -> dict:
    """``obj`` must be an object whose keys are all in ``spec`` and whose values pass their check."""
    if not isinstance(obj, dict):
        raise FolderError(f"{where}: must be a JSON object, got {_kind(obj)}")
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise FolderError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(spec)})"
        )
    missing = [k for k in required if k not in obj]
    if missing:
        raise FolderError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    for key, value in obj.items():
        check, expected = spec[key]
        if not check(value):
            raise FolderError(f"{where}: field '{key}' must be {expected}, got {value!r:.60}")
    return obj


# ----------------------------------------------------------------------------------------------- retriever.json
def check_template(value: Any, where: str) -> dict:
    """A PromptTemplate's fields, each a string whose ``{}`` placeholders are the ones that field fills."""
    from ..lm.likelihood import PromptTemplate

    fields = PromptTemplate.__dataclass_fields__
    if not isinstance(value, dict):
        raise FolderError(f"{where}: field 'template' must be an object, got {_kind(value)}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise FolderError(f"{where}: template has unknown field(s) {', '.join(map(repr, unknown))}")
    for name, text in value.items():
        default = getattr(PromptTemplate(), name)
        if not isinstance(default, str):  # a non-text option of the template (e.g. where the settings go)
            if not isinstance(text, type(default)):
                raise FolderError(f"{where}: template field '{name}' must be {type(default).__name__}")
            continue
        if not isinstance(text, str):
            raise FolderError(f"{where}: template field '{name}' must be a string, got {_kind(text)}")
        allowed = {f for _, f, _, _ in string.Formatter().parse(default) if f}
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as err:
            raise FolderError(f"{where}: template field '{name}': {err}") from None
        if used - allowed:
            raise FolderError(
                f"{where}: template field '{name}' uses {{{', '.join(sorted(used - allowed))}}}; "
                f"it may use only {{{', '.join(sorted(allowed))}}}"
            )
    try:
        PromptTemplate(**value)
    except (TypeError, ValueError) as err:
        raise FolderError(f"{where}: template: {err}") from None
    return value


_LM_RECORD_SPEC: dict[str, tuple[Check, str]] = {
    "lm": (_STR, "a string"),
    "lm_revision": (_OPT_STR, "a string or null"),
    "lm_dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "auto/float32/bfloat16/float16"),
    "template": (lambda v: isinstance(v, dict), "an object"),
    "max_length": (_POS_INT, "a positive integer"),
    "lm_batch_tokens": (_POS_INT, "a positive integer"),
    # written by releases before format 1 was enforced; read, never honoured (see module docstring)
    "trust_remote_code": (_BOOL, "true or false"),
}

_RETRIEVER_SPEC: dict[str, tuple[Check, str]] = {
    "format": (_INT, "an integer"),
    "k": (_POS_INT, "a positive integer"),
    "scoring": (lambda v: isinstance(v, dict), "an object"),
    "query_text": (lambda v: v in ("query", "context_and_query"), "'query' or 'context_and_query'"),
    "separate_query_encoder": (_BOOL, "true or false"),
    "template": (lambda v: isinstance(v, dict), "an object"),
    "scorer": (lambda v: isinstance(v, dict), "an object"),
    "encoder_base": (_OPT_STR, "a string or null"),
    "lm": (_OPT_STR, "a string or null"),
    "encoder_fingerprint": (_STR, "a string"),
    "metrics": (lambda v: isinstance(v, dict) and all(is_number(x) for x in v.values()), "numbers by name"),
    "train_characters": (lambda v: isinstance(v, list) and all(map(_STR, v)), "a list of strings"),
    "split": (
        lambda v: (
            isinstance(v, dict)
            and set(v) <= {"val_fraction", "test_fraction", "seed"}
            and all(is_number(x) for x in v.values())
        ),
        "an object of val_fraction, test_fraction, seed",
    ),
    "versions": (lambda v: isinstance(v, dict) and all(map(_STR, v.values())), "strings by package"),
}
REQUIRED = ("format", "k", "scoring", "query_text", "template", "encoder_fingerprint")


def check_retriever_config(config: Any, path: Path) -> dict:
    """retriever.json, checked whole; returns it. Raises :class:`FolderError` naming the file and the field."""
    from ..core.scoring import ScoringRule

    where = str(path)
    if isinstance(config, dict) and "format" not in config:
        raise FolderError(
            f"{where}: no 'format' (written by a replugchar older than export format {FORMAT}): export it again"
        )
    if isinstance(config, dict) and _INT(config.get("format")) and config["format"] > FORMAT:
        raise FolderError(
            f"{where}: export format {config['format']} is newer than this replugchar reads ({FORMAT}): "
            "upgrade replugchar"
        )
    check_fields(config, _RETRIEVER_SPEC, where, required=REQUIRED)
    if config["format"] != FORMAT:
        raise FolderError(
            f"{where}: unsupported export format {config['format']} (this replugchar reads {FORMAT})"
        )
    check_template(config["template"], where)
    check_fields(config.get("scorer", {}), _LM_RECORD_SPEC, f"{where}: scorer")
    if "template" in config.get("scorer", {}):
        check_template(config["scorer"]["template"], f"{where}: scorer")
    try:
        ScoringRule.from_dict(config["scoring"])
    except (TypeError, ValueError) as err:
        raise FolderError(f"{where}: scoring: {err}") from None
    return config


# ----------------------------------------------------------------------------------------------- encoder
ALLOWED_MODULE_PREFIX = "sentence_transformers."


def check_encoder_modules(encoder_dir: Path) -> None:
    """``modules.json`` names the Python classes sentence-transformers imports: only its own are allowed, so an
    export folder cannot make the loader import some other installed module."""
    path = encoder_dir / "modules.json"
    if not encoder_dir.is_dir():
        raise FolderError(f"{encoder_dir}: missing (not a sentence-transformers folder)")
    modules = read_json(path, what="modules.json")
    if not isinstance(modules, list) or not modules:
        raise FolderError(f"{path}: must be a non-empty list of modules")
    for i, m in enumerate(modules):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("type"), str)
            or not isinstance(m.get("path"), str)
        ):
            raise FolderError(f"{path}: module {i} needs string fields 'type' and 'path'")
        if not m["type"].startswith(ALLOWED_MODULE_PREFIX):
            raise FolderError(
                f"{path}: module {i} has type {m['type']!r}; only sentence_transformers modules are loaded"
            )
        if Path(m["path"]).is_absolute() or ".." in Path(m["path"]).parts:
            raise FolderError(f"{path}: module {i} path {m['path']!r} leaves the encoder folder")


def load_sentence_transformer(encoder_dir: Path, device: str | None = None):
    """A saved encoder folder, with every loading failure (missing or cut-off weights, bad configs) as one
    :class:`FolderError` naming the folder."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    check_encoder_modules(encoder_dir)
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(encoder_dir), device=device, trust_remote_code=False)
    except Exception as err:  # OSError, SafetensorError, json/KeyError from configs, ValueError ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FolderError(
            f"{encoder_dir}: cannot load the encoder ({type(err).__name__}: {first:.200})"
        ) from None


# ----------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: str | Path) -> dict:
    """``manifest.json``: sha256 and size of every file of ``folder`` (the last file written to a new folder)."""
    folder = Path(folder)
    files = {
        rel: {"sha256": _sha256(folder / rel), "size": (folder / rel).stat().st_size}
        for rel in _files(folder)
    }
    manifest = {"format": FORMAT, "algorithm": "sha256", "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def verify_manifest(folder: str | Path) -> None:
    """Refuse a folder whose files are not exactly those of its manifest, byte for byte, naming the first
    file that differs."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FolderError(
            f"{path}: missing (the folder is incomplete or was edited by hand; load with verify=False to skip)"
        )
    manifest = read_json(path, what="manifest")
    entry_ok = lambda e: isinstance(e, dict) and _STR(e.get("sha256")) and _INT(e.get("size"))  # noqa: E731
    spec = {
        "format": (_INT, "an integer"),
        "algorithm": (lambda v: v == "sha256", "'sha256'"),
        "files": (lambda v: isinstance(v, dict) and all(map(entry_ok, v.values())), "{file: {sha256, size}}"),
    }
    check_fields(manifest, spec, str(path), required=tuple(spec))
    listed, present = manifest["files"], set(_files(folder))
    for rel, entry in listed.items():
        target = folder / rel
        if rel not in present:
            raise FolderError(f"{target}: listed in {MANIFEST} but missing")
        size = target.stat().st_size
        if size != entry["size"]:
            raise FolderError(
                f"{target}: {size} bytes, {MANIFEST} says {entry['size']} (changed, truncated or replaced)"
            )
        if _sha256(target) != entry["sha256"]:
            raise FolderError(f"{target}: content differs from {MANIFEST} (changed or swapped file)")
    extra = sorted(present - set(listed))
    if extra:
        raise FolderError(f"{folder / extra[0]}: not listed in {MANIFEST} (a file added after export)")
