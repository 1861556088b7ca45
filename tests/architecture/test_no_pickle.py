"""No pickle is ever loaded: an AST scan of every package (and bench/) for the ways Python unpickles.

Unpickling runs code chosen by whoever wrote the file, so a bundle, checkpoint or message that reached us
through pickle would hand a station to its author. Flagged, each naming file:line:
  - importing pickle, cPickle, _pickle, cloudpickle, dill, marshal, shelve (any use at all);
  - joblib.load, pandas.read_pickle / DataFrame.read_pickle;
  - torch.load without weights_only=True;
  - numpy.load unless allow_pickle=False is given explicitly (the default has changed before);
  - yaml.load without a Safe loader, yaml.unsafe_load, yaml.full_load.
Aliases are followed (`import numpy as np`, `from numpy import load as npl`, `from torch import load`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("m3dm", "protocol", "core", "edge", "trainer", "deploy", "collector", "bench")
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the module (function-level imports too)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:  # import os.path as osp: osp -> os.path
                    names[alias.asname] = alias.name
                else:  # import os.path binds os
                    root = alias.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> "numpy.load" through the import aliases; None for anything but a name/attribute chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _call_problem(call: ast.Call, target: str) -> str | None:  # noqa: C901 - one branch per loader
    if target in ("joblib.load", "pandas.read_pickle") or target.endswith(".read_pickle"):
        return f"{target} unpickles"
    if target == "torch.load" and not _is_const(_keyword(call, "weights_only"), True):
        return "torch.load without weights_only=True"
    if target == "numpy.load" and not _is_const(_keyword(call, "allow_pickle"), False):
        return "numpy.load without allow_pickle=False"
    if target in ("yaml.unsafe_load", "yaml.full_load"):
        return f"{target} constructs arbitrary objects"
    if target == "yaml.load":
        loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        loader_name = None
        if isinstance(loader, ast.Attribute):
            loader_name = loader.attr
        elif isinstance(loader, ast.Name):
            loader_name = loader.id.split(".")[-1]
        if loader_name not in SAFE_YAML_LOADERS:
            return "yaml.load without a Safe loader"
    return None


def problems_in_source(source: str, filename: str) -> list[str]:
    """Every unpickling hazard in one module's source, as "file:line: what"."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for module in modules:
            if module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{filename}:{node.lineno}: imports {module}")
                break
        if isinstance(node, ast.ImportFrom) and node.module == "joblib":
            if any(a.name == "load" for a in node.names):
                found.append(f"{filename}:{node.lineno}: imports joblib.load")
        if isinstance(node, ast.Call):
            target = _dotted(node.func, aliases)
            problem = None if target is None else _call_problem(node, target)
            if problem:
                found.append(f"{filename}:{node.lineno}: {problem}")
    return found


def _python_files() -> list[Path]:
    return [path for package in SCANNED for path in sorted((REPO / package).rglob("*.py"))]


def test_no_code_loads_a_pickle() -> None:
    files = _python_files()
    assert len(files) > 50, "the scan found suspiciously few files; is REPO right?"
    found = []
    for path in files:
        found += problems_in_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not found, "pickle-capable loading found:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import _pickle as p",
        "from dill import loads",
        "import marshal",
        "import shelve",
        "from joblib import load",
        "import joblib\njoblib.load('m.joblib')",
        "import torch\ntorch.load('m.pt')",
        "import torch\ntorch.load('m.pt', weights_only=False)",
        "from torch import load\nload('m.pt', map_location='cpu')",
        "import numpy as np\nnp.load('a.npy')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "from numpy import load as npl\nnpl('a.npz')",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import pandas as pd\npd.read_pickle('f')",
        "def f():\n    import numpy\n    return numpy.load('x')",
    ],
)
def test_the_scanner_flags_each_hazard(source: str) -> None:
    assert problems_in_source(source, "snippet.py"), source


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np\nnp.load('a.npy', allow_pickle=False)",
        "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(text)",
        "import json\njson.load(f)",
        "import onnx\nonnx.load('m.onnx')",
        "from safetensors.numpy import load_file\nload_file('w.safetensors')",
    ],
)
def test_the_scanner_passes_safe_loading(source: str) -> None:
    assert problems_in_source(source, "snippet.py") == [], source
