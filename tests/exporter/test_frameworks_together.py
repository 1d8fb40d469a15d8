"""TensorFlow and torch in one process: a Keras conversion, then torch's exporter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf, pytest.mark.torch]

SCRIPT = """
from onnxcam.exporter.frontends.keras import _import_tf
_import_tf()
import torch._dynamo  # loads triton, as torch.onnx.export does
print("alive")
"""


@pytest.mark.slow
def test_torch_after_tensorflow_does_not_crash() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    shown = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                           timeout=240)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip() == "alive"
