"""Every YAML in configs/ parses with the parser of the command it is written for (``replugchar fit`` and the
tools share the LightningCLI parser; ``replugchar evaluate`` has its own), without instantiating anything, so
configs naming hub or embedded models need neither network nor weights. Unknown keys and wrong types fail."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from replugchar.cli.commands import parse as parse_command
from replugchar.cli.lightning_cli import LSRCLI, FinetuneCLI
from replugchar.evaluation.evaluate import evaluate
from replugchar.training.datamodule import LSRDataModule
from replugchar.training.finetune import CharacterLMModule
from replugchar.training.module import LSRModule
from replugchar.training.sft_data import CharacterSFTDataModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


class ParseOnlyCLI(LSRCLI):
    """The real CLI parser (same classes, same arguments), but no model, data or trainer is built."""

    def instantiate_classes(self) -> None:
        pass


def parse(path: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["replugchar"])  # pytest's own arguments are not ours
        return ParseOnlyCLI(LSRModule, LSRDataModule, run=False, args=["--config", str(path)]).config


class ParseOnlyFinetuneCLI(FinetuneCLI):
    """The ``replugchar finetune-lm`` parser, nothing built (tests/test_finetune.py instantiates its configs)."""

    def instantiate_classes(self) -> None:
        pass


def parse_finetune(path: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["replugchar"])
        args = ["--config", str(path)]
        return ParseOnlyFinetuneCLI(CharacterLMModule, CharacterSFTDataModule, run=False, args=args).config


def parse_evaluate(path: Path) -> dict:
    """The arguments ``replugchar evaluate --config path`` calls ``evaluate`` with (the command's own parser)."""
    fn, kwargs = parse_command("evaluate", ["--config", str(path)])
    assert fn is evaluate
    return kwargs


def command_of(path: Path) -> str:
    """The command a config is written for, from its usage line ``# replugchar <command> --config ...``."""
    found = re.search(rf"replugchar ([\w-]+) --config configs/{re.escape(path.name)}", path.read_text())
    assert found, f"{path.name}: add a usage comment '# replugchar <command> --config configs/{path.name}'"
    return found.group(1)


def test_every_config_the_docs_name_is_shipped_and_parsed_below():
    """A config named in the README, docs, notebooks, scripts, benchmarks, CI or another config's usage line is one
    of ``CONFIGS`` (so the parametrised tests below parse it): a renamed or deleted config fails here."""
    repo = Path(__file__).parents[1]
    places = [repo / "README.md", repo / ".ci" / "run"]
    for folder, pattern in (
        ("docs", "*.md"),
        ("notebooks", "*.ipynb"),
        ("scripts", "*"),
        ("benchmarks", "*.py"),
    ):
        places += sorted((repo / folder).glob(pattern))
    places += CONFIGS
    named = {
        (name, place.relative_to(repo).as_posix())
        for place in places
        if place.is_file()
        for name in re.findall(r"configs/([\w.-]+\.yaml)", place.read_text(encoding="utf-8"))
    }
    assert len({name for name, _ in named}) >= 5  # the pattern still finds the docs' configs
    shipped = {p.name for p in CONFIGS}
    assert sorted((name, where) for name, where in named if name not in shipped) == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_keeps_every_value(path):
    raw = yaml.safe_load(path.read_text())
    command = command_of(path)
    if command == "evaluate":
        kwargs = parse_evaluate(path)
        for key, value in raw.items():
            parsed = kwargs[key]
            if isinstance(value, dict):
                parsed = vars(parsed) if not isinstance(parsed, dict) else parsed
                assert all(parsed[sub] == v for sub, v in value.items()), f"{path.name}: {key}"
            else:
                assert parsed == value, f"{path.name}: {key}"
        return
    if command == "finetune-lm":  # its own CLI (instantiated too, in tests/test_finetune.py)
        cfg = parse_finetune(path)
        assert cfg.export.output_dir == raw["export"]["output_dir"], f"{path.name}: export.output_dir"
    else:
        assert command in ("fit", "validate", "loglik", "priors", "index", "export"), command
        cfg = parse(path)
    for section in ("model", "data"):
        for key, value in (raw.get(section) or {}).items():
            parsed = cfg[section][key]
            if isinstance(value, dict):  # e.g. model.template: a dataclass parsed field by field
                for sub, sub_value in value.items():
                    assert parsed[sub] == sub_value, f"{path.name}: {section}.{key}.{sub}"
            else:
                assert parsed == value, f"{path.name}: {section}.{key}"
    for key, value in (raw.get("trainer") or {}).items():
        if not isinstance(value, dict | list):
            assert cfg.trainer[key] == value, f"{path.name}: trainer.{key}"
    if "seed_everything" in raw:
        assert cfg.seed_everything == raw["seed_everything"]
    callbacks = raw.get("trainer", {}).get("callbacks") or []
    assert [c.class_path for c in cfg.trainer.callbacks or []] == [c["class_path"] for c in callbacks]


@pytest.fixture
def debug_raw() -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "configs" / "debug.yaml").read_text())


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "kk", 3),  # unknown key
        ("model", "k", "five"),  # wrong type
        ("model", "loss.direction", "sideways"),  # not one of the Literal values
        ("model", "lm.max_batch_tokenz", 8),  # unknown key in a group
        ("data", "batch_size", "big"),
        ("data", "data_dirr", "demo"),
        ("trainer", "max_stepz", 3),
    ],
)
def test_unknown_key_or_wrong_type_fails(tmp_path, debug_raw, capsys, section, key, value):
    *groups, name = key.split(".")
    target = debug_raw[section]
    for group in groups:
        target = target[group]
    target[name] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(debug_raw))
    with pytest.raises(SystemExit) as err:
        parse(path)
    assert err.value.code != 0
    assert name in capsys.readouterr().err


def test_the_untouched_copy_parses(tmp_path, debug_raw):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(debug_raw))
    cfg = parse(path)
    assert cfg.model.encoder == "tiny:bert" and cfg.model.lm.name == "tiny:gpt2"
    assert cfg.model.lm.loglik_cache_dir is None  # the debug run must not write a persistent cache


def test_eval_demo_uses_the_split_of_the_demo_run():
    configs = Path(__file__).parents[1] / "configs"
    if not (configs / "eval_demo.yaml").exists():
        pytest.skip("configs/eval_demo.yaml not shipped")
    evaluation = parse_evaluate(configs / "eval_demo.yaml")
    fit = parse(configs / "demo.yaml")
    from replugchar.evaluation.evaluate import resolve_split
    from replugchar.training.datamodule import LSRDataModule

    assert evaluation["data_dir"] == fit.data.data_dir
    assert evaluation["retriever"] == f"{fit.trainer.default_root_dir}/retriever"
    # the split is not re-declared: evaluate reads what the demo's export stores (retriever.json "split")
    assert evaluation["val_fraction"] is None and evaluation["seed"] is None
    stored = {"split": LSRDataModule(**fit.data.as_dict()).split.to_dict()}
    split = fit.data.split
    assert split.val_fraction == 0.25  # configs/demo.yaml's, not the default
    assert resolve_split(stored, None, None, None) == (split.val_fraction, split.test_fraction, split.seed)
    assert resolve_split(stored, 0.5, None, 7) == (0.5, split.test_fraction, 7)
    assert resolve_split({}, None, None, None) == (0.2, 0.0, 0)


def test_evaluate_config_with_unknown_key_fails(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("data_dir: demo\nk: 5\nkk: 3\n")
    with pytest.raises(ValueError, match=r"evaluate: .*'kk'"):
        parse_evaluate(path)
