"""Generality priors g(s): how much a setting helps a character's replies regardless of the query.

Why: for "Hello!" cosine similarity never surfaces "cheerful with everyone", though that trait shapes every
reply. A per-setting prior blended into retrieval (score = cos + λ·g, see :mod:`replugchar.retrieval.index`) lifts such
traits. Three sources, one table format:

* ``lm_utility`` -- the frozen LM's mean gain log P(y | s, x) − log P(y | no setting, x) (nats/token) over a
  character's queries, all of them and the greeting/closing subset separately;
* ``llm_judge`` -- a local instruct LM asked how broadly a trait applies, read from the probabilities of the
  answer tokens 1..5 (expected score, no sampling);
* ``import`` -- scores from an external judge (e.g. GPT-4o) in JSONL/CSV keyed by character and setting.

Raw scores are z-normalised within each character so characters with 5 or 10 settings are comparable.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import atomic_file
from ..core.data import Character, DataError, Example, iter_jsonl
from ..lm.gains import _znorm, lm_table
from ..lm.loglik_cache import CachedLikelihood

MAX_ABS_SCORE = 1e6
"""Imported judge scores are ratings (1-5, 0-100, ...): a larger magnitude is a broken file, and would overflow
the z-normalisation."""
MAX_ABS_PRIOR = 100.0
"""Stored priors are z-scores within a character: |z| <= sqrt(n - 1), far under this for any real character."""

JUDGE_TEMPLATE = (
    'Here is one trait of a role-play character: "{setting}"\n'
    "On a scale of 1 to 5, how much does this trait shape how the character replies in ANY conversation, "
    "even to a simple greeting? 1 = only when the topic comes up, 5 = in every reply.\nAnswer: "
)


@dataclass(frozen=True)
class Prior:
    character_id: str
    index_in_character: int
    setting: str
    prior: float  # z-normalised within the character: what the index blends
    raw: float  # the method's own scale (nats/token gain, expected 1-5 score, imported score)
    raw_greeting: float | None = None  # lm_utility only: mean gain over greeting/closing queries
    n_queries: int = 0
    method: str = ""
    provenance: str = ""


def _table(
    characters: dict[str, Character],
    raw: dict[tuple[str, int], float],
    method: str,
    provenance: str,
    greeting: dict[tuple[str, int], float] | None = None,
    counts: dict[str, int] | None = None,
) -> list[Prior]:
    out: list[Prior] = []
    for cid, char in characters.items():
        keys = [(cid, i) for i in range(len(char.settings))]
        if not all(key in raw for key in keys):
            continue
        for (_, i), z in zip(keys, _znorm([raw[key] for key in keys])):
            g = greeting.get((cid, i)) if greeting else None
            out.append(
                Prior(
                    cid,
                    i,
                    char.settings[i],
                    z,
                    raw[(cid, i)],
                    g,
                    (counts or {}).get(cid, 0),
                    method,
                    provenance,
                )
            )
    return out


# ----------------------------------------------------------------------------------------------- LM utility
def setting_gains(
    examples: Sequence[Example], characters: dict[str, Character], likelihood: CachedLikelihood
) -> np.ndarray:
    """Gains as a (n, max_settings) matrix, NaN where a character has fewer settings."""
    return lm_table(examples, characters, likelihood).gain_matrix()


def lm_utility_priors(
    examples: Sequence[Example], characters: dict[str, Character], likelihood: CachedLikelihood
) -> list[Prior]:
    """Mean LM gain per setting over the character's ``examples`` (pass only training dialogues)."""
    gains = setting_gains(examples, characters, likelihood)
    by_char: dict[str, list[int]] = defaultdict(list)
    for row, e in enumerate(examples):
        by_char[e.character_id].append(row)
    raw, greet, counts = {}, {}, {}
    for cid, rows in by_char.items():
        n = len(characters[cid].settings)
        counts[cid] = len(rows)
        g_rows = [r for r in rows if examples[r].query_type != "other"]
        for i in range(n):
            raw[(cid, i)] = float(np.mean(gains[rows, i]))
            greet[(cid, i)] = float(np.mean(gains[g_rows, i])) if g_rows else math.nan
    prov = f"lm={likelihood.fingerprint}"
    return _table({c: characters[c] for c in by_char}, raw, "lm_utility", prov, greet, counts)


