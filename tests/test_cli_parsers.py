"""The tool commands' one parser style: each is a typed function from the command table, its signature and
docstring are its ``--help``; a bad option is one line naming it; ``--model.X`` / ``--data.X`` reach the fit
config; the command lines of the README and docs name options that exist."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import docstring_parser
import pytest
import yaml

from replugchar.cli import main
from replugchar.cli.commands import COMMANDS, FIT_CONFIG, lookup, parse, resolve
from replugchar.lm.decoding import MODES

REPO = Path(__file__).parents[1]


def function_commands() -> list[tuple[str, list[str]]]:
    """(command, [subcommand]) of every command parsed from a function's signature."""
    out = []
    for name, command in COMMANDS.items():
        if command.subcommands:
            out += [(name, [sub]) for sub in command.subcommands]
        elif command.kind == "function":
            out.append((name, []))
    return out


FUNCTION_COMMANDS = function_commands()
IDS = [" ".join([name, *sub]) for name, sub in FUNCTION_COMMANDS]


def test_the_table_covers_the_documented_commands():
    assert (
        len(FUNCTION_COMMANDS) == 12
    )  # score, 4 priors methods, index, export, retrieve, add-characters, ...
    for command in COMMANDS.values():
        for target in [command.target] * bool(command.target) + [
            c.target for c in command.subcommands.values()
        ]:
            assert callable(resolve(target)), target


