"""No project code outside tests can turn received bytes into code: an AST scan of every source
directory for pickle-family modules and loaders, `torch.load`, `numpy.load(allow_pickle=True)` and
`eval`/`exec`. The scanner is itself tested on snippets, so that this test can fail."""

import ast
import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ["shardmesh", "router", "stage_server", "expert_server", "bench", "scripts"]
SKIPPED_PARTS = {"v1"}  # generated protobuf code (checked fresh by test_protos_fresh.py)
# Modules whose whole purpose is (un)pickling or running serialized code.
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve",
                     "pickletools", "copyreg"}
FORBIDDEN_BUILTINS = {"eval", "exec"}


def _dotted(node: ast.AST) -> str:
    """"torch.load" for the expression torch.load; "" for anything not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _allow_pickle_true(call: ast.Call) -> bool:
    for keyword in call.keywords:
        if keyword.arg == "allow_pickle":
            return not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
    return False


def findings(source: str, filename: str = "<snippet>") -> list[str]:
    """'file:line: what' for every use of a forbidden loader in `source`."""
    tree = ast.parse(source, filename)
    numpy_names = {"numpy", "np"}
    torch_names = {"torch"}
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.partition(".")[0]
                if root in FORBIDDEN_MODULES:
                    found.append(f"{where}: import {alias.name}")
                if root == "numpy":
                    numpy_names.add(alias.asname or alias.name)
                if root == "torch":
                    torch_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").partition(".")[0]
            names = {alias.name for alias in node.names}
            if root in FORBIDDEN_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            elif root == "torch" and ({"load", "serialization"} & names or node.module == "torch.serialization"):
                found.append(f"{where}: from {node.module} import {sorted(names)}")
            elif root == "numpy" and "load" in names:
                found.append(f"{where}: from numpy import load (allow_pickle cannot be checked)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, tail = name.rpartition(".")
            if name in FORBIDDEN_BUILTINS or name in {f"builtins.{b}" for b in FORBIDDEN_BUILTINS}:
                found.append(f"{where}: {name}(...)")
            elif name == "__import__" or (name == "getattr" and node.args and _dotted(node.args[0]) == "builtins"):
                found.append(f"{where}: {name}(...) (dynamic import or builtin lookup)")
            elif tail == "load" and head in torch_names:
                found.append(f"{where}: {name}(...) (pickle underneath)")
            elif tail == "load" and head in numpy_names and _allow_pickle_true(node):
                found.append(f"{where}: {name}(..., allow_pickle=True)")
            elif tail in {"loads", "load", "Unpickler"} and head.partition(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{where}: {name}(...)")
    return found


def project_files() -> list[pathlib.Path]:
    files = []
    for directory in SCANNED:
        base = ROOT / directory
        if base.is_dir():
            files += [p for p in sorted(base.rglob("*.py")) if not SKIPPED_PARTS & set(p.relative_to(base).parts)]
    return files


def test_project_code_has_no_pickle_or_eval():
    files = project_files()
    assert len(files) > 30 and any(p.name == "grpc_util.py" for p in files)  # the scan sees the project
    found = [f for path in files for f in findings(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


FORBIDDEN_SNIPPETS = [
    "import pickle\npickle.loads(data)",
    "import pickle as p\np.load(f)",
    "from pickle import loads\nloads(b)",
    "import _pickle",
    "import cloudpickle",
    "import dill",
    "import joblib\njoblib.load('x')",
    "import marshal",
    "import torch\ntorch.load('w.pt')",
    "import torch\ntorch.load('w.pt', weights_only=True)",
    "import torch as t\nt.load(buffer)",
    "from torch import load",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.load(f, allow_pickle=flag)",
    "from numpy import load",
    "eval(request.text)",
    "exec(payload)",
    "import builtins\nbuiltins.eval(s)",
    "__import__('os')",
]
ALLOWED_SNIPPETS = [
    "model.eval()",                                     # torch's eval mode, not the builtin
    "import numpy as np\nnp.load('x.npy')",            # allow_pickle defaults to False
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import json\njson.loads(text)",
    "from safetensors import safe_open",
    "text = 'pickle.loads is forbidden'",               # words, not calls
]


@pytest.mark.parametrize("snippet", FORBIDDEN_SNIPPETS)
def test_scanner_finds(snippet):
    assert findings(textwrap.dedent(snippet)), snippet


@pytest.mark.parametrize("snippet", ALLOWED_SNIPPETS)
def test_scanner_allows(snippet):
    assert findings(textwrap.dedent(snippet)) == [], snippet
