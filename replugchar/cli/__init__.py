"""The one entry point, ``replugchar COMMAND``: LightningCLI ``fit`` / ``validate`` and the tool commands, each
a typed function of the command table (:mod:`replugchar.cli.commands`) whose signature is its parser.

Imports are lazy so ``replugchar --help`` answers at once. A user error (bad data, a bad option value, a missing
file, an unknown character) prints one line, ``replugchar: error: <file>:<line>: <message>``, and exits with 2;
``--traceback`` or ``REPLUGCHAR_DEBUG=1`` shows the traceback.

``fit`` validates once before training and once after, prints both (top-1 agreement with the LM's best setting,
lift, KL between LM target and retriever) with the paired change and its interval, and exports the retriever.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from .commands import COMMANDS, RENAMED_COMMANDS, resolve, run


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: replugchar COMMAND [options]   (replugchar COMMAND --help for its options)",
        "",
        "Train and use a dense retriever of role-play character settings supervised by a frozen LM (REPLUG LSR).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        "options: --traceback (or REPLUGCHAR_DEBUG=1) shows the full traceback of an error",
    ]
    return "\n".join(lines)


class _DropTips(logging.Filter):
    """Lightning advertises cloud services on every run ("💡 Tip: ..."): not what a user asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡" not in record.getMessage()


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test harness or notebook may have replaced it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(command: str) -> None:
    """INFO from replugchar only; Lightning's banners only for ``fit`` (the one command that trains)."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("replugchar")
    if not pkg.handlers:
        pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        lg.addFilter(_DropTips())
        for h in lg.handlers:
            h.addFilter(_DropTips())
        if command != "fit":
            lg.setLevel(logging.WARNING)
    for name in ("sentence_transformers", "transformers", "datasets", "httpx", "faiss", "bm25s"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning warnings about choices this package makes on purpose (plain-text batches stay on the CPU; the
    # frozen LM and sentence-transformers' submodules sit in eval mode), and a torch deprecation inside Lightning
    for message in (
        ".*overridden `transfer_batch_to_device`",
        ".*module\\(s\\) in eval mode",
        ".*isinstance\\(treespec, LeafSpec\\)",
    ):
        warnings.filterwarnings("ignore", message=message)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are a user's to fix: one line, no traceback."""
    # DataError is a ValueError (the user errors are known without importing replugchar.core.data)
    return (
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        KeyError,
        ModuleNotFoundError,
        FloatingPointError,
    )


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def main(argv: list[str] | None = None) -> None:
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("REPLUGCHAR_DEBUG", "") not in ("", "0") or "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return
    command, rest = argv[0], argv[1:]
    if command in RENAMED_COMMANDS:
        print(
            f"replugchar: warning: '{command}' is deprecated, use '{RENAMED_COMMANDS[command]}' "
            "(the old name goes in the next release)",
            file=sys.stderr,
        )
        command = RENAMED_COMMANDS[command]
    if command not in COMMANDS:
        print(
            f"replugchar: error: unknown command '{command}' (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        sys.exit(2)
    _configure_logging(command)
    try:
        _dispatch(command, rest, explicit)
    except user_errors() as err:
        if debug:
            raise
        print(f"replugchar: error: {_message(err)}", file=sys.stderr)
        sys.exit(2)


def _dispatch(command: str, rest: list[str], explicit: bool) -> None:
    kind = COMMANDS[command].kind
    if kind == "lightning":
        from .lightning_cli import run_lightning

        # LightningCLI reads sys.argv itself when args is None (and warns when it gets both)
        run_lightning([command, *rest] if explicit else None)
    elif kind == "argv":  # a command with its own LightningCLI (finetune-lm)
        resolve(COMMANDS[command].target)(rest)
    else:
        run(command, rest)