@pytest.mark.parametrize(("name", "sub"), FUNCTION_COMMANDS, ids=IDS)
def test_help_lists_every_parameter_with_its_docstring(name, sub, capsys):
    _, command, _ = lookup(name, sub)
    fn = resolve(command.target)
    documented = {p.arg_name: p.description for p in docstring_parser.parse(inspect.getdoc(fn)).params}
    with pytest.raises(SystemExit) as exit:
        main([name, *sub, "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config" in text
    for param in inspect.signature(fn).parameters:
        if param == FIT_CONFIG:
            assert "--model.X" in text  # where the fit config's own options are
            continue
        assert f"--{param}" in text, param
        assert param in documented, f"{command.target}: document '{param}' under Args"
        assert " ".join(documented[param].split())[:40] in text, param


def test_priors_without_a_method_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["priors"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert all(method in out for method in COMMANDS["priors"].subcommands)


def one_error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("replugchar: error: "), lines
    return lines[0]


RETRIEVE = ["retrieve", "--retriever", "/nowhere", "--character", "c", "--query", "hi"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([*RETRIEVE, "--k", "x"], "retrieve: --k: expected int, got 'x'"),
        ([*RETRIEVE, "--bogus", "1"], "retrieve: unrecognized arguments: --bogus 1"),
        (RETRIEVE[:3], "retrieve needs --character, --query"),
        (["chat", "--retriever", "r", "--character", "c", "--mode", "beam"], "chat: --mode:"),
        (
            ["loglik", "--split", "nope"],
            "loglik: --split: expected one of 'train', 'val', 'test', 'all', 'every'",
        ),
        (["priors", "fit-weight", "--out", "x.json"], "priors fit-weight needs --priors"),
        (["priors", "guess", "--out", "x"], "priors: unknown method 'guess' (choose from lm-utility"),
        (["index", "--out", "x", "--kind", "lsh"], "index: --kind:"),
        (["export", "--out", "x", "--prior_weight", "much"], "export: --prior_weight:"),
        (["evaluate", "--k", "five"], "evaluate: --k: expected int, got 'five'"),
        (["teacher-report", "--val_fraction", "1.5"], "--val_fraction must be in [0, 1), got 1.5"),
        (
            ["loglik", "--config", "configs/debug.yaml", "--model.k", "x"],
            "config: --model.k: expected int, got 'x'",
        ),
        (["teacher-report", "--splitt", "val"], "teacher-report: unrecognized arguments: --splitt val"),
        (["loglik", "--config", "/nowhere.yaml"], "loglik: --config: File does not exist: '/nowhere.yaml'"),
        (
            ["evaluate", "--config", "/nowhere.yaml"],
            "evaluate: --config: File does not exist: '/nowhere.yaml'",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_option_is_one_line_naming_it(argv, expected, capsys):
    assert expected in one_error_line(argv, capsys)


def test_an_unknown_key_of_a_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "eval.yaml"
    path.write_text("data_dir: demo\ntrained: runs/x\n")
    line = one_error_line(["evaluate", "--config", str(path)], capsys)
    assert "'trained'" in line and "renamed retriever" in line, line


def test_the_old_folder_flags_still_work_for_one_release(capsys):
    _, kwargs = parse("retrieve", ["--dir", "r", "--character", "c", "--query", "q"])
    assert kwargs["retriever"] == "r"
    _, kwargs = parse("add-characters", ["--dir=r", "--characters", "c.jsonl"])
    assert kwargs["retriever"] == "r"
    _, kwargs = parse("evaluate", ["--trained", "r", "--out_dir", "o"])
    assert kwargs["retriever"] == "r" and kwargs["out"] == "o"
    err = capsys.readouterr().err
    assert err.count("is deprecated, use --retriever") == 3 and err.count("is deprecated, use --out") == 1, (
        err
    )
    for name in ("evaluate", "teacher-report"):
        _, kwargs = parse(name, ["--lm_batch_tokens", "123", "--score_cache_dir=/c"])
        assert kwargs["max_batch_tokens"] == 123 and kwargs["loglik_cache_dir"] == "/c", name


def test_the_old_score_command_runs_loglik_for_one_release(capsys):
    """``score`` became ``loglik`` when "score" came to mean only the retrieval rule's: the old name still runs
    the same command, with a warning on stderr; it is not listed as a command of its own."""

    with pytest.raises(SystemExit) as stop:
        main(["score", "--help"])
    assert stop.value.code in (0, None)
    out, err = capsys.readouterr()
    assert "usage: replugchar loglik" in out and "--split" in out
    assert "'score' is deprecated, use 'loglik'" in err
    assert "score" not in COMMANDS and "loglik" in COMMANDS


def test_top_level_help_lists_each_command_with_its_summary(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.summary)}$", out, flags=re.MULTILINE), (
            name
        )
    assert "Command(" not in out


def test_export_with_priors_writes_a_folder_that_loads(tmp_path):
    """The priors table travels inside the export; a file added after its manifest would refuse to load."""
    from replugchar.cli.commands import run
    from replugchar.retrieval.retriever import Retriever

    priors = tmp_path / "priors.jsonl"
    run("priors", ["lm-utility", "--config", "configs/debug.yaml", "--out", str(priors)])
    out = tmp_path / "export"
    run("export", ["--config", "configs/debug.yaml", "--priors", str(priors), "--out", str(out)])
    loaded = Retriever.load(out)  # verifies the manifest
    assert (out / "priors.jsonl").read_text(encoding="utf-8") == priors.read_text(encoding="utf-8")
    assert "priors.jsonl" in (out / "manifest.json").read_text(encoding="utf-8")
    assert loaded.index.priors is not None and (loaded.index.priors != 0).any()


def test_bare_bool_flags_and_explicit_values():
    base = ["--retriever", "r", "--character", "c"]
    _, kwargs = parse("chat", [*base, "--show_prompt", "--no_threshold", "--k", "2"])
    assert kwargs["show_prompt"] is True and kwargs["no_threshold"] is True and kwargs["k"] == 2
    _, kwargs = parse("chat", [*base, "--show_prompt", "false"])
    assert kwargs["show_prompt"] is False and kwargs["no_threshold"] is False
    _, kwargs = parse("retrieve", [*base, "--query", "q", "--no_threshold"])
    assert kwargs["no_threshold"] is True


def test_chat_modes_are_the_decoding_modes():
    hint = inspect.signature(resolve(COMMANDS["chat"].target), eval_str=True).parameters["mode"].annotation
    assert tuple(hint.__args__) == MODES


def test_fit_options_after_the_tool_options_go_to_the_fit_config(monkeypatch):
    _fn, kwargs = parse(
        "index",
        [
            "--config",
            "configs/debug.yaml",
            "--model.k",
            "3",
            "--out",
            "runs/x",
            "--data.batch_size=2",
            "--kind",
            "ivf",
        ],
    )
    assert kwargs["out"] == "runs/x" and kwargs["kind"] == "ivf" and kwargs["ckpt_path"] is None
    fit = kwargs[FIT_CONFIG]
    assert fit.config == "configs/debug.yaml" and fit.overrides == ("--model.k", "3", "--data.batch_size=2")
    calls = []
    monkeypatch.setattr(
        "replugchar.training.run.load_run", lambda args, ckpt=None: calls.append((args, ckpt))
    )
    fit.load("last.ckpt")
    assert calls == [
        (["--config", "configs/debug.yaml", "--model.k", "3", "--data.batch_size=2"], "last.ckpt")
    ]


def _path_of(section: dict, key: str, prefix: str = "") -> str | None:
    """The dotted path of ``key`` in a config section (it may sit in a group of options)."""
    for name, value in section.items():
        if name == key:
            return prefix + name
        if isinstance(value, dict):
            found = _path_of(value, key, f"{prefix}{name}.")
            if found:
                return found
    return None


def _get(obj, path: str):
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def test_an_override_reaches_the_module_and_the_datamodule(monkeypatch):
    raw = yaml.safe_load((REPO / "configs" / "debug.yaml").read_text())
    k_path, batch_path = _path_of(raw["model"], "k"), _path_of(raw["data"], "batch_size")
    assert k_path and batch_path
    assert _get(raw["model"], k_path) != 3 and _get(raw["data"], batch_path) != 2
    monkeypatch.setattr(sys, "argv", ["replugchar"])
    _, kwargs = parse(
        "loglik", ["--config", "configs/debug.yaml", f"--model.{k_path}", "3", f"--data.{batch_path}", "2"]
    )
    module, dm = kwargs[FIT_CONFIG].load()
    assert _get(module.hparams, k_path) == 3
    assert _get(dm.hparams, batch_path) == 2


# ------------------------------------------------------------------------------------ documented command lines
def documented_command_lines() -> list[tuple[str, str]]:
    """(place, command line) of every ``replugchar COMMAND ...`` in the README, docs, configs, notebooks, CI."""
    places = [REPO / "README.md", REPO / ".ci" / "run", *sorted((REPO / "docs").glob("*.md"))]
    places += sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "notebooks").glob("*.ipynb"))
    places += sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "scripts").glob("*"))
    found = []
    for place in places:
        if not place.is_file():
            continue
        text = place.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in re.findall(r"replugchar ((?:[a-z][\w-]*)(?: [^`|\n]*)?)", text):
            if line.split()[0] in COMMANDS:
                found.append((place.relative_to(REPO).as_posix(), line))
    return found


def test_documented_command_lines_use_real_options():
    lines = documented_command_lines()
    assert len(lines) >= 20  # the pattern still finds the docs' command lines
    wrong = []
    for place, line in lines:
        words = line.split()
        name = words[0]
        command = COMMANDS[name]
        if command.kind != "function":
            continue  # LightningCLI's own parsers (tests/test_configs.py parses their configs)
        if command.subcommands:
            if len(words) < 2 or words[1] not in command.subcommands:
                continue  # prose about the command ("replugchar priors writes ...")
            command = command.subcommands[words[1]]
        params = set(inspect.signature(resolve(command.target)).parameters)
        for flag in re.findall(r"(?<!\S)--([\w.]+)", line):
            if flag in ("config", "help") or (FIT_CONFIG in params and flag.startswith(("model.", "data."))):
                continue
            if flag not in params:
                wrong.append(f"{place}: replugchar {line.strip()}: --{flag}")
    assert wrong == []
