"""Render the README figure (greeting rank shift and gold-reply NLL) from a trained run.

The plot lives in one place, notebooks/03_greetings.ipynb: this script executes that notebook with nbclient on
the given config and run and lets it save its main figure (``REPLUGCHAR_NB_FIGURE_OUT``)::

    replugchar fit --config configs/demo.yaml
    python scripts/make_readme_figure.py --config configs/demo.yaml --run runs/demo

The run is the ``default_root_dir`` of ``replugchar fit`` (it holds ``retriever/``, the trained export). The LM
log-likelihoods come from the config's cache, so a run whose validation was computed already costs few LM calls.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_greetings.ipynb"


def render(config: str, run: str, out: str | Path, *, timeout: int = 3600, env: dict[str, str] | None = None):
    """Execute notebook 03 on ``config`` + ``run``, saving its main figure to ``out``; return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a stale figure must not pass for a fresh one
    kernel_env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        **(env or {}),
        "REPLUGCHAR_NB_CONFIG": str(Path(config).resolve()) if Path(config).exists() else config,
        "REPLUGCHAR_NB_RUN": str(Path(run).resolve()),
        "REPLUGCHAR_NB_FIGURE_OUT": str(out),
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute(env=kernel_env)
    if not out.is_file():
        raise RuntimeError(f"{NOTEBOOK.name} ran but wrote no figure to {out}")
    return nb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml", help="the config the run was trained with")
    parser.add_argument("--run", required=True, help="default_root_dir of a finished `replugchar fit` run")
    parser.add_argument("--out", default=str(REPO / "docs" / "greeting_rank_shift.png"))
    parser.add_argument("--executed", help="also save the executed notebook (with outputs) here")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per notebook cell")
    args = parser.parse_args(argv)
    if not (Path(args.run) / "retriever" / "retriever.json").is_file():
        parser.error(f"--run {args.run}: no retriever/retriever.json (not a finished `replugchar fit` run)")
    nb = render(args.config, args.run, args.out, timeout=args.timeout)
    if args.executed:
        import nbformat

        nbformat.write(nb, args.executed)
    print(f"figure written to {args.out}")


if __name__ == "__main__":
    main()
