"""Rebuild replugchar/demo_data from ../shared/data/synthetic_persona_chat (CC BY 4.0, Jandaghi et al. 2023).

Keeps every example of a fixed, seeded choice of characters (and the whole sessions they come from), so the
bundled subset is reproducible:
    python scripts/make_demo_data.py ../shared/data/synthetic_persona_chat
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

N_CHARACTERS = 16
MAX_EXAMPLES_PER_CHARACTER = 24


def main(src: str) -> None:
    src_dir = Path(src)
    out = Path(__file__).resolve().parents[1] / "replugchar" / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    chars = [json.loads(line) for line in (src_dir / "characters.jsonl").open(encoding="utf-8")]
    chosen = sorted(random.Random(0).sample([c["character_id"] for c in chars], N_CHARACTERS))
    keep = set(chosen)
    per_char: dict[str, list[dict]] = {c: [] for c in chosen}
    for line in (src_dir / "dialogues.jsonl").open(encoding="utf-8"):
        rec = json.loads(line)
        if rec["character_id"] in keep:
            per_char[rec["character_id"]].append(rec)
    rng = random.Random(1)
    examples = []
    for cid in chosen:
        recs = per_char[cid]
        greet = [r for r in recs if r["query_type"] != "other"]
        other = [r for r in recs if r["query_type"] == "other"]
        rng.shuffle(other)
        examples += sorted(
            greet + other[: max(0, MAX_EXAMPLES_PER_CHARACTER - len(greet))], key=lambda r: r["example_id"]
        )
    with (out / "characters.jsonl").open("w", encoding="utf-8") as f:
        for c in chars:
            if c["character_id"] in keep:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
    with (out / "dialogues.jsonl").open("w", encoding="utf-8") as f:
        for r in examples:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # the whole sessions, so the dialogue-aware retriever sees each example's full history (not only 4 turns)
    used = {r["dialogue_id"] for r in examples}
    with (out / "sessions.jsonl").open("w", encoding="utf-8") as f:
        for line in (src_dir / "sessions.jsonl").open(encoding="utf-8"):
            rec = json.loads(line)
            if rec["dialogue_id"] in used:
                keys = ("dialogue_id", "source", "language", "participants", "turns", "shown_setting_indices")
                f.write(json.dumps({k: rec[k] for k in keys if k in rec}, ensure_ascii=False) + "\n")
    print(f"wrote {len(keep)} characters, {len(examples)} examples, {len(used)} sessions to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/synthetic_persona_chat")
