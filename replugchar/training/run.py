"""What a ``fit`` config builds, without a Trainer: ``load_run(config_args) -> (module, datamodule)``.

Every tool command, notebook and benchmark starts here, so they read the same YAML as ``fit`` (the LM, template,
score cache and character split that training used) and never import the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence

from .datamodule import LSRDataModule
from .module import LSRModule


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

    try:
        cfg = run_parser().parse_args(list(config_args))
    except ArgumentError as err:
        raise ValueError(f"config: {err}") from None
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