# ----------------------------------------------------------------------------------------------- LLM judge
@torch.inference_mode()
def llm_judge_priors(
    characters: dict[str, Character], model, tokenizer, template: str = JUDGE_TEMPLATE, lm_id: str = ""
) -> list[Prior]:
    """Expected 1-5 answer of ``model`` for each setting, from the next-token probabilities of "1".."5"."""
    if "{setting}" not in template:
        raise ValueError("priors judge template must contain '{setting}'")
    digit_ids = []
    for d in "12345":
        ids = tokenizer(d, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"the judge tokenizer splits the answer '{d}' into {len(ids)} tokens")
        digit_ids.append(ids[0])
    device = next(model.parameters()).device
    raw = {}
    for cid, char in characters.items():
        for i, s in enumerate(char.settings):
            ids = tokenizer(template.format(setting=s), return_tensors="pt").input_ids.to(device)
            logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            p = torch.softmax(logits[digit_ids], -1)  # renormalised over the five answers
            raw[(cid, i)] = float((p * torch.arange(1, 6, device=device)).sum())
    prov = f"lm={lm_id}|template={hashlib.sha1(template.encode()).hexdigest()[:12]}"
    return _table(characters, raw, "llm_judge", prov)


# ----------------------------------------------------------------------------------------------- import
SETTING_FIELDS = ("index_in_character", "setting", "setting_id", "setting_index")
"""Columns that name the setting of an imported row, in the order they are looked for (the last two: 0.1 files)."""


def import_priors(path: str | Path, characters: dict[str, Character]) -> list[Prior]:
    """Read external scores: JSONL or CSV with ``character_id``, the setting and ``score`` (the judge's rating).

    The setting is ``index_in_character`` (its position in the character's list) or ``setting`` (its exact
    text); ``setting_id`` is read as either, for files written for 0.1 (where it meant the position, while the
    index's ``setting_id`` is a global row: one name, two meanings)."""
    path = Path(path)
    raw: dict[tuple[str, int], float] = {}
    seen: dict[tuple[str, int], str] = {}
    from_csv = path.suffix.lower() == ".csv"
    for where, rec in _read_rows(path):
        cid = rec.get("character_id")
        if cid not in characters:
            raise DataError(f"{where}: field 'character_id': unknown character {cid!r}")
        settings = characters[cid].settings
        field = next((k for k in SETTING_FIELDS if k in rec), "index_in_character")
        sid = rec.get(field)
        if isinstance(sid, str) and sid.strip().isdigit() and from_csv:  # CSV cells are text
            sid = int(sid)
        if isinstance(sid, int) and not isinstance(sid, bool):
            if not 0 <= sid < len(settings):
                raise DataError(
                    f"{where}: field '{field}': {sid} out of range for '{cid}' ({len(settings)} settings)"
                )
            idx = sid
        elif isinstance(sid, str) and sid in settings:
            idx = settings.index(sid)
        else:
            raise DataError(f"{where}: field '{field}': unknown setting {sid!r} of character '{cid}'")
        value = rec.get("score")
        if from_csv and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise DataError(f"{where}: field 'score' is {value!r}, not a number") from None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise DataError(f"{where}: field 'score' missing or not a number (got {value!r:.40})")
        if not math.isfinite(value) or abs(value) > MAX_ABS_SCORE:
            raise DataError(
                f"{where}: field 'score' is {value} (must be finite, |score| <= {MAX_ABS_SCORE:g})"
            )
        if (cid, idx) in seen:
            raise DataError(
                f"{where}: a second score for '{cid}' setting {idx} (first at {seen[(cid, idx)]})"
            )
        seen[(cid, idx)] = where
        raw[(cid, idx)] = float(value)
    if not raw:
        raise DataError(f"{path}: no prior scores")
    prov = f"file={path.name}|sha1={hashlib.sha1(path.read_bytes()).hexdigest()[:12]}"
    table = _table(characters, raw, "import", prov)
    covered = {(p.character_id, p.index_in_character) for p in table}
    partial = sorted(
        {cid for cid, _ in raw if any((cid, i) not in covered for i in range(len(characters[cid].settings)))}
    )
    if partial:
        raise DataError(f"{path}: characters with scores for only some settings: {', '.join(partial[:5])}")
    return table


