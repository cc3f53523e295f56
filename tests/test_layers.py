"""The package's layering, read from the source by folder: every module sits in a layer folder, imports only from
its own layer and the ones below (with the few narrowings of ``NARROWED``), no import cycle, nothing imports the
CLI, Lightning stays in training and the CLI, and a RAG user's imports load no Lightning."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "replugchar"
LAYERS = ("core", "lm", "retrieval", "training", "evaluation", "cli")
"""Bottom to top: a module may import from its own layer and from the layers below it, unless NARROWED says not."""
NARROWED = {
    # (importer layer, imported layer): (the only modules of it the importer may use, why)
    ("retrieval", "lm"): (
        {"replugchar.lm.likelihood"},
        "serving needs the prompt template (retriever.json, REPLUG decoding), not LM loading, caches or gains",
    ),
    ("evaluation", "training"): (
        set(),
        "evaluation reads exported retrievers and LM folders (lm.finetuned), never the code that trained them",
    ),
}
LIGHTNING = ("lightning", "pytorch_lightning", "torchmetrics")
LIGHTNING_LAYERS = {"training", "cli"}
"""Only these layers may import Lightning: the schema, the LM, serving and evaluation run without it."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package (a package by its ``__init__``) -> (file, parsed source)."""
    return {module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PKG.rglob("*.py"))}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imported(module: str, is_package: bool, node: ast.AST, known: set[str]) -> set[str]:
    """The replugchar modules an import statement names (relative or absolute; ``from . import x`` is module x)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "replugchar"}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "replugchar":
        return set()
    return {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}


def package_imports() -> dict[str, set[str]]:
    """module -> the replugchar modules it imports, at any depth of its code (lazy imports count)."""
    found = sources()
    known = set(found)
    graph = {}
    for module, (path, tree) in found.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(tree):
            deps |= _imported(module, is_package, node, known)
        graph[module] = deps - {module}
    return graph


def third_party_imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_every_module_is_in_a_layer_folder():
    stray = [m for m in sources() if m != "replugchar" and layer(m) not in LAYERS]
    assert stray == [], f"modules outside the layer folders {LAYERS}: {stray}"


def test_the_top_level_api_is_lazy_and_resolves():
    """``replugchar/__init__.py`` is outside the layers: it may name the package's modules only for type checkers
    (its ``_API`` map imports on attribute access), and every public name must resolve."""
    _, tree = sources()["replugchar"]
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        assert not _imported("replugchar", True, node, set()), (
            f"line {node.lineno}: eager import of the package"
        )
    import replugchar

    assert set(replugchar.__all__) == set(replugchar._API)
    for name in replugchar.__all__:
        assert getattr(replugchar, name) is not None, name


def test_imports_follow_the_layer_order():
    graph = package_imports()
    wrong = []
    for module, deps in sorted(graph.items()):
        if module == "replugchar":
            continue
        for dep in sorted(deps):
            mine, theirs = layer(module), layer(dep)
            if theirs is None:
                wrong.append(f"{module} -> {dep} (the lazy public API; import the module itself)")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module} -> {dep} ({mine} sits below {theirs})")
            elif (mine, theirs) in NARROWED and dep not in NARROWED[mine, theirs][0]:
                wrong.append(f"{module} -> {dep} ({NARROWED[mine, theirs][1]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = package_imports()
    graph.pop("replugchar")  # the lazy API imports on attribute access only (checked above)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_nothing_below_the_cli_imports_it():
    graph = package_imports()
    importers = {m for m, deps in graph.items() if layer(m) != "cli" and any(layer(d) == "cli" for d in deps)}
    assert importers == set()


def test_lightning_stays_in_training_and_the_cli():
    users = {
        module
        for module, (_, tree) in sources().items()
        if layer(module) not in LIGHTNING_LAYERS and third_party_imports(tree) & set(LIGHTNING)
    }
    assert users == set()


def test_data_serving_and_evaluation_load_no_lightning():
    """What a RAG user or an evaluation imports, in a fresh interpreter: no Lightning in ``sys.modules``."""
    modules = [
        "replugchar.core.data",
        "replugchar.core.scoring",
        "replugchar.lm.likelihood",
        "replugchar.lm.loglik_cache",
        "replugchar.retrieval.retriever",
        "replugchar.retrieval.export",
        "replugchar.evaluation.evaluate",
        "replugchar.evaluation.teacher_report",
    ]
    if importlib.util.find_spec("langchain_core") is not None:
        modules.append("replugchar.retrieval.langchain")
    code = (
        f"import sys; import {', '.join(modules)}; "
        f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & {set(LIGHTNING)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout


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
