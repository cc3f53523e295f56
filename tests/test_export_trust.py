"""An export folder is data: loading one never runs code, never silently changes the rule, and every fault is
one line naming the file (issue: export trust).

Table-driven: each damaged folder / file is refused in-process with a ``replugchar`` exception naming the file
(and the field), and a sample of each kind through the console script with one stderr line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from test_bad_input import one_error_line, replugchar

from replugchar.cli.tools import _read_history, read_fitted
from replugchar.core.atomic import atomic_folder, remove_stale
from replugchar.core.data import MAX_TEXT_CHARS, DataError
from replugchar.core.scoring import FEATURES, ScoringRule
from replugchar.lm.loglik_cache import LikelihoodOptions
from replugchar.retrieval.export import export_retriever
from replugchar.retrieval.export_schema import FORMAT, FolderError, write_manifest
from replugchar.retrieval.retriever import Retriever
from replugchar.training.checkpoint import load_checkpoint
from replugchar.training.module import LSRModule
from replugchar.training.priors import import_priors, load_priors

pytestmark = pytest.mark.usefixtures("rc_cache")
FIXTURE = REPO / "tests" / "fixtures" / "export_v1"


@pytest.fixture(scope="module")
def module(characters):
    m = LSRModule(encoder="tiny:bert", k=3, lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None))
    m.characters = dict(characters)
    return m


@pytest.fixture(scope="module")
def export(tmp_path_factory, module) -> Path:
    rule = ScoringRule(weights=(-0.3, 0.0, 0.1, 0.0), prior_weight=0.2)
    n = sum(len(c.settings) for c in module.characters.values())
    priors = np.linspace(-1, 1, n)
    return export_retriever(module, tmp_path_factory.mktemp("trust") / "retriever", priors=priors, rule=rule)


def copy_of(export: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "retriever"
    shutil.copytree(export, dst)
    return dst


def edit_config(folder: Path, change: Callable[[dict], object], *, manifest: bool = True) -> None:
    """Change retriever.json and, as someone who edits folders would, rewrite the manifest: the schema, not
    the manifest, must catch it."""
    path = folder / "retriever.json"
    config = json.loads(path.read_text())
    new = change(config)
    path.write_text(json.dumps(config if new is None else new))
    if manifest:
        write_manifest(folder)


# ----------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class BadConfig:
    name: str
    change: Callable[[dict], object]
    message: str  # a fragment of the one-line error, after the file name

    def __str__(self) -> str:
        return self.name


def _set(path: tuple[str, ...], value) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(key: str) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        del config[key]

    return change


BAD_CONFIGS = [
    BadConfig("no-scoring", _drop("scoring"), "missing key(s) 'scoring'"),
    BadConfig("scoring-a-list", _set(("scoring",), [0.1, 0.2]), "field 'scoring' must be an object"),
    BadConfig(
        "misspelled-feature",
        _set(("scoring", "weights"), {"ownmax": -1.0, "own_last": 0, "partner_max": 0, "partner_last": 0}),
        "unknown or missing: own_max, ownmax",
    ),
    BadConfig("weights-abc", _set(("scoring", "weights"), "abc"), "weights must be 4 numbers"),
    BadConfig("weights-too-few", _set(("scoring", "weights"), [0.1, 0.2]), "weights must be 4 numbers"),
    BadConfig("weight-bool", _set(("scoring", "prior_weight"), True), "prior_weight must be a number"),
    BadConfig("scoring-unknown-key", _set(("scoring", "colour"), 1.0), "unknown key(s) 'colour'"),
    BadConfig(
        "threshold-string", _set(("scoring", "threshold"), "0.5"), "threshold must be a number or null"
    ),
    BadConfig(
        "history-window-float", _set(("scoring", "history_window"), 1.5), "history_window must be an integer"
    ),
    BadConfig("unknown-key", _set(("colour",), "red"), "unknown key(s) 'colour'"),
    BadConfig("newer-format", _set(("format",), FORMAT + 1), "is newer than this replugchar reads"),
    BadConfig("no-format", _drop("format"), "no 'format'"),
    BadConfig("top-level-list", lambda config: [config], "must be a JSON object, got list"),
    BadConfig("k-string", _set(("k",), "5"), "field 'k' must be a positive integer"),
    BadConfig("k-zero", _set(("k",), 0), "field 'k' must be a positive integer"),
    BadConfig(
        "template-unknown-field", _set(("template", "colour"), "x"), "template has unknown field(s) 'colour'"
    ),
    BadConfig(
        "template-unknown-placeholder",
        _set(("template", "user_line"), "User: {text} {__class__}\n"),
        "uses {__class__}",
    ),
    BadConfig("scorer-unknown-key", _set(("scorer", "hack"), 1), "scorer: unknown key(s) 'hack'"),
    BadConfig("metrics-nan-string", _set(("metrics",), {"val/x": "nan"}), "field 'metrics'"),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=str)
def test_retriever_json_outside_the_schema_is_refused_naming_file_and_field(export, tmp_path, bad):
    folder = copy_of(export, tmp_path)
    edit_config(folder, bad.change)
    with pytest.raises(FolderError) as err:
        Retriever.load(folder)
    assert str(err.value).startswith(str(folder / "retriever.json")), err.value
    assert bad.message in str(err.value)


def test_an_unchanged_export_loads_and_keeps_its_rule(export):
    r = Retriever.load(export)
    assert r.rule.weights == pytest.approx((-0.3, 0.0, 0.1, 0.0)) and r.rule.prior_weight == pytest.approx(
        0.2
    )
    config = json.loads((export / "retriever.json").read_text())
    assert config["format"] == FORMAT
    assert "trust_remote_code" not in config["scorer"]


def test_the_current_format_fixture_still_loads():
    """A small folder of format 1 is kept in the repo: a later change to the reader must keep reading it."""
    r = Retriever.load(FIXTURE)
    (cid,) = {rec.character_id for rec in r.index.records}
    hits = r.search(cid, "Hello! How are you?", k=3, threshold=float("-inf"))
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    expected = json.loads((FIXTURE.parent / "export_v1_expected.json").read_text())
    assert [h.setting_id for h in hits] == expected["setting_ids"]
    np.testing.assert_allclose([h.score for h in hits], expected["scores"], atol=1e-5)


def test_scoring_rule_from_dict_reads_what_to_dict_writes():
    rule = ScoringRule(weights=(0.1, -0.2, 0.3, -0.4), prior_weight=0.5, threshold=None, history_window=4)
    assert ScoringRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert ScoringRule.from_dict({**rule.to_dict(), "weights": [0.1, -0.2, 0.3, -0.4]}) == rule
    with pytest.raises(ValueError, match="unknown or missing: partner_last"):
        ScoringRule.from_dict({**rule.to_dict(), "weights": dict(zip(FEATURES[:3], (1, 2, 3)))})


# ----------------------------------------------------------------------------------------------- manifest
def _swap_index(folder: Path, other: Path) -> None:
    shutil.copy(other / "index.faiss", folder / "index.faiss")


def _change_settings_line(folder: Path, other: Path) -> None:
    path = folder / "settings.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["text"] = "I am secretly a pirate."
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def _truncate_weights(folder: Path, other: Path) -> None:
    path = folder / "encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _add_file(folder: Path, other: Path) -> None:
    (folder / "encoder" / "added_tokens.json").write_text("{}")


def _drop_weights(folder: Path, other: Path) -> None:
    (folder / "encoder" / "model.safetensors").unlink()


MANIFEST_CASES = [
    ("swapped-index", _swap_index, "index.faiss", "content differs"),
    ("changed-settings-line", _change_settings_line, "settings.jsonl", "changed"),
    ("truncated-weights", _truncate_weights, "model.safetensors", "truncated or replaced"),
    ("added-file", _add_file, "added_tokens.json", "not listed in manifest.json"),
    ("missing-weights", _drop_weights, "model.safetensors", "listed in manifest.json but missing"),
]


@pytest.fixture(scope="module")
def other_export(tmp_path_factory, module) -> Path:
    """Same characters and shape, other priors: an index.faiss that would load and serve wrong scores."""
    n = sum(len(c.settings) for c in module.characters.values())
    return export_retriever(
        module, tmp_path_factory.mktemp("other") / "retriever", priors=np.linspace(1, -1, n)
    )


@pytest.mark.parametrize(
    ("name", "damage", "file", "message"), MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES]
)
def test_a_file_that_differs_from_the_manifest_is_named(
    export, other_export, tmp_path, name, damage, file, message
):
    folder = copy_of(export, tmp_path)
    damage(folder, other_export)
    with pytest.raises(FolderError) as err:
        Retriever.load(folder)
    assert file in str(err.value).split(":")[0] and message in str(err.value), err.value


def test_verify_false_skips_only_the_manifest(export, other_export, tmp_path):
    folder = copy_of(export, tmp_path)
    _change_settings_line(folder, other_export)
    assert "I am secretly a pirate." in {r.text for r in Retriever.load(folder, verify=False).index.records}
    _truncate_weights(folder, other_export)
    with pytest.raises(FolderError, match=r"encoder: cannot load the encoder"):
        Retriever.load(folder, verify=False)
    (folder / "manifest.json").unlink()
    with pytest.raises(FolderError, match=r"manifest\.json: missing"):
        Retriever.load(folder)


def test_encoder_modules_may_only_name_sentence_transformers(export, tmp_path):
    folder = copy_of(export, tmp_path)
    path = folder / "encoder" / "modules.json"
    modules = json.loads(path.read_text())
    modules[0]["type"] = "os.system"
    path.write_text(json.dumps(modules))
    write_manifest(folder)
    with pytest.raises(FolderError, match=r"modules.json: module 0 has type 'os.system'"):
        Retriever.load(folder)
    path.write_text("[not json")
    write_manifest(folder)
    with pytest.raises(FolderError, match=r"modules.json: not valid JSON"):
        Retriever.load(folder)


# ----------------------------------------------------------------------------------------------- remote code
EVIL_MODULE = """
from pathlib import Path
from transformers import GPT2LMHeadModel

