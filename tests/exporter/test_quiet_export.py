"""``onnxcam export`` of a file whose batch cannot be freed says so in its summary and
keeps onnxruntime's failed batch-2 probe off stderr; a head whose logits ignore the
input is called out. The CLI runs as a real process: onnxruntime writes from C++,
past Python's ``sys.stderr``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from baked import reshape_model
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcam.cli import main

NOISE = ("ExecuteKernel", "[E:onnxruntime", "[W:onnxruntime")
ZERO_HEAD_WARNING = ("the logits do not depend on the input: every map will be empty; "
                     "was the head initialised?")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxcam", *args], capture_output=True,
                          text=True, timeout=120)


def test_a_batch_that_stays_fixed_is_probed_quietly_and_named(tmp_path: Path) -> None:
    """The Transpose before ``Reshape [1, -1]`` puts the batch on axis 1 (as ViT's baked
    reshapes do, it holds at batch 1 only): at batch 2 the Gemm gets 2x the features,
    so onnxruntime fails inside a kernel while the exporter probes it."""
    source = tmp_path / "fixed.onnx"
    onnx.save(reshape_model(mix=True), source)
    done = run_cli("export", str(source), "-o", str(tmp_path / "fixed.cam.onnx"),
                   "--layer", "r")
    assert done.returncode == 0, done.stderr
    assert not any(noise in done.stderr for noise in NOISE), done.stderr
    summary = done.stdout.strip()
    assert summary.startswith(f"wrote {tmp_path / 'fixed.cam.onnx'}: layer r, 5 classes")
    assert summary.endswith("; batch fixed at 1 (the graph does not run at batch size 2)")


def zero_head_model(seed: int = 0) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Conv -> Relu ("r") -> GlobalAveragePool -> Flatten -> Gemm whose
    weights are all zero: the logits are the Gemm's bias, whatever the image."""
    rng = np.random.default_rng(seed)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "g", "b"], ["y"], transB=1)],
        "zero_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(conv, "w"),
         numpy_helper.from_array(np.zeros((3, 4), np.float32), "g"),
         numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_logits_that_ignore_the_input_are_called_out(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "zero.onnx"
    onnx.save(zero_head_model(), source)
    with caplog.at_level(logging.WARNING, logger="onnxcam"):
        result = CliRunner().invoke(main, ["export", str(source), "-o",
                                           str(tmp_path / "zero.cam.onnx"), "--layer", "r"])
    assert result.exit_code == 0, result.output
    assert ZERO_HEAD_WARNING in caplog.messages
    summary = [line for line in result.output.splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1
    assert "verified, worst relative error 0.0e+00 (logits), but the logits do not depend " \
           "on the input; preprocess unit" in summary[0]


def test_live_logits_are_not_called_out(tmp_path: Path) -> None:
    source = tmp_path / "live.onnx"
    onnx.save(reshape_model(), source)  # its batch is freed: no batch note either
    result = CliRunner().invoke(main, ["export", str(source), "-o",
                                       str(tmp_path / "live.cam.onnx"), "--layer", "r"])
    assert result.exit_code == 0, result.output
    assert "depend on the input" not in result.output
    assert result.output.strip().endswith("; preprocess unit")


@pytest.mark.torch
@pytest.mark.slow
def test_a_plain_torchvision_vit_export_is_quiet_and_called_out(tmp_path: Path) -> None:
    """A small torchvision ViT through plain ``torch.onnx.export`` (dynamo, batch 1):
    its baked reshapes keep the batch at 1, and torchvision zero-initialises the head."""
    import contextlib
    import io
    import warnings

    torch = pytest.importorskip("torch")
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    vit = vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5).eval()
    source = tmp_path / "vit.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(vit, (torch.randn(1, 3, 32, 32),), str(source))
    done = run_cli("export", str(source), "-o", str(tmp_path / "vit.cam.onnx"))
    assert done.returncode == 0, done.stderr
    assert not any(noise in done.stderr for noise in NOISE), done.stderr
    said = [line for line in done.stderr.splitlines() if not line.startswith("export: ")]
    assert said == [f"onnxcam: {ZERO_HEAD_WARNING}"]  # and progress lines, on a slow day
    assert done.stdout.strip().endswith(
        "but the logits do not depend on the input; preprocess unit; "
        "batch fixed at 1 (the graph does not run at batch size 2)")
