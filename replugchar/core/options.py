"""Option groups: typed, frozen dataclasses with a docstring per field (the litgpt manner).

Each group lives beside the concept it configures (the LM's in :mod:`replugchar.lm.models`, the frozen LM's batching and
cache in :mod:`replugchar.lm.loglik_cache`, the split's in :mod:`replugchar.core.data`, the loss's, the head's and the
optimiser's under :mod:`replugchar.training`). LightningCLI / jsonargparse parse a dataclass-typed ``__init__``
argument as a nested group, so a YAML section reads ``model: {lm: {name: ..., max_batch_tokens: ...}}`` and
``--help`` prints the field docstrings. Checkpoints and hparams hold the groups as plain dicts (a dataclass
there would make a checkpoint need pickle to load), which :func:`as_options` turns back into the group.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

T = TypeVar("T")


def as_options(cls: type[T], value: T | dict[str, Any] | None, where: str) -> T:
    """``value`` as a ``cls`` group: the group itself, a dict of its fields (hparams, ``Namespace.as_dict()``),
    or None for the defaults. An unknown field is a ``ValueError`` naming ``where`` (e.g. ``model.lm``)."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**value)
    raise TypeError(f"{where}: expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def check_ranges(where: str, group: Any, checks: dict[str, bool]) -> None:
    """``ValueError`` naming the first option of ``group`` (at ``where``) whose range check is False."""
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{where}.{name} is out of range: {getattr(group, name)!r}")


def one_line(message: str) -> str:
    """jsonargparse's error as one line that names the option: ``--k: expected int | None, got 'x'``."""
    text = message.strip()
    required = re.match(r"the following arguments are required: (.*)", text)
    if required:
        names = [n.strip() for n in required.group(1).split(",")]
        return "needs " + ", ".join(n if n.startswith("-") else f"--{n}" for n in names)
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', text, flags=re.DOTALL)
    if key:
        given = re.search(r"(?:Given|Got) value:\s*(.*)", key.group(2))
        expected = re.search(r"Expected a (.*?)(?:\. Got value|$)", key.group(2), flags=re.MULTILINE)
        what = f"expected {expected.group(1).strip()}" if expected else key.group(2).splitlines()[0].strip()
        line = f"--{key.group(1)}: {what}" + (f", got {given.group(1).strip()!r}" if given else "")
        line = re.sub(r"(?:typing\.)?Literal\[([^\]]*)\]", r"one of \1", line)
        return re.sub(r"<class '([\w.]+)'>", r"\1", line)
    return " ".join(text.split())
