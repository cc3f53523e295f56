"""The package's layering, read from the source: no import cycle, nothing below the CLI imports it, evaluation and
inference never reach the training module, and ``replugchar --help`` loads no heavy library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "replugchar"
ENTRY = {"cli", "__init__"}  # the entry point, and the lazy public API (imports on attribute access only)


def package_imports() -> dict[str, set[str]]:
    """module -> the replugchar modules it imports, at any depth of its code (lazy imports count)."""
    graph = {}
    for path in PKG.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import calibration, priors
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("replugchar."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps & {p.stem for p in PKG.glob("*.py")}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_nothing_below_the_cli_imports_it():
    graph = package_imports()
    assert {m for m, deps in graph.items() if "cli" in deps} == set()


def test_no_import_cycle():
    graph = package_imports()
    for module in graph:
        if module in ENTRY:
            continue
        assert module not in reachable(graph, module), f"{module} imports itself through {graph[module]}"


def test_evaluation_and_inference_never_reach_the_training_module():
    graph = package_imports()
    for module in (
        "evaluate",
        "metrics",
        "retriever",
        "scoring",
        "chat",
        "langchain",
        "index",
        "teacher_report",
    ):
        assert "module" not in reachable(graph, module) | {module}, module
        assert "lightning_cli" not in reachable(graph, module), module


def test_help_is_fast_and_imports_no_heavy_library():
    code = (
        "import sys; from replugchar.cli import main; main(['--help']); "
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'faiss', 'sentence_transformers') "
        "if m in sys.modules]; print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "HEAVY []" in out.stdout
    for command in ("fit", "chat", "finetune-lm", "teacher-report", "evaluate", "retrieve"):
        assert f"  {command} " in out.stdout
