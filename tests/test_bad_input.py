"""Bad input gives an error a user can act on: it names the file and line (or the option) and what is wrong.

Every faulty data folder of ``FAULTY_DATA`` is rejected in-process with its exact message, and through the console
script (``replugchar loglik`` / ``replugchar fit``) with one line on stderr, ``replugchar: error: <file>:<line>: ...``,
exit code 2 and no traceback.

Not covered here: NaN/inf in imported prior scores and priors for unknown settings (replugchar.training.priors).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, character, data_dir, dialogue, subprocess_env, tiny_gpt2, write_jsonl

from replugchar.core.data import (
    MAX_TEXT_CHARS,
    Character,
    Corpus,
    DataError,
    Example,
    SplitSpec,
    Turn,
    load_characters,
    load_examples,
)
from replugchar.lm.likelihood import LMLikelihood, LoglikRequest
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.index import SettingIndex, setting_records
from replugchar.training.datamodule import LSRDataModule
from replugchar.training.losses import LSRLoss

pytestmark = pytest.mark.usefixtures("rc_cache")


def load(folder):
    return Corpus.load(folder)


# ----------------------------------------------------------------------------------------------- JSONL records
@dataclass(frozen=True)
class Faulty:
    """A data folder with one faulty record: where it is, what is wrong, and the whole expected message."""

    name: str
    build: Callable[[Path], Path]  # tmp_path -> data folder (characters.jsonl + dialogues.jsonl)
    where: str  # "dialogues.jsonl:3": the file and line the message must name
    what: str  # the field (or the fault) the message must name
    message: str  # regex of the whole DataError message

    def __str__(self) -> str:
        return self.name


def _without(row: dict, field: str) -> dict:
    return {k: v for k, v in row.items() if k != field}


LONG = "a" * (MAX_TEXT_CHARS + 1)
LATIN1 = json.dumps(dialogue("e3", query="caf\u00e9"), ensure_ascii=False).encode("latin-1")
SURROGATE = r'{"example_id": "e1", "character_id": "c1", "query": "hi \ud800", "response": "ok"}'


def _chars(*rows) -> Callable[[Path], Path]:
    return lambda tmp: data_dir(tmp, characters=list(rows))


def _dials(*rows) -> Callable[[Path], Path]:
    return lambda tmp: data_dir(tmp, dialogues=list(rows))


FAULTY_DATA = [
    Faulty(
        "malformed-json",
        _chars(character("c1"), '{"character_id": "c2", "settings": ["a"]'),
        "characters.jsonl:2",
        "malformed JSON",
        r"characters\.jsonl:2: malformed JSON \(Expecting ',' delimiter",
    ),
    Faulty(
        "not-an-object",
        _dials(dialogue("e1"), '["e2", "c1"]'),
        "dialogues.jsonl:2",
        "expected a JSON object",
        r"dialogues\.jsonl:2: expected a JSON object, got list",
    ),
    Faulty(
        "missing-field",
        _dials(dialogue("e1"), dialogue("e2"), _without(dialogue("e3"), "response")),
        "dialogues.jsonl:3",
        "'response'",
        r"dialogues\.jsonl:3: missing field 'response'",
    ),
    # wrong types
    Faulty(
        "settings-str",
        _chars(character("c1", settings="I am a cat.")),
        "characters.jsonl:1",
        "'settings'",
        r"characters\.jsonl:1: field 'settings' must be a list",
    ),
    Faulty(
        "setting-int",
        _chars(character("c1", settings=["a", 3])),
        "characters.jsonl:1",
        "'settings[1]'",
        r"characters\.jsonl:1: field 'settings\[1\]' must be a string, got int",
    ),
    Faulty(
        "name-list",
        _chars(character("c1", name=["x"])),
        "characters.jsonl:1",
        "'name'",
        r"characters\.jsonl:1: field 'name' must be a string, got list",
    ),
    Faulty(
        "query-int",
        _dials(dialogue("e1"), dialogue("e2"), dialogue("e3", query=42)),
        "dialogues.jsonl:3",
        "'query'",
        r"dialogues\.jsonl:3: field 'query' must be a string, got int",
    ),
    Faulty(
        "context-dict",
        _dials(dialogue("e1", context={"role": "user"})),
        "dialogues.jsonl:1",
        "'context'",
        r"dialogues\.jsonl:1: field 'context' must be a list",
    ),
    Faulty(
        "role",
        _dials(dialogue("e1", context=[{"role": "narrator", "text": "x"}])),
        "dialogues.jsonl:1",
        "'context[0].role'",
        r"dialogues\.jsonl:1: field 'context\[0\]\.role' must be one of \('user', 'character'\)",
    ),
    Faulty(
        "query-type",
        _dials(dialogue("e1", query_type="smalltalk")),
        "dialogues.jsonl:1",
        "'query_type'",
        r"dialogues\.jsonl:1: field 'query_type' must be one of",
    ),
    Faulty(
        "shown-range",
        _dials(dialogue("e1", shown_setting_indices=[0, 7])),
        "dialogues.jsonl:1",
        "'shown_setting_indices'",
        r"dialogues\.jsonl:1: field 'shown_setting_indices' must be indices in \[0, 3\)",
    ),
    Faulty(
        "shown-bool",
        _dials(dialogue("e1", shown_setting_indices=[True])),
        "dialogues.jsonl:1",
        "'shown_setting_indices'",
        r"dialogues\.jsonl:1: field 'shown_setting_indices' must be indices",
    ),
    # empty, duplicate, unknown, too long
    Faulty(
        "no-settings",
        _chars(character("c1", settings=[])),
        "characters.jsonl:1",
        "has no settings",
        r"characters\.jsonl:1: character 'c1' has no settings",
    ),
    Faulty(
        "empty-setting",
        _chars(character("c1", settings=["I sing.", "  \t "])),
        "characters.jsonl:1",
        "'settings[1]'",
        r"characters\.jsonl:1: field 'settings\[1\]' is empty",
    ),
    Faulty(
        "duplicate-character-id",
        _chars(character("c1"), character("c2"), character("c1")),
        "characters.jsonl:3",
        "character_id",
        r"characters\.jsonl:3: duplicate character_id 'c1'",
    ),
    Faulty(
        "duplicate-setting",
        _chars(character("c1", settings=["I like dogs.", "I sing.", " I like  dogs."])),
        "characters.jsonl:1",
        "'settings[2]'",
        r"characters\.jsonl:1: character 'c1' has duplicate settings: 'settings\[2\]' repeats 'settings\[0\]'",
    ),
    Faulty(
        "duplicate-example-id",
        _dials(dialogue("e1"), dialogue("e2"), dialogue("e1")),
        "dialogues.jsonl:3",
        "example_id",
        r"dialogues\.jsonl:3: duplicate example_id 'e1'",
    ),
    Faulty(
        "unknown-character",
        _dials(dialogue("e1"), dialogue("e2"), dialogue("e3", "ghost")),
        "dialogues.jsonl:3",
        "'character_id'",
        r"dialogues\.jsonl:3: field 'character_id': unknown character 'ghost'",
    ),
    Faulty(
        "empty-query",
        _dials(dialogue("e1", query="   ")),
        "dialogues.jsonl:1",
        "'query'",
        r"dialogues\.jsonl:1: field 'query' is empty",
    ),
    Faulty(
        "empty-response",
        _dials(dialogue("e1"), dialogue("e2"), dialogue("e3", response="")),
        "dialogues.jsonl:3",
        "'response'",
        r"dialogues\.jsonl:3: field 'response' is empty",
    ),
    Faulty(
        "empty-context-turn",
        _dials(dialogue("e1", context=[{"role": "user", "text": "hi"}, {"role": "character", "text": ""}])),
        "dialogues.jsonl:1",
        "'text'",
        r"dialogues\.jsonl:1: context\[1\]: field 'text' is empty",
    ),
    Faulty(
        "over-long-response",
        _dials(dialogue("e1"), dialogue("e2"), dialogue("e3", response=LONG)),
        "dialogues.jsonl:3",
        "'response'",
        rf"dialogues\.jsonl:3: field 'response' has {MAX_TEXT_CHARS + 1} characters \(limit {MAX_TEXT_CHARS}\)",
    ),
    Faulty(
        "over-long-setting",
        _chars(character("c1", settings=["ok", LONG])),
        "characters.jsonl:1",
        "'settings[1]'",
        rf"characters\.jsonl:1: field 'settings\[1\]' has {MAX_TEXT_CHARS + 1} characters",
    ),
    Faulty(
        "bad-utf8",
        _dials(dialogue("e1"), dialogue("e2"), LATIN1),
        "dialogues.jsonl:3",
        "not valid UTF-8",
        r"dialogues\.jsonl:3: not valid UTF-8 \(invalid continuation byte at byte",
    ),
    # valid JSON, but not encodable text: it would crash the score cache's hashing deep inside training
    Faulty(
        "lone-surrogate",
        _dials(SURROGATE),
        "dialogues.jsonl:1",
        "'query'",
        r"dialogues\.jsonl:1: field 'query' is not valid Unicode \(surrogates not allowed at character 3\)",
    ),
]
BY_NAME = {f.name: f for f in FAULTY_DATA}
assert len(BY_NAME) == len(FAULTY_DATA)


@pytest.mark.parametrize("faulty", FAULTY_DATA, ids=str)
def test_faulty_record_names_file_line_and_field(tmp_path, faulty):
    folder = faulty.build(tmp_path)
    with pytest.raises(DataError) as err:
        load(folder)
    message = str(err.value)
    file, line = faulty.where.split(":")
    assert message.startswith(f"{folder / file}:{line}: "), message
    assert faulty.what in message
    assert re.search(faulty.message, message), message
    assert "\n" not in message  # the console script prints the first line only: it must be the whole message


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
def _likelihood(max_length: int) -> LMLikelihood:
    model, tok = tiny_gpt2()
    return LMLikelihood(model, tok, max_length=max_length)


def test_over_long_prompt_names_the_example(tmp_path):
    [ex] = load_examples(
        write_jsonl(tmp_path / "d.jsonl", [dialogue("ex-long", response="r" * 300)]),
        load_characters(write_jsonl(tmp_path / "c.jsonl", [character("c1")])),
    )
    likelihood = _likelihood(max_length=200)
    with pytest.raises(
        ValueError,
        match=r"example 'ex-long': prompt \(\d+ tokens\) \+ response \(302\) exceed "
        r"model\.lm\.max_length=200 even without dialogue context; the response is never truncated",
    ):
        likelihood.loglik([LoglikRequest(ex, ("I am a cat.",))])
    assert likelihood.pairs_computed == 0


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
    likelihood = _likelihood(max_length=120)
    full = likelihood.template.render(("trait",), ex.context, ex.query)
    assert len(likelihood.tokenizer(full).input_ids) > 120  # the whole prompt does not fit
    ids, n_resp = likelihood.encode(LoglikRequest(ex, ("trait",)))
    assert len(ids) <= 120
    tok = likelihood.tokenizer
    assert ids[-n_resp:] == [*tok(" A whole response.", add_special_tokens=False).input_ids, tok.eos_token_id]
    prompt = tok.decode(ids[:-n_resp])
    assert "OLDEST" not in prompt and "NEWEST turn." in prompt and "trait" in prompt and "Hello?" in prompt


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("group", "option", "value"),
    [
        ("", "k", 0),
        ("", "k", -3),
        ("loss", "gamma", 0.0),
        ("loss", "beta", -0.5),
        ("loss", "gamma", float("inf")),
        ("loss", "beta", float("nan")),
        ("lm", "max_batch_tokens", 0),
        ("head", "history_window", -1),
        ("optimizer", "learning_rate", 0.0),
    ],
)
def test_module_option_out_of_range(group, option, value):
    """A bad value is one ValueError naming the option by its YAML path (``model.loss.gamma``), raised by the
    group itself, so it fails the same whether the group comes from a config or from code."""
    from replugchar.training.module import LSRModule

    path = ".".join(p for p in ("model", group, option) if p)
    kwargs = {option: value} if not group else {group: {option: value}}
    kwargs.setdefault("lm", LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None))
    with pytest.raises(ValueError, match=rf"{re.escape(path)} is out of range: {re.escape(repr(value))}"):
        LSRModule(encoder="tiny:bert", **kwargs)


def test_an_unknown_option_in_a_group_dict_names_the_group():
    from replugchar.training.module import LSRModule

    with pytest.raises(ValueError, match=r"model\.loss: unknown option\(s\) \['gama'\]"):
        LSRModule(encoder="tiny:bert", loss={"gama": 0.1})


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

    from replugchar.training.module import LSRModule

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
        ("model:\n  loss:\n    direction: forward\n", r'Parser key "model\.loss\.direction"'),
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
        (
            "data:\n  split:\n    val_fraction: 1.0\n",
            r"data\.split\.val_fraction must be in \[0, 1\), got 1\.0",
        ),
        (
            "data:\n  split:\n    val_fraction: -0.1\n",
            r"data\.split\.val_fraction must be in \[0, 1\), got -0\.1",
        ),
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
    from replugchar.cli.lightning_cli import run_lightning

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
    dm = LSRDataModule(data_dir=str(folder), split=SplitSpec(val_fraction=0.2))
    dm.setup("fit")
    empty, loader = (
        ("training", dm.train_dataloader) if not dm.train_examples else ("validation", dm.val_dataloader)
    )
    with pytest.raises(
        DataError,
        match=rf"data: no {empty} examples after the character split \(1 characters, data\.split\.val_fraction=0\.2",
    ):
        loader()
    dm = LSRDataModule(data_dir=str(folder), split=SplitSpec(val_fraction=0.0))
    assert len(dm.train_dataloader().dataset) == 2 and len(dm.val_dataloader().dataset) == 0


# ----------------------------------------------------------------------------------------------- console script
def console_script() -> list[str]:
    """The installed ``replugchar`` of this interpreter's environment (the venv), else ``python -m replugchar.cli``."""
    beside = Path(sys.executable).with_name("replugchar")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("replugchar")
    return [found] if found else [sys.executable, "-m", "replugchar.cli"]


