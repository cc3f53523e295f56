"""No code execution from data: no pickle, no eval/exec, no remote code, weights only as safetensors."""

from __future__ import annotations

import ast
import inspect
import zipfile

import pytest
from conftest import REPO

from replugchar.lm.loglik_cache import LikelihoodOptions

pytestmark = pytest.mark.usefixtures("rc_cache")

PACKAGE = REPO / "replugchar"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_WEIGHT_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_constructs(source: str, filename: str = "<src>") -> list[str]:
    """Where ``source`` could run code hidden in data (syntax tree, so docstrings and ``.eval()`` don't count)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "torch"
                and "load" in {a.name for a in node.names}
            ):
                found.append(f"{where}: from torch import load (call torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            func, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
            if func in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where}: {func}()")
            if func.endswith("torch.load") and not _is_true(kw.get("weights_only")):
                found.append(f"{where}: {func}() without weights_only=True")
            if func in ("np.load", "numpy.load") and _is_true(kw.get("allow_pickle")):
                found.append(f"{where}: {func}(allow_pickle=True)")
            if func in (
                "yaml.load",
                "yaml.unsafe_load",
                "yaml.full_load",
                "pd.read_pickle",
                "pandas.read_pickle",
            ):
                found.append(f"{where}: {func}()")
            if _is_true(kw.get("trust_remote_code")):
                found.append(f"{where}: {func}(trust_remote_code=True)")
            if _is_true(kw.get("shell")):
                found.append(f"{where}: {func}(shell=True)")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and not (
                    isinstance(default, ast.Constant) and default.value is False
                ):
                    found.append(f"{where}: {node.name}(trust_remote_code=...) does not default to False")
    return found


def test_scanner_finds_what_it_looks_for():
    bad = """
import pickle
from cloudpickle import loads
import torch, numpy as np, yaml, subprocess
def f(path, trust_remote_code=True):
    eval("1")
    exec("x = 1")
    torch.load(path)
    torch.load(path, weights_only=False)
    np.load(path, allow_pickle=True)
    yaml.load(open(path))
    AutoModel.from_pretrained(path, trust_remote_code=True)
    subprocess.run("ls", shell=True)
"""
    assert len(unsafe_constructs(bad + "from torch import load\n")) == 12
    good = '''
"""Standard formats, no pickle: eval() and exec() are not called here."""
import torch
def g(model, path, *, trust_remote_code: bool = False):
    model.eval()
    return torch.load(path, map_location="cpu", weights_only=True)
'''
    assert unsafe_constructs(good) == []


def test_package_sources_have_no_unsafe_constructs():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 10  # the scan really covers the package
    found = [
        hit for path in sources for hit in unsafe_constructs(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert found == []


def test_trust_remote_code_defaults_to_false():
    from replugchar.lm.loglik_cache import LikelihoodOptions
    from replugchar.lm.models import LMOptions, load_causal_lm, load_encoder
    from replugchar.training.finetune import CharacterLMModule
    from replugchar.training.module import LSRModule

    for fn in (load_encoder, load_causal_lm):
        param = inspect.signature(fn).parameters["trust_remote_code"]
        assert param.default is False, fn.__qualname__
    # fit's and finetune-lm's LM options (model.lm.trust_remote_code), and the modules' defaults of them
    assert LMOptions().trust_remote_code is False and LikelihoodOptions().trust_remote_code is False
    for module in (LSRModule, CharacterLMModule):
        assert inspect.signature(module.__init__).parameters["lm"].default.trust_remote_code is False


def test_export_holds_safetensors_only_and_no_frozen_lm(tmp_path):
    from sentence_transformers import SentenceTransformer

    from replugchar.core.data import Character
    from replugchar.retrieval.export import export_retriever
    from replugchar.training.module import LSRModule

    module = LSRModule(encoder="tiny:bert", lm=LikelihoodOptions(name="tiny:gpt2", loglik_cache_dir=None))
    module.characters = {
        "c1": Character("c1", ("I bake bread.", "I have a cat.")),
        "c2": Character("c2", ("I sail.",)),
    }
    assert module.likelihood is not None  # the frozen LM is loaded ...
    keys = list(module.state_dict())
    # ... but never part of the checkpoint: the encoder and the dialogue head's few weights only
    assert keys and all(k.startswith(("encoder.", "head.")) for k in keys)
    assert "lm_model" not in module.hparams and module.hparams.lm["trust_remote_code"] is False

    out = export_retriever(module, tmp_path / "export")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in (out / "encoder").rglob("*"))
    assert [p.name for p in files if p.suffix in UNSAFE_WEIGHT_SUFFIXES] == []
    assert {p.name for p in out.iterdir()} >= {"encoder", "index.faiss", "settings.jsonl", "index.json"}
    for path in files:  # no pickle stream (protocol 2+ starts with 0x80), no torch.save zip (holds data.pkl)
        assert path.read_bytes()[:1] != b"\x80", path
        if zipfile.is_zipfile(path):
            assert not [n for n in zipfile.ZipFile(path).namelist() if n.endswith(".pkl")], path
    # and it loads back without running repository code
    encoder = SentenceTransformer(str(out / "encoder"), device="cpu", trust_remote_code=False)
    assert encoder.encode(["hi"]).shape == (1, 32)
