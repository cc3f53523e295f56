"""Bad input gives an error a user can act on: it names the file and line (or the option) and what is wrong.

Not covered here: NaN/inf in imported prior scores and priors for unknown settings (replugchar.priors).
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from helpers_reliability import REPO, character, data_dir, dialogue, rc_cache, tiny_gpt2, write_jsonl  # noqa: F401

from replugchar.data import (
    MAX_TEXT_CHARS,
    Character,
    Corpus,
    DataError,
    Example,
    LSRDataModule,
    Turn,
    load_characters,
    load_examples,
)
from replugchar.index import SettingIndex, setting_records
from replugchar.lm_scoring import LMScorer, ScoreRequest
from replugchar.losses import LSRLoss

pytestmark = pytest.mark.usefixtures("rc_cache")


def load(folder):
    return Corpus.load(folder)


# ----------------------------------------------------------------------------------------------- JSONL records
def test_malformed_json_names_file_and_line(tmp_path):
    folder = data_dir(tmp_path, characters=[character("c1"), '{"character_id": "c2", "settings": ["a"]'])
    with pytest.raises(DataError, match=r"characters\.jsonl:2: malformed JSON \(Expecting ',' delimiter"):
        load(folder)


def test_record_that_is_not_an_object(tmp_path):
    folder = data_dir(tmp_path, dialogues=[dialogue("e1"), '["e2", "c1"]'])
    with pytest.raises(DataError, match=r"dialogues\.jsonl:2: expected a JSON object, got list"):
        load(folder)


def test_missing_field(tmp_path):
    row = dialogue("e2")
    del row["response"]
    folder = data_dir(tmp_path, dialogues=[dialogue("e1"), row])
    with pytest.raises(DataError, match=r"dialogues\.jsonl:2: missing field 'response'"):
        load(folder)


@pytest.mark.parametrize(
    ("which", "row", "message"),
    [
        (
            "characters",
            character("c1", settings="I am a cat."),
            r"characters\.jsonl:1: field 'settings' must be a list",
        ),
        (
            "characters",
            character("c1", settings=["a", 3]),
            r"characters\.jsonl:1: field 'settings\[1\]' must be a "
            r"string, got int",
        ),
        (
            "characters",
            character("c1", name=["x"]),
            r"characters\.jsonl:1: field 'name' must be a string, got list",
        ),
        (
            "dialogues",
            dialogue("e1", query=42),
            r"dialogues\.jsonl:1: field 'query' must be a string, got int",
        ),
        (
            "dialogues",
            dialogue("e1", context={"role": "user"}),
            r"dialogues\.jsonl:1: field 'context' must be a list",
        ),
        (
            "dialogues",
            dialogue("e1", context=[{"role": "narrator", "text": "x"}]),
            r"dialogues\.jsonl:1: field 'context\[0\]\.role' must be one of \('user', 'character'\)",
        ),
        (
            "dialogues",
            dialogue("e1", query_type="smalltalk"),
            r"dialogues\.jsonl:1: field 'query_type' must be one of",
        ),
        (
            "dialogues",
            dialogue("e1", shown_setting_indices=[0, 7]),
            r"dialogues\.jsonl:1: field 'shown_setting_indices' must be indices in \[0, 3\)",
        ),
        (
            "dialogues",
            dialogue("e1", shown_setting_indices=[True]),
            r"dialogues\.jsonl:1: field 'shown_setting_indices' must be indices",
        ),
    ],
    ids=[
        "settings-str",
        "setting-int",
        "name-list",
        "query-int",
        "context-dict",
        "role",
        "query-type",
        "shown-range",
        "shown-bool",
    ],
)
def test_wrong_type(tmp_path, which, row, message):
    folder = data_dir(tmp_path, **{which: [row]})
    with pytest.raises(DataError, match=message):
        load(folder)


def test_empty_settings_list(tmp_path):
    folder = data_dir(tmp_path, characters=[character("c1", settings=[])])
    with pytest.raises(DataError, match=r"characters\.jsonl:1: character 'c1' has no settings"):
        load(folder)


def test_empty_setting_text(tmp_path):
    folder = data_dir(tmp_path, characters=[character("c1", settings=["I sing.", "  \t "])])
    with pytest.raises(DataError, match=r"characters\.jsonl:1: field 'settings\[1\]' is empty"):
        load(folder)


def test_duplicate_character_id(tmp_path):
    folder = data_dir(tmp_path, characters=[character("c1"), character("c2"), character("c1")])
    with pytest.raises(DataError, match=r"characters\.jsonl:3: duplicate character_id 'c1'"):
        load(folder)


def test_duplicate_setting_up_to_whitespace(tmp_path):
    folder = data_dir(
        tmp_path, characters=[character("c1", settings=["I like dogs.", "I sing.", " I like  dogs."])]
    )
    with pytest.raises(
        DataError,
        match=r"characters\.jsonl:1: character 'c1' has duplicate settings: 'settings\[2\]' repeats "
        r"'settings\[0\]'",
    ):
        load(folder)


def test_duplicate_example_id(tmp_path):
    folder = data_dir(tmp_path, dialogues=[dialogue("e1"), dialogue("e2"), dialogue("e1")])
    with pytest.raises(DataError, match=r"dialogues\.jsonl:3: duplicate example_id 'e1'"):
        load(folder)


def test_dialogue_for_unknown_character(tmp_path):
    folder = data_dir(tmp_path, dialogues=[dialogue("e1"), dialogue("e2", "ghost")])
    with pytest.raises(
        DataError, match=r"dialogues\.jsonl:2: field 'character_id': unknown character 'ghost'"
    ):
        load(folder)


@pytest.mark.parametrize("field", ["query", "response"])
def test_empty_query_or_response(tmp_path, field):
    folder = data_dir(tmp_path, dialogues=[dialogue("e1", **{field: "   "})])
    with pytest.raises(DataError, match=rf"dialogues\.jsonl:1: field '{field}' is empty"):
        load(folder)


def test_empty_context_turn_names_the_turn(tmp_path):
    folder = data_dir(
        tmp_path,
        dialogues=[
            dialogue("e1", context=[{"role": "user", "text": "hi"}, {"role": "character", "text": ""}])
        ],
    )
    with pytest.raises(DataError, match=r"dialogues\.jsonl:1: context\[1\]: field 'text' is empty"):
        load(folder)


def test_over_long_text_is_rejected_at_load(tmp_path):
    long = "a" * (MAX_TEXT_CHARS + 1)
    folder = data_dir(tmp_path, dialogues=[dialogue("e1"), dialogue("e2", response=long)])
    with pytest.raises(
        DataError,
        match=rf"dialogues\.jsonl:2: field 'response' has {MAX_TEXT_CHARS + 1} characters "
        rf"\(limit {MAX_TEXT_CHARS}\)",
    ):
        load(folder)
    folder = data_dir(
        tmp_path, characters=[character("c1", settings=["ok", long])], dialogues=[dialogue("e1")]
    )
    with pytest.raises(DataError, match=r"characters\.jsonl:1: field 'settings\[1\]' has 4001 characters"):
        load(folder)


def test_non_utf8_bytes(tmp_path):
    bad = json.dumps(dialogue("e2", query="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    folder = data_dir(tmp_path, dialogues=[dialogue("e1"), bad])
    with pytest.raises(
        DataError, match=r"dialogues\.jsonl:2: not valid UTF-8 \(invalid continuation byte at byte"
    ):
        load(folder)


def test_lone_surrogate_escape(tmp_path):
    # valid JSON, but not encodable text: it would crash the score cache's hashing deep inside training
    folder = data_dir(
        tmp_path,
        dialogues=[
            r'{"example_id": "e1", "character_id": "c1", "query": "hi \ud800", '
            r'"response": "ok"}'
        ],
    )
    with pytest.raises(
        DataError,
        match=r"dialogues\.jsonl:1: field 'query' is not valid Unicode \(surrogates not "
        r"allowed at character 3\)",
    ):
        load(folder)


def test_utf8_bom_is_accepted(tmp_path):
    folder = data_dir(tmp_path)
    path = folder / "characters.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert list(load(folder).characters) == ["c1", "c2"]


def test_empty_and_missing_files(tmp_path):
    folder = data_dir(tmp_path)
    (folder / "characters.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"characters\.jsonl: no characters"):
        load_characters(folder / "characters.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(folder / "nope.jsonl", {})
    with pytest.raises(
        DataError, match=r"data_dir '.*missing' is not a folder \(set data\.data_dir, or 'demo'\)"
    ):
        Corpus.load(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- LM prompt length
def _scorer(max_length: int) -> LMScorer:
    model, tok = tiny_gpt2()
    return LMScorer(model, tok, max_length=max_length)


def test_over_long_prompt_at_scoring_names_the_example(tmp_path):
    [ex] = load_examples(
        write_jsonl(tmp_path / "d.jsonl", [dialogue("ex-long", response="r" * 300)]),
        load_characters(write_jsonl(tmp_path / "c.jsonl", [character("c1")])),
    )
    scorer = _scorer(max_length=200)
    with pytest.raises(
        ValueError,
        match=r"example 'ex-long': prompt \(\d+ tokens\) \+ response \(302\) exceed "
        r"model\.max_length=200 even without dialogue context; the response is never truncated",
    ):
        scorer.score([ScoreRequest(ex, ("I am a cat.",))])
    assert scorer.pairs_scored == 0


def test_old_context_is_dropped_first_and_the_response_kept_whole():
    oldest, newest = "OLDEST " + "x" * 80, "NEWEST turn."
    ex = Example(
        "e1",
        "c1",
        "d1",
        query="Hello?",
        response="A whole response.",
        context=(Turn("user", oldest), Turn("character", "middle " + "y" * 40), Turn("user", newest)),
    )
    scorer = _scorer(max_length=120)
    full = scorer.template.render(("trait",), ex.context, ex.query)
    assert len(scorer.tokenizer(full).input_ids) > 120  # the whole prompt does not fit
    ids, n_resp = scorer.encode(ScoreRequest(ex, ("trait",)))
    assert len(ids) <= 120
    tok = scorer.tokenizer
    assert ids[-n_resp:] == [*tok(" A whole response.", add_special_tokens=False).input_ids, tok.eos_token_id]
    prompt = tok.decode(ids[:-n_resp])
    assert "OLDEST" not in prompt and "NEWEST turn." in prompt and "trait" in prompt and "Hello?" in prompt


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("option", "value"),
    [("k", 0), ("k", -3), ("gamma", 0.0), ("beta", -0.5), ("gamma", float("inf")), ("beta", float("nan"))],
)
def test_module_option_out_of_range(option, value):
    from replugchar.module import LSRModule

    with pytest.raises(ValueError, match=rf"model\.{option} is out of range: {re.escape(repr(value))}"):
        LSRModule(encoder="tiny:bert", lm="tiny:gpt2", score_cache_dir=None, **{option: value})


@pytest.mark.parametrize(("option", "value"), [("gamma", 0.0), ("beta", -1.0), ("gamma", float("nan"))])
def test_loss_temperature_out_of_range(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be a finite number >= 0.0001, got {value}"):
        LSRLoss(**{option: value})


def _index(dim: int = 8) -> SettingIndex:
    chars = {"c1": Character("c1", ("a", "b", "c")), "c2": Character("c2", ("d", "e"))}
    records = setting_records(chars)
    emb = np.random.default_rng(0).normal(size=(len(records), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return SettingIndex.build(emb, records)


def test_search_k_not_positive():
    index = _index()
    with pytest.raises(ValueError, match=r"k must be positive, got 0"):
        index.search(np.zeros((1, 8), np.float32), 0, character_ids=["c1"])


def test_index_dimension_mismatch(tmp_path):
    _index(dim=8).save(tmp_path / "idx")
    assert SettingIndex.load(tmp_path / "idx", expected_dim=8).dim == 8
    with pytest.raises(
        ValueError,
        match=r"index\.json: index was built with 8-d embeddings but the encoder gives "
        r"384-d: rebuild it with `replugchar index`",
    ):
        SettingIndex.load(tmp_path / "idx", expected_dim=384)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t[: len(t) // 2], r"settings\.jsonl:\d+: malformed JSON"),  # truncated mid-record
        (
            lambda t: t.replace('"character_id"', '"character"', 1),
            r"settings\.jsonl:1: bad record \(KeyError",
        ),
        (
            lambda t: t.replace('"prior": 0.0', '"prior": NaN', 1),
            r"settings\.jsonl:1: field 'prior' must be finite",
        ),
        (
            lambda t: t.replace('"setting_id": 1,', '"setting_id": 7,', 1),
            r"settings\.jsonl:2: setting ids must be 0\.\.n-1 in order",
        ),
        (
            lambda t: "\n".join(t.splitlines()[:-1]) + "\n",
            r"index\.faiss holds 5x8 vectors but the id map 4 settings",
        ),
    ],
    ids=["truncated", "missing-field", "nan-prior", "ids-out-of-order", "row-missing"],
)
def test_corrupted_settings_jsonl(tmp_path, damage, message):
    _index().save(tmp_path / "idx")
    path = tmp_path / "idx" / "settings.jsonl"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=message):
        SettingIndex.load(tmp_path / "idx")


def test_interleaved_characters_in_settings_jsonl(tmp_path):
    # a hand-edited id map where c1's settings are not contiguous: a range search would leak c2's settings
    _index().save(tmp_path / "idx")
    path = tmp_path / "idx" / "settings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["character_id"] = "c2"
    write_jsonl(path, rows)
    with pytest.raises(
        ValueError,
        match=r"settings\.jsonl: settings of character 'c1' must have contiguous setting "
        r"ids, got 2 after 0",
    ):
        SettingIndex.load(tmp_path / "idx")


def test_damaged_index_files(tmp_path):
    _index().save(tmp_path / "idx")
    faiss_file = tmp_path / "idx" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"index\.faiss: not a readable FAISS index"):
        SettingIndex.load(tmp_path / "idx")
    faiss_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.faiss: missing \(incomplete index folder\)"):
        SettingIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text('{"format": 1, "dim": ')
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        SettingIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no index\.json \(not a replugchar index folder\)"):
        SettingIndex.load(tmp_path / "idx")


# ----------------------------------------------------------------------------------------------- YAML configs
def _parser(*, model: bool = True):
    from jsonargparse import ActionConfigFile
    from lightning.pytorch.cli import LightningArgumentParser

    from replugchar.module import LSRModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    if model:
        parser.add_lightning_class_args(LSRModule, "model")
    parser.add_lightning_class_args(LSRDataModule, "data")
    return parser


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("model:\n  k: five\n", r'Parser key "model\.k":\s+Expected a <class \'int\'>\. Got value: five'),
        ("data:\n  batch_size: 2.5\n", r'Parser key "data\.batch_size":\s+Expected a <class \'int\'>'),
        ("model:\n  kl_direction: forward\n", r'Parser key "model\.kl_direction"'),
        ("model:\n  temprature: 0.1\n", r"Group 'model' does not accept option 'temprature'"),
        ("data:\n  batchsize: 4\n", r"Group 'data' does not accept option 'batchsize'"),
    ],
    ids=["k-str", "batch-float", "direction", "unknown-model-key", "unknown-data-key"],
)
def test_config_wrong_type_or_unknown_key(tmp_path, yaml, message):
    from jsonargparse import ArgumentError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml)
    with pytest.raises(ArgumentError, match=message):
        _parser().parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("data:\n  batch_size: 0\n", r"data\.batch_size must be positive, got 0"),
        ("data:\n  val_fraction: 1.0\n", r"data\.val_fraction must be in \[0, 1\), got 1\.0"),
        ("data:\n  val_fraction: -0.1\n", r"data\.val_fraction must be in \[0, 1\), got -0\.1"),
        ("data:\n  max_train_examples: 0\n", r"data\.max_train_examples must be positive or null, got 0"),
        ("data:\n  query_types: [hello]\n", r"data\.query_types: unknown query type 'hello'"),
    ],
    ids=["batch-0", "val-1", "val-neg", "max-train-0", "query-type"],
)
def test_config_value_out_of_range(tmp_path, yaml, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml)
    parser = _parser(model=False)
    cfg = parser.parse_args(["--config", str(path)])  # types are fine; the ranges are checked at init
    with pytest.raises(ValueError, match=message):
        parser.instantiate(cfg)


def test_cli_reports_unknown_key_and_exits_2(tmp_path, capsys, monkeypatch):
    from replugchar.lightning_cli import run_lightning

    monkeypatch.setattr(sys, "argv", ["replugchar"])  # LightningCLI warns when args and sys.argv both exist
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  gama: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        run_lightning(["fit", "--config", str(REPO / "configs" / "debug.yaml"), "--config", str(path)])
    assert exit_info.value.code == 2
    assert "error: Subcommand 'fit' does not accept option 'model.gama'" in capsys.readouterr().err


def test_empty_training_split_is_an_error(tmp_path):
    # one character and val_fraction > 0: one split is empty, and Lightning would silently skip training (then
    # export an untrained retriever) or validation
    folder = data_dir(tmp_path, characters=[character("c1")], dialogues=[dialogue("e1"), dialogue("e2")])
    dm = LSRDataModule(data_dir=str(folder), val_fraction=0.2)
    dm.setup("fit")
    empty, loader = (
        ("training", dm.train_dataloader) if not dm.train_examples else ("validation", dm.val_dataloader)
    )
    with pytest.raises(
        DataError,
        match=rf"data: no {empty} examples after the character split \(1 characters, data\.val_fraction=0\.2",
    ):
        loader()
    dm = LSRDataModule(data_dir=str(folder), val_fraction=0.0)
    assert len(dm.train_dataloader().dataset) == 2 and len(dm.val_dataloader().dataset) == 0