def replugchar(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*console_script(), *map(str, args)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one non-empty stderr line of a command that failed on a user error (exit 2, no traceback)."""
    report = (
        f"exit code {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-2000:]}"
    )
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one non-empty stderr line, got {len(lines)}\n{report}"
    assert lines[0].startswith("replugchar: error: "), report
    return lines[0]


def assert_names_record(line: str, folder: Path, faulty: Faulty) -> None:
    file, lineno = faulty.where.split(":")
    assert line.startswith(f"replugchar: error: {folder / file}:{lineno}: "), line
    assert faulty.what in line, line
    assert re.search(faulty.message, line), line


# each run is one interpreter start (~10 s here, most of it importing lightning): every kind of fault once
# through `score`, the main ones through `fit`; every row's exact message is checked in-process above
LOGLIK_CASES = [
    "malformed-json", "not-an-object", "missing-field", "setting-int", "query-int", "role", "no-settings",
    "duplicate-character-id", "duplicate-setting", "duplicate-example-id", "unknown-character", "empty-response",
    "over-long-response", "bad-utf8", "lone-surrogate",
]  # fmt: skip
FIT_CASES = ["malformed-json", "missing-field", "query-int", "unknown-character", "bad-utf8"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LOGLIK_CASES)
def test_loglik_on_faulty_data_prints_one_line(tmp_path, name):
    faulty = BY_NAME[name]
    folder = faulty.build(tmp_path)
    proc = replugchar("loglik", "--config", "configs/debug.yaml", "--data.data_dir", folder)
    assert_names_record(one_error_line(proc), folder, faulty)
    assert "log-likelihood cache" not in proc.stdout  # nothing was computed


@pytest.mark.slow
@pytest.mark.parametrize("name", FIT_CASES)
def test_fit_on_faulty_data_prints_one_line(tmp_path, name):
    faulty = BY_NAME[name]
    folder = faulty.build(tmp_path)
    run = tmp_path / "run"
    proc = replugchar(
        "fit", "--config", "configs/debug.yaml", "--data.data_dir", folder, "--trainer.default_root_dir", run,
        "--trainer.logger.init_args.save_dir", run,
    )  # fmt: skip
    assert_names_record(one_error_line(proc), folder, faulty)
    assert not list(run.rglob("*.ckpt"))  # nothing was trained


@pytest.mark.slow
def test_traceback_flag_shows_the_traceback(tmp_path):
    faulty = BY_NAME["unknown-character"]
    folder = faulty.build(tmp_path)
    proc = replugchar("--traceback", "loglik", "--config", "configs/debug.yaml", "--data.data_dir", folder)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the exception is re-raised, not turned into exit 2
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    error = r"replugchar\.core\.data\.DataError: .*" + faulty.message
    assert re.search(error, proc.stderr), proc.stderr[-3000:]
    assert "replugchar: error:" not in proc.stderr


@pytest.mark.slow
def test_retrieve_from_a_missing_folder_prints_one_line():
    line = one_error_line(
        replugchar("retrieve", "--retriever", "/missing", "--character", "x", "--query", "hi")
    )
    assert "/missing" in line, line


@pytest.mark.slow
def test_priors_import_without_file_prints_one_line_naming_the_option(tmp_path):
    line = one_error_line(
        replugchar("priors", "import", "--config", "configs/debug.yaml", "--out", tmp_path / "x.jsonl")
    )
    assert "--file" in line, line
    assert not (tmp_path / "x.jsonl").exists()


CHECK_ARGUMENTS_ONLY = """
import sys
from replugchar.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "lightning", "transformers", "faiss"})
    print(f"exit={exit.code} imported={','.join(heavy)}")
"""


def test_priors_import_without_file_fails_before_importing_the_model_stack(tmp_path):
    """Exits quickly: the missing --file is found from the arguments alone, so the command must not pay for
    importing torch/lightning (~10 s on a loaded 2-core machine), let alone load a model."""
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_ARGUMENTS_ONLY, "priors", "import", "--config", "configs/debug.yaml",
         "--out", str(tmp_path / "x.jsonl")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert "replugchar: error: priors import needs --file" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip() == "exit=2 imported=", proc.stdout


def test_help_lists_every_command():
    proc = replugchar("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  (\S+)  ", proc.stdout, flags=re.MULTILINE)
    expected = [
        "fit", "validate", "loglik", "priors", "index", "export", "retrieve", "add-characters", "evaluate", "chat",
        "finetune-lm",
        "teacher-report",
    ]  # fmt: skip
    assert listed == expected, proc.stdout


def test_unknown_command_exits_2():
    line = one_error_line(replugchar("bogus", timeout=60))
    assert "unknown command 'bogus'" in line and "fit" in line, line
