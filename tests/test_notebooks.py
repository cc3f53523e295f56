"""The analysis notebooks run end to end on configs/debug.yaml (tiny models built in code) and draw their plots.

Notebook 01 is executed without ``REPLUGCHAR_NB_RUN``, so it trains a fresh run (the no-run path) into a temp
folder; its kernel's ``TMPDIR`` points into this test's temp folder, which lets 02 and 03 load that same run (the
``REPLUGCHAR_NB_RUN`` path) instead of training two more. Notebook 03 runs through
``scripts/make_readme_figure.py``, which must save the main figure where it is told. The committed notebooks
carry no outputs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).parents[1]
NOTEBOOKS = {
    name: REPO / "notebooks" / f"{name}.ipynb"
    for name in ("01_train_and_inspect", "02_generality_priors", "03_greetings")
}
CONFIG = "configs/debug.yaml"


def kernel_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The kernel's environment: tiny config, isolated model cache, no display, one thread per kernel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLUGCHAR_NB_")}
    return {
        **env,
        "REPLUGCHAR_CACHE": os.environ["REPLUGCHAR_CACHE"],  # a session temp folder (tests/conftest.py)
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TMPDIR": str(tmp),
        "REPLUGCHAR_NB_CONFIG": CONFIG,
        **extra,
    }


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, if a cell fails
    return nb


def outputs(nb: nbformat.NotebookNode) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def check_ran(nb: nbformat.NotebookNode) -> None:
    errors = [out for out in outputs(nb) if out.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    images = [out for out in outputs(nb) if "image/png" in out.get("data", {})]
    assert images, "the notebook drew no figure"


def test_committed_notebooks_have_parameters_and_no_outputs():
    for name, path in NOTEBOOKS.items():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        first = code[0].source
        assert 'CONFIG = os.environ.get("REPLUGCHAR_NB_CONFIG", "configs/debug.yaml")' in first, name
        assert 'RUN_DIR = os.environ.get("REPLUGCHAR_NB_RUN", "")' in first, name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"


@pytest.fixture(scope="module")
def notebook_01(tmp_path_factory):
    """Notebook 01 executed without a run: it trains one under its TMPDIR. Returns (notebook, run folder)."""
    tmp = tmp_path_factory.mktemp("nb01")
    nb = execute("01_train_and_inspect", kernel_env(tmp))
    runs = sorted(tmp.glob("replugchar-nb-*"))
    assert len(runs) == 1, f"expected one fresh run under {tmp}, found {runs}"
    return nb, runs[0]


@pytest.mark.slow
def test_01_trains_a_fresh_run_and_plots_it(notebook_01):
    nb, run = notebook_01
    check_ran(nb)
    assert (run / "retriever" / "retriever.json").is_file()
    assert list(run.glob("lightning_logs/version_*/metrics.csv"))


@pytest.mark.slow
def test_02_priors_on_an_existing_run(notebook_01, tmp_path):
    _, run = notebook_01
    check_ran(execute("02_generality_priors", kernel_env(tmp_path, REPLUGCHAR_NB_RUN=str(run))))


@pytest.mark.slow
def test_03_through_the_readme_figure_script(notebook_01, tmp_path):
    _, run = notebook_01
    spec = importlib.util.spec_from_file_location(
        "make_readme_figure", REPO / "scripts" / "make_readme_figure.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    figure = tmp_path / "figure" / "greeting_rank_shift.png"
    nb = script.render(CONFIG, str(run), figure, timeout=300, env=kernel_env(tmp_path))
    check_ran(nb)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
