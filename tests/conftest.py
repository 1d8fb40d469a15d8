"""Shared pytest setup: quiet CPU-only TensorFlow, the ``tf`` marker, saved Keras models."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# TensorFlow and triton (which torch's compiler and exporter load) each bring their
# own LLVM, and triton loaded after TensorFlow crashes the process: load it first, as
# onnxcam.exporter.frontends.keras.load_triton_first does (importing that module here
# would load the exporter into every run).
if "tensorflow" not in sys.modules:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: nothing to protect against
        pass

# Pillow's Image.open as it is before any test module loads: importing ultralytics
# swaps in a wrapper that tries to pip-install a HEIF plugin on any file Pillow cannot
# identify, which would leak into every later test of bad image bytes.
from PIL import Image  # noqa: E402

_PILLOW_OPEN = Image.open


@pytest.fixture(autouse=True)
def _pristine_pillow_open() -> None:
    Image.open = _PILLOW_OPEN


_WORKER_REDIS: list[Any] = []


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``), each worker process its own redis-server: the
    worker tests number their databases by module, and two modules of one number run
    at once in two processes would empty each other's queues. Started first, so that
    it is over a minute old by the time most tests use it (``service.redis_url``)."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if not os.environ.get("PYTEST_XDIST_WORKER") or "REDIS_TEST_PORT" in os.environ \
            or binary is None:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _WORKER_REDIS.append(subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.05)
    os.environ["REDIS_TEST_PORT"] = str(port)


def pytest_unconfigure(config: pytest.Config) -> None:
    for process in _WORKER_REDIS:
        process.terminate()
        process.wait(10)


_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)  # so tests can ``import models`` under any import mode

_TF_ERROR: list[str] = []


def _tf_missing() -> str | None:
    """Why ``import tensorflow`` fails, or None when it works (tried once)."""
    if not _TF_ERROR:
        try:
            importlib.import_module("tensorflow")
            _TF_ERROR.append("")
        except Exception as exc:  # ImportError, or a broken install
            _TF_ERROR.append(f"tensorflow not importable: {exc}")
    return _TF_ERROR[0] or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tf_items = [item for item in items if item.get_closest_marker("tf")]
    if not tf_items:
        return
    reason = _tf_missing()
    if reason:
        for item in tf_items:
            item.add_marker(pytest.mark.skip(reason=reason))


def _save(factory: pytest.TempPathFactory, build: Callable[[], Any], name: str) -> Path:
    pytest.importorskip("tensorflow")
    path = factory.mktemp("keras_models") / f"{name}.keras"
    build().save(path)
    return path


@pytest.fixture(scope="session")
def mnist_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models.mnist_cnn`` (Sequential, 28x28x1, 10 classes) saved as .keras."""
    from models import mnist_cnn

    return _save(tmp_path_factory, mnist_cnn, "mnist_cnn")


@pytest.fixture(scope="session")
def vgg_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models.vgg_like`` (functional, 32x32x3, 6 classes) saved as .keras."""
    from models import vgg_like

    return _save(tmp_path_factory, vgg_like, "vgg_like")


@pytest.fixture(scope="session")
def residual_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models.residual_bn`` (functional with BN, 32x32x3, 5 classes) saved as .keras."""
    from models import residual_bn

    return _save(tmp_path_factory, residual_bn, "residual_bn")


@pytest.fixture(scope="session")
def nested_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models.nested_transfer`` (functional ``base`` inside a functional head) as .keras."""
    from models import nested_transfer

    return _save(tmp_path_factory, nested_transfer, "nested_transfer")


@pytest.fixture(scope="session")
def cnn_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models.onnx_cnn`` (NCHW, softmax head, 5 classes) saved as .onnx, once."""
    import onnx
    from models import onnx_cnn

    path = tmp_path_factory.mktemp("cnn") / "onnx_cnn.onnx"
    onnx.save(onnx_cnn(), str(path))
    return path


@pytest.fixture(scope="session")
def cnn_bundle(cnn_source: Path) -> Path:
    """``cnn_source`` exported once, verified, analytic, ``unit`` preprocessing and
    ``models.CNN_LABELS``: the bundle most engine, CLI, service and audit tests share.
    Read it; never write next to it."""
    from models import CNN_LABELS

    from onnxcam.exporter import export

    out = cnn_source.parent / "cnn.cam.onnx"
    assert export(cnn_source, out, labels=CNN_LABELS).info.gradient == "analytic"
    return out