def _read_rows(path: Path):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".csv":
        # utf-8-sig: spreadsheets save a BOM, which would otherwise become part of the first column's name
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "character_id" not in header or "score" not in header or not set(SETTING_FIELDS) & set(header):
                raise DataError(
                    f"{path}:1: the header must name the comma-separated columns character_id, "
                    f"index_in_character (or setting) and score; got {','.join(header)[:80]!r}"
                )
            for lineno, row in enumerate(reader, start=2):
                if None in row or None in row.values():  # more or fewer cells than the header
                    raise DataError(
                        f"{path}:{lineno}: {len(header)} columns in the header, another number here"
                    )
                yield f"{path}:{lineno}", row
        return
    for lineno, rec in iter_jsonl(path):
        yield f"{path}:{lineno}", rec


# ----------------------------------------------------------------------------------------------- files
def save_priors(priors: Sequence[Prior], path: str | Path) -> None:
    """JSONL, one setting per line with its provenance; written to a temp file and renamed."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for p in priors:
            row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(p).items()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_priors(path: str | Path, characters: dict[str, Character] | None = None) -> list[Prior]:
    """A priors.jsonl of :func:`save_priors`, each line checked: types (``true`` is not 1.0, ``"0"`` not 0),
    the size of the prior, one line per setting."""
    path = Path(path)
    out, seen = [], {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "setting_index" in rec and "index_in_character" not in rec:  # the name before this release
            rec = {("index_in_character" if k == "setting_index" else k): v for k, v in rec.items()}
        try:
            p = Prior(**{k: rec[k] for k in Prior.__dataclass_fields__ if k in rec})
        except TypeError as err:
            raise DataError(f"{where}: bad prior record ({err})") from None
        if not isinstance(p.character_id, str):
            raise DataError(f"{where}: field 'character_id' must be a string, got {p.character_id!r:.40}")
        if not isinstance(p.index_in_character, int) or isinstance(p.index_in_character, bool):
            raise DataError(
                f"{where}: field 'index_in_character' must be an integer, got {p.index_in_character!r:.40}"
            )
        if not isinstance(p.prior, int | float) or isinstance(p.prior, bool) or not math.isfinite(p.prior):
            raise DataError(f"{where}: field 'prior' is {p.prior!r:.40} (must be a finite number)")
        if abs(p.prior) > MAX_ABS_PRIOR:
            raise DataError(
                f"{where}: field 'prior' is {p.prior:g}; priors are z-scores (|prior| <= {MAX_ABS_PRIOR})"
            )
        key = (p.character_id, p.index_in_character)
        if key in seen:
            raise DataError(
                f"{where}: a second prior for {p.character_id!r}[{p.index_in_character}] (first at {seen[key]})"
            )
        seen[key] = where
        if characters is not None:
            char = characters.get(p.character_id)
            if char is None or not 0 <= p.index_in_character < len(char.settings):
                raise DataError(
                    f"{where}: prior for unknown setting {p.character_id!r}[{p.index_in_character}]"
                )
        out.append(p)
    return out


def prior_vector(priors: Sequence[Prior], records) -> np.ndarray:
    """Align priors with index records (``SettingRecord``); settings without a prior get 0."""
    lookup = {(p.character_id, p.index_in_character): p.prior for p in priors}
    return np.array(
        [lookup.get((r.character_id, r.index_in_character), 0.0) for r in records], dtype=np.float32
    )
