"""What a ``finetune-lm`` folder says about its training: the characters whose replies the LM was tuned on.

Evaluation and the teacher report read it (and leave those characters out) without importing the fine-tuning code
(:mod:`replugchar.training.finetune`, which writes the file).
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_CHARACTERS_FILE = "train_characters.json"


def finetuned_characters(folder: str | Path) -> set[str]:
    """Ids of the characters an LM folder written by ``finetune-lm`` was trained on; empty for any other LM.

    Why: an LM judged on characters whose replies it was tuned on flatters every retriever; evaluation and the
    teacher report drop those characters.
    """
    path = Path(str(folder)).expanduser() / TRAIN_CHARACTERS_FILE
    if not path.is_file():
        return set()
    info = json.loads(path.read_text(encoding="utf-8"))
    return set(info.get("train_characters") or [])
