"""The command table: every ``replugchar COMMAND``, its one-line summary and the typed function that runs it.

A tool command is a function whose signature and docstring are its ``--help`` (the way litgpt's CLI is built):
:func:`parse` gives it a jsonargparse parser from :meth:`ArgumentParser.add_function_arguments`, so a new option
is a new parameter and nothing else. ``fit`` / ``validate`` are LightningCLI's and ``finetune-lm`` has its own
LightningCLI; they take the argument list as it is.

``--config`` means one of two things: for the tools that read the fit YAML (``FIT_CONFIG``: loglik, priors, index,
export) it is that YAML, and options after it that start with ``--model.`` / ``--data.`` override it (parsed later,
by :func:`replugchar.training.run.load_run`, so an error in the tool's own options costs no torch or Lightning
import); for every other command it is a YAML of the command's own options (``configs/eval_*.yaml``).

This module imports nothing heavy: ``replugchar --help`` reads the table only.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable

from ..core.options import one_line


@dataclasses.dataclass(frozen=True)
class Command:
    """One row of the table. ``target`` is ``"module:function"``, imported when the command runs."""

    summary: str
    target: str = ""
    kind: typing.Literal["function", "lightning", "argv"] = "function"
    subcommands: dict[str, Command] = dataclasses.field(default_factory=dict)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # old flag -> new flag, for one release


_TOOLS = "replugchar.cli.tools"
_READ = {"--dir": "--retriever"}  # 0.x spelling of the export folder a command reads
_LM_FLAGS = {
    "--lm_batch_tokens": "--max_batch_tokens",
    "--score_cache_dir": "--loglik_cache_dir",
}  # 0.1 spellings

COMMANDS: dict[str, Command] = {
    "fit": Command(
        "LSR training from a YAML config (LightningCLI; every option in --help and the YAML)",
        kind="lightning",
    ),
    "validate": Command(
        "validation metrics of a checkpoint (--config ... --ckpt_path ...)", kind="lightning"
    ),
    "loglik": Command(
        "precompute the frozen LM's log-likelihoods of a data set into the persistent cache",
        f"{_TOOLS}:loglik",
    ),
    "priors": Command(
        "generality priors (lm-utility | judge | import) and fit-weight (dialogue scale, λ, threshold)",
        subcommands={
            "lm-utility": Command(
                "prior = the LM's utility of a setting in the training dialogues",
                f"{_TOOLS}:priors_lm_utility",
            ),
            "judge": Command("prior = a local LLM judge's expected 1-5 score", f"{_TOOLS}:priors_judge"),
            "import": Command("prior = an external judge's scores (JSONL/CSV)", f"{_TOOLS}:priors_import"),
            "fit-weight": Command(
                "fit the dialogue scale α, λ and the threshold τ on validation characters",
                f"{_TOOLS}:priors_fit_weight",
            ),
        },
    ),
    "index": Command(
        "rebuild the FAISS index (encoder and/or priors changed); flat, ivf or hnsw", f"{_TOOLS}:index"
    ),
    "export": Command(
        "export encoder + index + scoring rule as one folder for other RAG stacks", f"{_TOOLS}:export"
    ),
    "retrieve": Command(
        "print a character's top settings for a query (and optional history)",
        f"{_TOOLS}:retrieve",
        renamed=_READ,
    ),
    "add-characters": Command(
        "add characters (characters.jsonl) to an export folder: embedded, with its learned generality",
        f"{_TOOLS}:add_characters",
        renamed=_READ,
    ),
    "evaluate": Command(
        "compare retrievers on held-out characters by the frozen LM's likelihood of gold replies",
        "replugchar.evaluation.evaluate:evaluate",
        renamed={"--trained": "--retriever", "--out_dir": "--out", **_LM_FLAGS},
    ),
    "chat": Command(
        "talk to a character: retrieved settings (score, similarity, prior) and the LM's reply",
        "replugchar.cli.chat:chat",
    ),
    "finetune-lm": Command(
        "fine-tune the character LM (pad/eos-safe SFT, full or LoRA) to use as the frozen teacher",
        "replugchar.cli.lightning_cli:run_finetune",
        kind="argv",
    ),
    "teacher-report": Command(
        "how well an LM separates settings: margins, oracle gap, agreement with similarity",
        "replugchar.evaluation.teacher_report:report",
        renamed=_LM_FLAGS,
    ),
}

RENAMED_COMMANDS = {"score": "loglik"}
"""Old command name -> new, for one release ("score" is the retrieval rule's; the LM gives log-likelihoods)."""

FIT_CONFIG = "fit"  # the parameter of a tool that reads the fit YAML (a FitConfig, filled from --config)
CONFIG_HELP = (
    "fit config (configs/*.yaml); later --model.X / --data.X options override it "
    "(replugchar fit --help lists them)"
)


def resolve(target: str) -> Callable:
    """The function ``"module:function"`` names (looked up now, so a test may replace it)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def lookup(name: str, argv: list[str]) -> tuple[str, Command, list[str]]:
    """(prog, command, the rest of argv) for ``replugchar NAME [SUBCOMMAND] ...``."""
    command = COMMANDS[name]
    if not command.subcommands:
        return f"replugchar {name}", command, argv
    choices = ", ".join(command.subcommands)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, command.subcommands))
        rows = [f"  {sub:<{width}}  {c.summary}" for sub, c in command.subcommands.items()]
        print(
            "\n".join([f"usage: replugchar {name} {{{choices}}} [options]", "", command.summary, "", *rows])
        )
        raise SystemExit(0)
    if argv[0] not in command.subcommands:
        first = f"it comes first: replugchar {name} METHOD ..."
        raise ValueError(f"{name}: unknown method '{argv[0]}' (choose from {choices}; {first})")
    return f"replugchar {name} {argv[0]}", command.subcommands[argv[0]], argv[1:]


def parse(name: str, argv: list[str]) -> tuple[Callable, dict]:
    """(function, keyword arguments) of ``replugchar NAME ARGV`` for a function command; a bad option raises
    ``ValueError`` with one line that names it (``--help`` prints the parser's help and exits)."""
    prog, command, argv = lookup(name, argv)
    fn = resolve(command.target)
    argv = _renamed(argv, command.renamed)
    reads_fit = FIT_CONFIG in inspect.signature(fn).parameters
    own, overrides = split_overrides(argv) if reads_fit else (argv, [])
    parser = build_parser(prog, fn, reads_fit)
    from jsonargparse import ArgumentError

    try:
        cfg = parser.parse_args(bare_flags(own, fn))
        # `instantiate` from jsonargparse 4.49 on (`instantiate_classes` is deprecated there)
        init = getattr(parser, "instantiate", parser.instantiate_classes)(cfg)
    except ArgumentError as err:
        message = one_line(str(err))
        for old, new in command.renamed.items():  # a YAML of the old spelling: say the new one
            if f"'{old[2:]}'" in message:
                message += f" (renamed {new[2:]})"
        where = prog.removeprefix("replugchar ")
        raise ValueError(
            f"{where} {message}" if message.startswith("needs ") else f"{where}: {message}"
        ) from None
    kwargs = {key: init[key] for key in inspect.signature(fn).parameters if key != FIT_CONFIG}
    if reads_fit:
        from .tools import FitConfig

        if init.config and not os.path.isfile(init.config):  # said now, not after importing torch
            raise FileNotFoundError(
                f"{prog.removeprefix('replugchar ')}: --config: File does not exist: '{init.config}'"
            )
        kwargs[FIT_CONFIG] = FitConfig(init.config, tuple(overrides))
    return fn, kwargs


def run(name: str, argv: list[str]):
    """Parse ``replugchar NAME ARGV`` and call the command's function; its return value (``evaluate``'s result)."""
    fn, kwargs = parse(name, argv)
    return fn(**kwargs)


def build_parser(prog: str, fn: Callable, reads_fit: bool = False):
    """A jsonargparse parser of ``fn``'s parameters (help from its docstring) and ``--config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    intro = (inspect.getdoc(fn) or "").split("\nArgs:")[0].strip()
    flags = any(hint is bool for hint in typing.get_type_hints(fn).values())
    epilog = "A true/false option given alone (--name) means true." if flags else None
    parser = ArgumentParser(prog=prog, description=intro, epilog=epilog, exit_on_error=False)
    if reads_fit:
        parser.add_argument("--config", type=str | None, default=None, help=CONFIG_HELP)
    else:
        parser.add_argument("--config", action=ActionConfigFile, help="a YAML of the options below")
    parser.add_function_arguments(fn, as_group=False, skip={FIT_CONFIG})
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the tool's own options, the ``--model.X`` / ``--data.X`` options and their values for the fit YAML)."""
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--model.", "--data.")):
            takes_next = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            overrides += argv[i : i + 1 + takes_next]
            i += 1 + takes_next
        else:
            own.append(arg)
            i += 1
    return own, overrides


def bare_flags(argv: list[str], fn: Callable) -> list[str]:
    """``--show_prompt`` alone means ``--show_prompt=true`` for a ``bool`` parameter (as argparse's store_true)."""
    hints = typing.get_type_hints(fn)
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    out = []
    for i, arg in enumerate(argv):
        value_follows = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        out.append(f"{arg}=true" if arg in flags and not value_follows else arg)
    return out


def _renamed(argv: list[str], renamed: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if flag in renamed:
            print(
                f"replugchar: warning: {flag} is deprecated, use {renamed[flag]} (the old name goes in the next release)",
                file=sys.stderr,
            )
            arg = renamed[flag] + sep + value
        out.append(arg)
    return out
