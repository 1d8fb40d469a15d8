"""The package's shape: one import name, and layers that only point down.

Layers, lowest first (an arrow reads "may import"):

    onnxcam (errors, bundle, graph, runtime, files, layout, progress, scores)   the floor
    onnxcam.exporter            -> floor                     never the worker side
    onnxcam.worker (the engine) -> floor                     never service, audit, exporter
    onnxcam.worker.service      -> engine, floor             never the audit
    onnxcam.worker.audit        -> service, engine, floor
    onnxcam.cli, onnxcam        -> everything (the command line, and the public API)

Imports inside functions count too: a cycle broken only by a lazy import is still a
cycle. The worker side never imports TensorFlow or torch, lazily or not.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
# Installed package -> folder in the repository (pyproject's package-dir).
ROOTS = {"onnxcam": REPO / "onnxcam", "onnxcam.exporter": REPO / "exporter",
         "onnxcam.worker": REPO / "worker"}
FRAMEWORKS = ("tensorflow", "keras", "tf2onnx", "torch", "torchvision")
FLOOR = ("onnxcam.errors", "onnxcam.bundle", "onnxcam.graph", "onnxcam.runtime",
         "onnxcam.files", "onnxcam.layout", "onnxcam.progress", "onnxcam.scores")


def source_modules() -> dict[str, Path]:
    """Every module of the installed package, by its dotted name."""
    modules: dict[str, Path] = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            if package == "onnxcam" and parts and parts[0] in ("exporter", "worker"):
                continue
            modules[".".join([package, *parts])] = path
    return modules


def imported(path: Path, module: str) -> set[str]:
    """Every module name ``path`` imports, at any depth, relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0] if path.name != "__init__.py" \
                    or node.level > 1 else module
                base = f"{package}.{base}" if base else package
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer_of(module: str) -> str:
    for prefix in ("onnxcam.worker.service", "onnxcam.worker.audit", "onnxcam.worker",
                   "onnxcam.exporter", "onnxcam.cli", "onnxcam.__main__"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    # The package itself is the public façade: it names the API of every layer (lazily).
    return "floor" if module in FLOOR else module


FORBIDDEN = {
    "floor": ("onnxcam.exporter", "onnxcam.worker", "onnxcam.cli", *FRAMEWORKS),
    "onnxcam.exporter": ("onnxcam.worker", "onnxcam.cli"),
    "onnxcam.worker": ("onnxcam.worker.service", "onnxcam.worker.audit", "onnxcam.exporter",
                       "onnxcam.cli", *FRAMEWORKS),
    "onnxcam.worker.service": ("onnxcam.worker.audit", "onnxcam.exporter", "onnxcam.cli",
                               *FRAMEWORKS),
    "onnxcam.worker.audit": ("onnxcam.exporter", "onnxcam.cli", *FRAMEWORKS),
}


def violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for module, path in sorted(modules.items()):
        banned = FORBIDDEN.get(layer_of(module), ())
        for name in sorted(imported(path, module)):
            if any(name == b or name.startswith(b + ".") for b in banned):
                found.append(f"{module} imports {name}")
    return found


def test_every_module_is_found() -> None:
    modules = source_modules()
    assert {"onnxcam.cli", "onnxcam.bundle", "onnxcam.exporter.pipeline",
            "onnxcam.worker.service.tasks", "onnxcam.worker.audit.runner"} <= set(modules)
    assert not [m for m in modules if m.startswith(("worker", "exporter"))]


def test_layers_only_point_down() -> None:
    assert violations(source_modules()) == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """Mutation: an engine module that imports the service (even lazily) is caught."""
    leaky = tmp_path / "maps.py"
    leaky.write_text("def f():\n    from onnxcam.worker.service.store import Store\n")
    relative = tmp_path / "engine_bit.py"
    relative.write_text("from .service import jobs\n")
    assert violations({"onnxcam.worker.maps": leaky, "onnxcam.worker.bit": relative}) == [
        "onnxcam.worker.bit imports onnxcam.worker.service",
        "onnxcam.worker.bit imports onnxcam.worker.service.jobs",
        "onnxcam.worker.maps imports onnxcam.worker.service.store",
        "onnxcam.worker.maps imports onnxcam.worker.service.store.Store",
    ]


def test_source_code_uses_the_one_import_name() -> None:
    """No file imports the folders by their repository names."""
    offenders = []
    for folder in ("onnxcam", "exporter", "worker", "tests", "bench", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            for name in imported(path, "x"):
                if name.split(".")[0] in ("worker", "exporter"):
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert offenders == []


def test_pyproject_lists_every_package_under_its_folder() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {name: REPO / folder for name, folder in config["package-dir"].items()}
    assert mapping == ROOTS
    on_disk = {module for module, path in source_modules().items()
               if path.name == "__init__.py"}
    assert sorted(config["packages"]) == sorted(on_disk)


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    for name in ("onnxcam", "exporter", "worker"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(source), "-w", str(tmp_path)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("onnxcam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(
        ".dist-info")}
    assert tops == {"onnxcam"}
    assert "onnxcam/worker/service/tasks.py" in names
    assert "onnxcam/exporter/pipeline.py" in names
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["onnxcam"]


def test_serving_imports_load_no_framework() -> None:
    """The worker's and the audit's import paths, and the CLI's, stay free of TF and torch."""
    code = ("import sys, onnxcam, onnxcam.worker, onnxcam.worker.service.tasks, "
            "onnxcam.worker.audit, onnxcam.cli; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO.parent)
    assert shown.stdout.strip() == "[]"


def test_the_package_imports_nothing_heavy_until_asked() -> None:
    code = ("import sys, onnxcam; print(sorted(m for m in sys.modules if m.startswith("
            "('onnxcam.', 'onnxruntime', 'PIL', 'celery'))))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO.parent)
    assert shown.stdout.strip() == "[]"
