"""The package's shape: one tree, one import name, and layers that only point down.

Layers, lowest first (an arrow reads "may import"):

    onnxcam (errors, bundle, graph, runtime, files, layout, progress, scores, words,
             _version)
                                the floor: imports nothing above it
    onnxcam.exporter   -> floor            never the engine, worker or audit
    onnxcam.engine     -> floor            never the worker, audit or exporter
    onnxcam.worker     -> engine, floor    never the audit or the exporter
    onnxcam.audit      -> worker, engine, floor
    onnxcam.cli, onnxcam  -> everything (the command line, and the public API)

Imports inside functions and under ``TYPE_CHECKING`` count too: a cycle broken only by
a lazy import is still a cycle. The engine, the worker and the audit never import
TensorFlow or torch, lazily or not.
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
PACKAGE = REPO / "onnxcam"
FRAMEWORKS = ("tensorflow", "keras", "tf2onnx", "torch", "torchvision")
FLOOR = ("onnxcam.errors", "onnxcam.bundle", "onnxcam.graph", "onnxcam.runtime",
         "onnxcam.files", "onnxcam.layout", "onnxcam.progress", "onnxcam.scores",
         "onnxcam.words", "onnxcam._version")
LAYERS = ("onnxcam.exporter", "onnxcam.engine", "onnxcam.worker", "onnxcam.audit",
          "onnxcam.cli", "onnxcam.__main__")


def source_modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name, read from the tree as it is."""
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(REPO).with_suffix("")
        modules[".".join(p for p in relative.parts if p != "__init__")] = path
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
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    # The package itself is the public façade: it names the API of every layer (lazily).
    return "floor" if module in FLOOR else module


FORBIDDEN = {
    "floor": ("onnxcam.exporter", "onnxcam.engine", "onnxcam.worker", "onnxcam.audit",
              "onnxcam.cli", "onnxcam.__main__", *FRAMEWORKS),
    "onnxcam.exporter": ("onnxcam.engine", "onnxcam.worker", "onnxcam.audit", "onnxcam.cli"),
    "onnxcam.engine": ("onnxcam.worker", "onnxcam.audit", "onnxcam.exporter", "onnxcam.cli",
                       *FRAMEWORKS),
    "onnxcam.worker": ("onnxcam.audit", "onnxcam.exporter", "onnxcam.cli", *FRAMEWORKS),
    "onnxcam.audit": ("onnxcam.exporter", "onnxcam.cli", *FRAMEWORKS),
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
            "onnxcam.worker.tasks", "onnxcam.audit.runner"} <= set(modules)
    assert not [m for m in modules if m.startswith(("worker", "exporter"))]


