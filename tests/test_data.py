"""Data: the bundled demo corpus, the character-disjoint split, and errors that name file:line and field.

(The exhaustive malformed-input suite is tests/test_bad_input.py.)
"""

from __future__ import annotations

import pytest

from replugchar.core.data import Corpus, DataError, SplitSpec, split_characters
from replugchar.training.datamodule import LSRDataModule, collate_examples


def test_demo_corpus_loads():
    corpus = Corpus.load("demo")
    assert len(corpus.characters) == 16
    assert len(corpus.examples) > 16
    assert all(e.character_id in corpus.characters for e in corpus.examples)
    assert all(c.settings and all(s.strip() for s in c.settings) for c in corpus.characters.values())
    assert len({e.example_id for e in corpus.examples}) == len(corpus.examples)
    assert {e.query_type for e in corpus.examples} <= {"greeting", "closing", "other"}


def test_in_code_corpus_roundtrips_through_files(write_data, characters, examples):
    folder = write_data(characters.values(), examples)
    corpus = Corpus.load(folder)
    assert corpus.characters == characters
    assert corpus.examples == examples
    assert corpus.source == str(folder)


def test_datamodule_split_is_character_disjoint():
    dm = LSRDataModule(data_dir="demo", batch_size=4, split=SplitSpec(val_fraction=0.25, seed=3))
    dm.setup("fit")
    train_chars = {e.character_id for e in dm.train_examples}
    val_chars = {e.character_id for e in dm.val_examples}
    assert train_chars and val_chars
    assert not train_chars & val_chars
    # the held-out characters are exactly those the hash split names, all their dialogues with them
    assert val_chars == split_characters(list(dm.characters), 0.25, seed=3)["val"]
    assert len(dm.train_examples) + len(dm.val_examples) == len(dm.corpus.examples)
    assert set(dm.characters) == train_chars | val_chars

    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, list) and len(batch) == 4 and batch == dm.val_examples[:4]
    assert collate_examples(dm.val_examples[:2]) == dm.val_examples[:2]

    again = LSRDataModule(data_dir="demo", split=SplitSpec(val_fraction=0.25, seed=3))
    again.setup("fit")
    assert [e.example_id for e in again.val_examples] == [e.example_id for e in dm.val_examples]


def test_split_characters_and_caps():
    ids = [f"c{i}" for i in range(200)]
    split = split_characters(ids, 0.3, seed=0, test_fraction=0.2)
    train, val, test = split["train"], split["val"], split["test"]
    assert train | val | test == set(ids) and not train & val and not train & test and not val & test
    assert 40 <= len(val) <= 80 and 20 <= len(test) <= 60  # ~60 and ~40 of 200
    assert (
        split_characters(list(reversed(ids)), 0.3, seed=0, test_fraction=0.2) == split
    )  # input order irrelevant
    assert split_characters(ids, 0.0, seed=0)["train"] == set(ids)
    # a character's split depends on its id alone: adding characters moves nobody, so data sets agree
    more = split_characters([*ids, *(f"extra{i}" for i in range(50))], 0.3, seed=0, test_fraction=0.2)
    assert all(more[name] >= split[name] for name in split)
    assert split_characters(ids, 0.3, seed=1) != split_characters(ids, 0.3, seed=0)
    # a tiny set still gets a non-empty validation split when one is asked for
    assert len(split_characters(["a", "b", "c"], 0.05, seed=0)["val"]) == 1

    dm = LSRDataModule(data_dir="demo", max_train_examples=7, max_val_examples=3, query_types=["greeting"])
    dm.setup()
    assert len(dm.train_examples) == 7 and len(dm.val_examples) == 3
    assert all(e.query_type == "greeting" for e in dm.train_examples + dm.val_examples)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"split": {"val_fraction": 1.0}}, r"data\.split\.val_fraction"), ({"batch_size": 0}, "batch_size"),
     ({"max_train_examples": 0}, "max_train_examples"), ({"query_types": ["hello"]}, "query_types")],
)  # fmt: skip
def test_datamodule_options_are_validated(kwargs, option):
    with pytest.raises(ValueError, match=option):
        LSRDataModule(**kwargs)


def test_malformed_json_names_file_and_line(write_data, characters, examples):
    chars = list(characters.values())
    folder = write_data([chars[0], '{"character_id": "bob", "settings": ["x"]', chars[2]], examples[:1])
    with pytest.raises(DataError, match=r"characters\.jsonl:2: malformed JSON"):
        Corpus.load(folder)


def test_missing_field_names_file_line_and_field(write_data, characters, examples):
    bad = {"example_id": "x", "character_id": "alice", "query": "Hi"}  # no response
    folder = write_data(characters.values(), [examples[0], examples[1], bad])
    with pytest.raises(DataError, match=r"dialogues\.jsonl:3: missing field 'response'"):
        Corpus.load(folder)


def test_unknown_character_names_the_field(write_data, characters, examples):
    bad = {"example_id": "x", "character_id": "zed", "query": "Hi", "response": "Yo"}
    folder = write_data(characters.values(), [bad])
    with pytest.raises(DataError, match=r"dialogues\.jsonl:1: field 'character_id'.*'zed'"):
        Corpus.load(folder)


def test_wrong_settings_type_names_the_field(write_data, examples):
    folder = write_data([{"character_id": "alice", "settings": "I bake."}], examples[:1])
    with pytest.raises(DataError, match=r"characters\.jsonl:1: field 'settings'"):
        Corpus.load(folder)
    with pytest.raises(DataError, match="data_dir"):
        Corpus.load(folder / "nope")
