"""The analysis notebooks run end to end on configs/debug.yaml (tiny models built in code) and draw their plots.

Notebook 01 is executed without ``REPLUGCHAR_NB_RUN``, so it trains a fresh run (the no-run path) into a temp
folder; its kernel's ``TMPDIR`` points into this test's temp folder, which lets 02 and 03 load that same run (the
``REPLUGCHAR_NB_RUN`` path) instead of training two more. Notebook 02 runs with one extra cell appended that
hands its calibration results back (``application/json``), so the test checks the fit itself: λ from the grid,
finite gains, the plotted λ curve agreeing with ``calibration.fit``. Notebook 03 runs through
``scripts/make_readme_figure.py``, which must save the main figure where it is told, and must reach the tour of the
dialogue term. The committed notebooks carry no outputs.
"""

from __future__ import annotations

import importlib.util
import math
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


def execute(name: str, env: dict[str, str], extra_cells: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, if a cell fails
    return nb


def outputs(nb: nbformat.NotebookNode) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def check_ran(nb: nbformat.NotebookNode, min_figures: int = 1) -> None:
    errors = [out for out in outputs(nb) if out.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    images = [out for out in outputs(nb) if "image/png" in out.get("data", {})]
    assert len(images) >= min_figures, (
        f"the notebook drew {len(images)} figures, expected {min_figures} or more"
    )


# Appended to notebook 02: its fitted calibrations, grid and plotted λ curves, as JSON (non-finite numbers as
# strings, so that a NaN cannot pass for a number).
SUMMARY_02 = """
import math as _math
from dataclasses import asdict as _asdict

from IPython.display import display as _display


def _num(x):
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, (tuple, list, np.ndarray)):
        return [_num(v) for v in x]
    return float(x) if _math.isfinite(float(x)) else repr(float(x))


_display({"application/json": {
    "grid": _num(grid),
    "scales": _num(calibration.DIALOGUE_SCALES),
    "alpha": _num(alpha),
    "n_val": len(dm.val_examples),
    "fitted": {m: {f: _num(v) for f, v in _asdict(c).items()} for m, c in fitted.items()},
    "joint": {m: {f: _num(v) for f, v in _asdict(c).items()} for m, c in joint.items()},
    "nll_all": {m: _num(curve["nll all"]) for m, curve in curves.items()},
}}, raw=True)
"""


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


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
    env = kernel_env(tmp_path, REPLUGCHAR_NB_RUN=str(run))
    nb = execute("02_generality_priors", env, extra_cells=(SUMMARY_02,))
    check_ran(nb)
    summary = nb.cells[-1].outputs[-1]["data"]["application/json"]
    grid, scales = summary["grid"], summary["scales"]
    assert summary["n_val"] > 0 and grid and all(map(finite, grid))
    assert summary["alpha"] in scales, f"dialogue scale {summary['alpha']} is not one of {scales}"
    assert set(summary["fitted"]) == {"lm_utility", "llm_judge", "import"}
    for method, fit in summary["fitted"].items():
        where = f"{method}: {fit}"
        assert fit["prior_weight"] in grid, f"fitted λ not in the grid: {where}"
        assert fit["dialogue_scale"] == summary["alpha"], where  # the λ curves hold α at α₀
        assert fit["threshold"] is None or finite(fit["threshold"]), where
        assert all(map(finite, (fit["gain_at_zero"], fit["gain_fitted_weight"], fit["gain_fitted"]))), where
        assert len(fit["gains_by_weight"]) == len(grid) and all(map(finite, fit["gains_by_weight"])), where
        assert fit["gain_fitted_weight"] == pytest.approx(max(fit["gains_by_weight"]), abs=1e-9), where
        assert fit["gain_fitted"] >= fit["gain_fitted_weight"] - 1e-12, f"τ made validation worse: {where}"
        assert fit["n_examples"] == summary["n_val"], where
        # the plotted "all queries" NLL curve is the same computation as the fit: its minimum is at the fitted λ
        curve = summary["nll_all"][method]
        assert len(curve) == len(grid) and all(map(finite, curve)), f"{method}: NLL curve {curve}"
        assert curve[grid.index(fit["prior_weight"])] == pytest.approx(min(curve), abs=1e-9), where
        joint = summary["joint"][method]
        assert joint["prior_weight"] in grid and joint["dialogue_scale"] in scales, f"{method}: {joint}"
        # the joint search over (α, λ) contains (α₀, λ): it cannot do worse on validation
        assert joint["gain_fitted_weight"] >= fit["gain_fitted_weight"] - 1e-12, f"{method}: {joint} vs {fit}"


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
    # the main figure, Δ NLL per greeting, and the tour of the dialogue term: weights, example turns, NLL
    check_ran(nb, min_figures=5)
    text = "".join(out.get("text", "") for out in outputs(nb) if out.output_type == "stream")
    assert "scored turns with the character's own earlier turns" in text, (
        "the tour of the dialogue term did not run"
    )
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
