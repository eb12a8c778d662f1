"""Safe deserialisation audit: nothing under backend/ or seggpt_model/ can unpickle data.

Redis values, webhook bodies, prompt packs and checkpoints all come from outside the
process; pickle (and everything built on it) would turn any of them into code execution.
The scan reads the source (AST, not grep, so strings and comments do not count) and
fails on: importing pickle-like modules, ``torch.load`` without ``weights_only=True``,
``np.load``/``numpy.load`` with ``allow_pickle`` set, ``yaml.load``/``yaml.unsafe_load``/
``yaml.full_load`` (``safe_load`` is fine), ``pandas.read_pickle``, ``torch.jit.load``,
``marshal.loads``, and RQ queues, workers or job reads without the JSON serializer (RQ
pickles job data by default, and its workers unpickle whatever is in Redis).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "seggpt_model")
RQ_PICKLERS = {"Queue", "Worker", "SimpleWorker", "SpawnWorker", "fetch", "fetch_many", "create"}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Each unsafe import or call in ``source`` as ``file:line: what``."""
    found = []
    rq_names = {a.asname or a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)
                and (n.module or "").split(".")[0] == "rq" for a in n.names}

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            report(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") or name == "load" and _imported_from(source, "torch", "load"):
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    report(node, f"{name}() without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")) and "allow_pickle" in keywords:
                value = keywords["allow_pickle"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    report(node, f"{name}(allow_pickle=...)")
            elif name.split(".")[0] in rq_names and name.split(".")[-1] in RQ_PICKLERS:
                serializer = keywords.get("serializer")
                if not (isinstance(serializer, ast.Name | ast.Attribute) and "JSON" in _dotted(serializer)):
                    report(node, f"{name}() without serializer=JSONSerializer")
            elif name.endswith(("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                                "yaml.unsafe_load_all", "read_pickle", "jit.load", "marshal.loads")):
                report(node, f"{name}()")
    return found


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _imported_from(source: str, module: str, name: str) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == module and any(a.name == name for a in n.names)
               for n in ast.walk(ast.parse(source)))


def test_no_unsafe_deserialisation_in_the_packages() -> None:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 10 and any(p.name == "weights.py" for p in files)
    problems = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))]
    assert problems == []


def test_rq_jobs_travel_as_json() -> None:
    """The queue and the worker both name the JSON serializer (checked by the scan above)."""
    for module in ("jobs.py", "worker.py"):
        source = (ROOT / "backend" / module).read_text()
        assert "serializer=JSONSerializer" in source and unsafe_calls(source) == [], module


def test_torch_checkpoints_are_read_with_weights_only() -> None:
    """The one torch.load there is must stay restricted to tensors."""
    source = (ROOT / "seggpt_model" / "weights.py").read_text()
    assert "torch.load(" in source and unsafe_calls(source) == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(b'')",
    "from pickle import loads",
    "import joblib",
    "import dill as d",
    "import torch\ntorch.load('x.pth')",
    "import torch\ntorch.load('x.pth', weights_only=False)",
    "import torch\nflag = True\ntorch.load('x.pth', weights_only=flag)",
    "from torch import load\nload('x.pth')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.unsafe_load(text)",
    "import pandas as pd\npd.read_pickle('x')",
    "import torch\ntorch.jit.load('m.pt')",
    "from rq import Queue\nQueue('q', connection=r)",
    "from rq import Worker\nWorker([q], connection=r)",
    "from rq.job import Job\nJob.fetch('id', connection=r)",
    "from rq import Queue\nfrom rq.serializers import DefaultSerializer\nQueue('q', serializer=DefaultSerializer)",
])
def test_the_audit_catches_each_unsafe_form(snippet: str) -> None:
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pth', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(text)",
    "text = 'import pickle'  # a string, not an import",
    "from safetensors.torch import load_file\nload_file('x.safetensors')",
    "from rq import Queue\nfrom rq.serializers import JSONSerializer\nQueue('q', serializer=JSONSerializer)",
    "from queue import Queue\nQueue()",
])
def test_the_audit_lets_safe_forms_pass(snippet: str) -> None:
    assert unsafe_calls(snippet) == []