def test_layers_only_point_down() -> None:
    assert violations(source_modules()) == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """Mutation: an engine module that imports the service (even lazily) is caught."""
    leaky = tmp_path / "maps.py"
    leaky.write_text("def f():\n    from onnxcam.worker.store import Store\n")
    relative = tmp_path / "engine_bit.py"
    relative.write_text("from ..worker import jobs\n")
    hinted = tmp_path / "hinted.py"
    hinted.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from onnxcam.engine.maps import flat\n")
    assert violations({"onnxcam.engine.maps": leaky, "onnxcam.engine.bit": relative,
                       "onnxcam.exporter.hinted": hinted}) == [
        "onnxcam.engine.bit imports onnxcam.worker",
        "onnxcam.engine.bit imports onnxcam.worker.jobs",
        "onnxcam.engine.maps imports onnxcam.worker.store",
        "onnxcam.engine.maps imports onnxcam.worker.store.Store",
        "onnxcam.exporter.hinted imports onnxcam.engine.maps",
        "onnxcam.exporter.hinted imports onnxcam.engine.maps.flat",
    ]


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (a package
    and the modules it re-exports are not counted: that is how packages work)."""
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {name if name in modules else name.rsplit(".", 1)[0]
                   for name in imported(path, module)}
        edges[module] = {t for t in targets if t in modules and t != module
                         and not module.startswith(t + ".") and not t.startswith(module + ".")
                         and path.name != "__init__.py"}
    cycles, seen = [], set()
    for start in sorted(edges):
        reach = _reach(edges, start)
        if start in reach and start not in seen:
            group = sorted(m for m in reach if start in _reach(edges, m))
            seen.update(group)
            cycles.append(group)
    return cycles


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    stack, reach = [start], set()
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in reach:
                reach.add(nxt)
                stack.append(nxt)
    return reach


def test_no_two_modules_import_each_other() -> None:
    assert import_cycles(source_modules()) == []


def test_the_cycle_check_catches_a_lazy_circle(tmp_path: Path) -> None:
    """Mutation: keys and store importing each other, one of them lazily, is caught."""
    keys, store = tmp_path / "keys.py", tmp_path / "store.py"
    keys.write_text("def f():\n    from onnxcam.worker.store import Store\n")
    store.write_text("from onnxcam.worker.keys import bundle_key\n")
    assert import_cycles({"onnxcam.worker.keys": keys, "onnxcam.worker.store": store}) == [
        ["onnxcam.worker.keys", "onnxcam.worker.store"]]


def test_source_code_uses_the_one_import_name() -> None:
    """Nothing installable lies outside onnxcam/, and no file imports a folder by a
    repository name of its own."""
    assert not (REPO / "exporter").exists() and not (REPO / "worker").exists()
    offenders = []
    for folder in ("onnxcam", "tests", "bench", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            for name in imported(path, "x"):
                if name.split(".")[0] in ("worker", "exporter", "engine", "audit"):
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert offenders == []


def test_pyproject_maps_no_folders() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in config
    assert config["packages"]["find"]["include"] == ["onnxcam*"]


def test_tests_mirror_the_tree() -> None:
    """Each test folder is named after a sub-package that exists."""
    for folder in (REPO / "tests").iterdir():
        if folder.is_dir() and any(folder.glob("test_*.py")):
            assert (PACKAGE / folder.name / "__init__.py").exists(), folder.name


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(PACKAGE, source / "onnxcam", ignore=shutil.ignore_patterns("__pycache__"))
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
    on_disk = {f"onnxcam/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= set(names)
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["onnxcam"]


def test_the_old_celery_app_path_still_works() -> None:
    """0.1's ``onnxcam.worker.service.app`` is the same app until 0.3, with a warning."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import onnxcam.worker.service.app\nexcept DeprecationWarning as w:\n"
            "    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\n"
            "from onnxcam.worker.service.app import app as old\n"
            "from onnxcam.worker.service.layout import bundle_key, write_error\n"
            "from onnxcam.worker.app import app\nprint(old is app)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO.parent)
    assert "warned: onnxcam.worker.service is onnxcam.worker now" in shown.stdout
    assert shown.stdout.strip().endswith("True")


def test_the_package_imports_from_the_repository_root() -> None:
    """The local folder is the package itself, so running from the root finds it all."""
    code = "from onnxcam import Explainer, export; import onnxcam.worker.tasks, onnxcam.audit"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


def test_serving_imports_load_no_framework() -> None:
    """The worker's and the audit's import paths, and the CLI's, stay free of TF and torch."""
    code = ("import sys, onnxcam, onnxcam.engine, onnxcam.worker.tasks, "
            "onnxcam.audit, onnxcam.cli; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO.parent)
    assert shown.stdout.strip() == "[]"


def test_the_package_imports_nothing_heavy_until_asked() -> None:
    code = ("import sys, onnxcam; print(sorted(m for m in sys.modules if m.startswith("
            "('onnxcam.', 'onnxruntime', 'PIL', 'celery'))))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=REPO.parent)
    assert shown.stdout.strip() == "['onnxcam._version']"
