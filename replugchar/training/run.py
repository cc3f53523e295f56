"""What a ``fit`` config builds, without a Trainer: ``load_run(config_args) -> (module, datamodule)``.

Every tool command, notebook and benchmark starts here, so they read the same YAML as ``fit`` (the LM, template,
log-likelihood cache and character split that training used) and never import the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.options import one_line
from .datamodule import SPLIT_FLAT_NAMES, LSRDataModule
from .module import FLAT_NAMES, RENAMED_FIELDS, LSRModule

Moves = Mapping[str, Mapping[str, tuple[str, str]]]
"""section -> old flat option -> (group, field): where an option of before the option groups went."""
FIT_MOVES: Moves = {"model": FLAT_NAMES, "data": SPLIT_FLAT_NAMES}


def check_moved_options(args: Sequence[str], moves: Moves = FIT_MOVES) -> None:
    """A config file or flag written before the option groups (``model.lm_batch_tokens``, ``data.val_fraction``)
    or before a field's rename (``model.lm.score_cache_dir``, :data:`~replugchar.training.module.RENAMED_FIELDS`)
    is one ``ValueError`` naming where each option went, not jsonargparse's "does not accept option"."""
    found: list[str] = []
    args = list(args)
    for i, arg in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) else None
        if "=" in arg:
            arg, value = arg.split("=", 1)
        if arg == "--config" and value:
            found += [f"{value}: {m}" for m in _moved_in_config(value, moves)]
        elif arg.startswith("--") and arg.count(".") == 1:
            section, name = arg[2:].split(".")
            if name in moves.get(section, {}) and not _is_group_value(value):
                group, field = moves[section][name]
                found.append(f"--{section}.{name} is now --{section}.{group}.{field}")
            elif section == "model" and "model" in moves and _is_group_value(value):
                found += _renamed_fields(name, _group_mapping(value), "--")
        elif arg.startswith("--model.") and arg.count(".") == 2:
            _, group, name = arg[2:].split(".")
            if (group, name) in RENAMED_FIELDS and "model" in moves:
                found.append(f"{arg} is now --model.{group}.{RENAMED_FIELDS[group, name]}")
    if found:
        raise ValueError("options moved or renamed (README 'Options'): " + "; ".join(found))


def _moved_in_config(path: str, moves: Moves) -> list[str]:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # jsonargparse names the unreadable file
    out = []
    for section, table in moves.items():
        values = raw.get(section) if isinstance(raw, dict) else None
        for name, value in (values or {}).items() if isinstance(values, dict) else ():
            if name in table and not isinstance(value, dict):
                group, field = table[name]
                out.append(f"{section}.{name} is now {section}.{group}.{field}")
            elif section == "model" and isinstance(value, dict):
                out += _renamed_fields(name, value)
    return out


def _renamed_fields(group: str, fields: object, dash: str = "") -> list[str]:
    """``"model.lm.score_cache_dir is now model.lm.loglik_cache_dir"`` for each renamed field of a group's
    mapping (``dash="--"``: spelled as flags)."""
    if not isinstance(fields, dict):
        return []
    return [
        f"{dash}model.{group}.{old} is now {dash}model.{group}.{RENAMED_FIELDS[group, old]}"
        for old in fields
        if (group, old) in RENAMED_FIELDS
    ]


def _group_mapping(value: str) -> object:
    """The mapping a ``--model.GROUP`` value holds (inline YAML/JSON or a file of it); None if unreadable."""
    import yaml

    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8")
        return yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # jsonargparse names what it cannot read


def _is_group_value(value: str | None) -> bool:
    """``--model.lm`` followed by a group (a JSON/YAML mapping or a file of one), not an old flat value."""
    if value is None:
        return False
    return value.lstrip().startswith("{") or Path(value).is_file()


def parser_settings() -> None:
    """jsonargparse reads the docstring under each field of an option group (``model.lm``, ``model.loss``, ...)
    into ``--help``; every parser of a fit or finetune config (``fit``, ``finetune-lm``, the tools) sets it."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def run_parser():
    """A jsonargparse parser of a fit config's ``model`` and ``data`` sections (``trainer`` is accepted, unused)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser_settings()
    parser = ArgumentParser(prog="replugchar", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a fit config (configs/*.yaml)")
    parser.add_class_arguments(LSRModule, "model")
    parser.add_class_arguments(LSRDataModule, "data")
    parser.add_argument("--trainer", type=dict, default={}, help="ignored here (tools train nothing)")
    parser.add_argument("--seed_everything", type=bool | int, default=0)
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="ignored here")
    return parser


def load_run(config_args: Sequence[str], ckpt_path: str | None = None) -> tuple[LSRModule, LSRDataModule]:
    """(module, datamodule) from fit-config arguments (``["--config", "configs/demo.yaml", "--model.k", "3"]``),
    with trained weights from ``ckpt_path`` if given. The data is loaded and validated before any model loads."""
    from jsonargparse import ArgumentError

    from .checkpoint import load_checkpoint

    check_moved_options(config_args)
    try:
        cfg = run_parser().parse_args(list(config_args))
    except ArgumentError as err:
        raise ValueError(f"config: {one_line(str(err))}") from None
    dm = LSRDataModule(**cfg.data.as_dict())
    dm.setup("fit")
    module = LSRModule(**cfg.model.as_dict())
    module.characters = dm.characters
    if ckpt_path:
        state = load_checkpoint(ckpt_path)["state_dict"]
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{ckpt_path}: checkpoint does not match the config's model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return module, dm