Path({marker!r}).write_text("ran")


class EvilModel(GPT2LMHeadModel):
    pass
"""


@pytest.fixture
def remote_code_export(export, tmp_path, tiny_lm) -> tuple[Path, Path]:
    """An export whose retriever.json turns trust_remote_code on and points the LM at a model folder with an
    auto_map module that writes a marker file when imported."""
    model, tok = tiny_lm
    lm_dir, marker = tmp_path / "evil-lm", tmp_path / "marker"
    model.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    (lm_dir / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((lm_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (lm_dir / "config.json").write_text(json.dumps(config))
    folder = copy_of(export, tmp_path)

    def change(cfg: dict) -> None:
        cfg["scorer"]["lm"] = str(lm_dir)
        cfg["scorer"]["trust_remote_code"] = True
        cfg["lm"] = str(lm_dir)

    edit_config(folder, change)
    return folder, marker


def _character(folder: Path) -> str:
    return json.loads((folder / "settings.jsonl").read_text().splitlines()[0])["character_id"]


@pytest.mark.slow
def test_retriever_json_never_turns_remote_code_on(remote_code_export, tmp_path):
    from replugchar.evaluation.evaluate import evaluate
    from replugchar.retrieval.langchain import ReplugcharRetriever

    folder, marker = remote_code_export
    cid = _character(folder)
    proc = replugchar(
        "chat", "--retriever", folder, "--character", cid, "--query", "Hi!", "--max_new_tokens", "3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(retriever.json's; --lm to change)" in proc.stdout
    assert not marker.exists()
    Retriever.load(folder)
    ReplugcharRetriever.from_export(folder, character_id=cid).invoke("Hello!")
    evaluate(
        data_dir="demo",
        out=str(tmp_path / "eval"),
        retriever=str(folder),
        max_examples=2,
        n_boot=10,
        base_encoder="tiny:bert",
        methods=["base", "trained"],
        distractors=0,
        loglik_cache_dir=None,
    )
    assert not marker.exists()
    # the person running the command can turn it on, and that is the only way
    proc = replugchar(
        "chat", "--retriever", folder, "--character", cid, "--query", "Hi!", "--max_new_tokens", "3",
        "--trust_remote_code",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "ran"


# ----------------------------------------------------------------------------------------------- history, query
def test_query_and_history_are_capped_like_data(export):
    r = Retriever.load(export)
    cid = _character(export)
    settings = ["likes tea", "works nights"]
    long = "a" * (MAX_TEXT_CHARS + 1)
    with pytest.raises(ValueError, match=f"query has {MAX_TEXT_CHARS + 1} characters"):
        r.rank(settings, long)
    with pytest.raises(ValueError, match="history turn 1 has"):
        r.rank(settings, "hi", history=[{"role": "user", "text": "hi"}, {"role": "character", "text": long}])
    with pytest.raises(ValueError, match="history turn 0 is empty"):
        r.search(cid, "hi", history=[{"role": "user", "text": " "}])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.mkdir(), "not a file"),
        (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda p: p.write_bytes(b'[{"role": "user", "text": "caf\xe9"}]'), "not valid UTF-8"),
        (lambda p: p.write_text('{"role": "user"}'), "must be a JSON list"),
        (
            lambda p: p.write_text(json.dumps([{"role": "user", "text": "a" * (MAX_TEXT_CHARS + 1)}])),
            "turn 0",
        ),
        (lambda p: p.write_text(json.dumps([{"role": "bot", "text": "hi"}])), "turn 0 must be"),
    ],
    ids=["folder", "deep", "latin1", "object", "over-long", "role"],
)
def test_bad_history_file_is_one_error_naming_it(tmp_path, write, message):
    path = tmp_path / "history.json"
    write(path)
    with pytest.raises(DataError) as err:
        _read_history(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value)


# ----------------------------------------------------------------------------------------------- fitted, priors
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"threshold": "0.3"}', "field 'threshold' must be a finite number or null"),
        ('{"prior_weight": 1e999}', "field 'prior_weight' must be a finite number"),
        ('{"dialogue_weights": ["a"]}', "field 'dialogue_weights'"),
        ('{"lambda": 0.1}', "unknown key(s) 'lambda'"),
    ],
)
def test_bad_fitted_json_names_file_and_field(tmp_path, content, message):
    path = tmp_path / "fitted.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_fitted(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def _prior(**kw) -> dict:
    return {"character_id": "c1", "index_in_character": 0, "setting": "s", "prior": 0.5, "raw": 0.5, **kw}


@pytest.mark.parametrize(
    ("rows", "line", "message"),
    [
        ([_prior(index_in_character="0")], 1, "field 'index_in_character' must be an integer"),
        ([_prior(index_in_character=1.5)], 1, "field 'index_in_character' must be an integer"),
        ([_prior(prior=True)], 1, "field 'prior' is True"),
        ([_prior(prior=1e300)], 1, "priors are z-scores"),
        ([_prior(), _prior(index_in_character=1), _prior(prior=-0.5)], 3, "a second prior for 'c1'[0]"),
        ([_prior(character_id=7)], 1, "field 'character_id' must be a string"),
    ],
    ids=["index-string", "index-float", "prior-bool", "prior-huge", "duplicate", "character-int"],
)
def test_bad_priors_line_names_file_line_and_field(tmp_path, rows, line, message):
    path = tmp_path / "priors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_priors(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value), err.value


@pytest.mark.parametrize(
    ("name", "content", "where", "message"),
    [
        ("s.csv", "character_id,setting_id,score\nc1,0,1\nc1,1,2,9\n", ":3", "columns in the header"),
        ("s.csv", "character_id;setting_id;score\nc1;0;1\n", ":1", "comma-separated columns"),
        (
            "s.csv",
            "character_id,setting_id,score\nc1,0,1\nc1,0,2\n",
            ":3",
            "a second score for 'c1' setting 0",
        ),
        ("s.jsonl", '{"character_id": "c1", "setting_id": 0, "score": 1e300}\n', ":1", "|score| <="),
        ("s.jsonl", '{"character_id": "c1", "setting_id": 0, "score": true}\n', ":1", "not a number"),
    ],
    ids=["ragged", "semicolons", "duplicate", "huge", "bool"],
)
def test_bad_imported_scores_name_file_and_line(tmp_path, characters, name, content, where, message):
    path = tmp_path / name
    path.write_text(content)
    chars = {"c1": next(iter(characters.values()))}
    with pytest.raises(DataError) as err:
        import_priors(path, chars)
    assert str(err.value).startswith(f"{path}{where}") and message in str(err.value), err.value


def test_csv_with_a_bom_imports(tmp_path, characters):
    char = next(iter(characters.values()))
    rows = "".join(f"c1,{i},{i}\n" for i in range(len(char.settings)))
    path = tmp_path / "s.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"character_id,setting_id,score\n{rows}".encode())
    table = import_priors(path, {"c1": char})
    assert [p.raw for p in table] == list(range(len(char.settings)))


# ----------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.mark.parametrize("kind", ["text", "truncated", "payload", "no-state-dict", "folder"])
def test_a_bad_checkpoint_is_one_error_naming_it_and_runs_nothing(tmp_path, kind):
    path, marker = tmp_path / "model.ckpt", tmp_path / "marker"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "payload":
        torch.save({"state_dict": {}, "x": _Payload(str(marker))}, path)
    elif kind == "no-state-dict":
        torch.save({"w": torch.zeros(3)}, path)
    else:
        path.mkdir()
    with pytest.raises(DataError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(str(path)) and "--ckpt_path" in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- console script
@pytest.mark.slow
def test_console_script_faults_are_one_line(export, other_export, tmp_path):
    """One of each kind through the installed command: schema, manifest, history, checkpoint."""
    cid = _character(export)
    bad_schema = copy_of(export, tmp_path / "a")
    edit_config(bad_schema, _set(("scoring", "weights"), {"ownmax": -1.0}))
    line = one_error_line(
        replugchar("retrieve", "--retriever", bad_schema, "--character", cid, "--query", "hi")
    )
    assert f"{bad_schema / 'retriever.json'}: scoring: weights must name exactly the features" in line

    swapped = copy_of(export, tmp_path / "b")
    _truncate_weights(swapped, other_export)
    line = one_error_line(replugchar("retrieve", "--retriever", swapped, "--character", cid, "--query", "hi"))
    assert "model.safetensors" in line and "truncated or replaced" in line

    history = tmp_path / "history.json"
    history.write_bytes(b"\xff\xfe")
    line = one_error_line(
        replugchar(
            "retrieve", "--retriever", export, "--character", cid, "--query", "hi", "--history", history
        )
    )
    assert f"{history}: not valid UTF-8" in line

    ckpt = tmp_path / "bad.ckpt"
    ckpt.write_text("nope")
    line = one_error_line(
        replugchar("export", "--config", "configs/debug.yaml", "--ckpt_path", ckpt, "--out", tmp_path / "x")
    )
    assert f"{ckpt}: not a readable checkpoint" in line


# ----------------------------------------------------------------------------------------------- leftovers
def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    final = tmp_path / "export"
    dead = 2**22 + 12345  # above pid_max on common systems: no such process
    for name in (f".export.tmp-{dead}-abc", f".export.old-{dead}-def", f".export.tmp-{os.getppid()}-live"):
        (tmp_path / name).mkdir()
    (tmp_path / f".other.tmp-{dead}-x").mkdir()  # another target's: not this write's business
    with atomic_folder(final) as tmp:
        (tmp / "f").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".export.tmp-{os.getppid()}-live", f".other.tmp-{dead}-x", "export"]
    assert remove_stale(tmp_path / "other") == [tmp_path / f".other.tmp-{dead}-x"]


@pytest.mark.slow
def test_finetune_refuses_to_reuse_a_checkpoint_folder_without_resuming(tmp_path):
    text = (
        (REPO / "configs" / "finetune_debug.yaml").read_text().replace("runs/finetune_debug", str(tmp_path))
    )
    config = tmp_path / "finetune.yaml"
    config.write_text(text)
    ckpts = tmp_path / "checkpoints"
    first = replugchar("finetune-lm", "--config", config, "--trainer.max_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ckpts / "last.ckpt").is_file()
    again = one_error_line(replugchar("finetune-lm", "--config", config, "--trainer.max_steps", "3"))
    assert f"{ckpts}: holds checkpoints of an earlier run" in again and "--ckpt_path" in again
    resumed = replugchar(
        "finetune-lm", "--config", config, "--trainer.max_steps", "6", "--ckpt_path", ckpts / "last.ckpt"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in ckpts.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6
