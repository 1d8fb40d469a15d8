"""``onnxcam.export`` takes paths and models in memory alike (issue 10, item 7).

A torch module goes through torch's exporter inside onnxcam, with a dynamic batch,
and its layers are named by module path; its maps are held against
pytorch-grad-cam on the same module. Wrong objects get ``UnsupportedModelError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from baked import CLASSES, images, numpy_gradcam, reshape_model, unit_nchw

import onnxcam
from onnxcam import Explainer
from onnxcam.bundle import read_bundle_info
from onnxcam.errors import LayerNotFoundError, UnsupportedModelError
from onnxcam.exporter.pipeline import is_keras_model, is_torch_module

# torch (and torchvision, which pytorch-grad-cam imports) must load before TensorFlow,
# which conftest imports for this file's tf test: the other order crashes the process.
try:
    import pytorch_grad_cam  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    pass


@pytest.mark.parametrize("thing", [42, {"model": "x"}, np.zeros((1, 3, 8, 8)), b"onnx"])
def test_a_wrong_kind_of_object_is_refused_naming_what_is_accepted(tmp_path: Path,
                                                                   thing: Any) -> None:
    with pytest.raises(UnsupportedModelError, match=r"expected a path .*torch\.nn\.Module"):
        onnxcam.export(thing, tmp_path / "out.cam.onnx")
    assert not (tmp_path / "out.cam.onnx").exists()


def test_example_is_only_for_torch_modules(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="torch modules only"):
        onnxcam.export(reshape_model(), tmp_path / "out.cam.onnx", example=np.zeros(3))


def test_an_onnx_model_in_memory_is_the_file(tmp_path: Path) -> None:
    """A ModelProto in memory (baking batch 1 in) gives the numbers of the source."""
    out = tmp_path / "memory.cam.onnx"
    source = reshape_model()
    before = source.SerializeToString()
    onnxcam.export(source, out, layer="r")
    assert source.SerializeToString() == before  # the caller's model is not touched
    batch, targets = images(3, seed=8), np.array([2, 0, 4])
    result = Explainer(out, device="cpu").explain(batch, targets)
    logits, cams = numpy_gradcam(reshape_model(), batch, targets)
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(result.raw, cams, rtol=1e-4, atol=1e-4 * cams.max())
    assert read_bundle_info(out).source_format == "onnx"


def test_detection_needs_no_framework_import() -> None:
    assert not is_torch_module(onnx.ModelProto()) and not is_keras_model(onnx.ModelProto())
    assert not is_torch_module(42) and not is_keras_model("model.keras")


# --------------------------------------------------------------------------- torch


def small_net() -> Any:
    """A torchvision-style module tree: ``features.N`` and a ``classifier``."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    net = torch.nn.Sequential()
    net.add_module("features", torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 16, 3, padding=1), torch.nn.ReLU()))
    net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", torch.nn.Flatten())
    net.add_module("classifier", torch.nn.Linear(16, CLASSES))
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def pytorch_grad_cam(net: Any, layer: str, x: Any, targets: list[int]) -> np.ndarray:
    import zoo

    return zoo.raw_grad_cam(net, net.get_submodule(layer), x, targets)


@pytest.mark.torch
@pytest.mark.parametrize("layer", ["features.6", "features.4"])
def test_a_torch_module_in_memory_matches_pytorch_grad_cam(tmp_path: Path, layer: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_grad_cam")
    net = small_net()
    out = tmp_path / "net.cam.onnx"
    result = onnxcam.export(net, out, example=torch.randn(1, 3, 16, 16), layer=layer)
    info = read_bundle_info(out)
    assert (info.target_layer, info.source_format, info.batch_size) == (layer, "torch", 0)
    assert result.report is not None and result.report.ok
    batch, targets = images(4, seed=6).repeat(2, axis=1).repeat(2, axis=2), [1, 4, 0, 2]
    ours = Explainer(out, device="cpu").explain(batch, targets, batch_size=4)
    x = torch.from_numpy(unit_nchw(batch))
    with torch.no_grad():
        logits = net(x).numpy()
    np.testing.assert_allclose(ours.logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    reference = pytorch_grad_cam(net, layer, x, targets)
    np.testing.assert_allclose(ours.raw, reference, rtol=1e-3, atol=1e-4 * reference.max())


@pytest.mark.torch
def test_a_torch_module_without_an_example_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="example"):
        onnxcam.export(small_net(), tmp_path / "net.cam.onnx")


@pytest.mark.torch
def test_an_unknown_module_path_lists_the_modules(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(LayerNotFoundError, match="features.6"):
        onnxcam.export(small_net(), tmp_path / "net.cam.onnx", example=torch.randn(1, 3, 16, 16),
                       layer="features.60")


@pytest.mark.torch
def test_a_torch_example_must_be_a_4d_tensor(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    with pytest.raises(UnsupportedModelError, match="NCHW"):
        onnxcam.export(small_net(), tmp_path / "net.cam.onnx", example=np.zeros((1, 3, 16, 16)))


# --------------------------------------------------------------------------- keras


@pytest.mark.tf
def test_a_keras_model_in_memory_matches_keras(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    inputs = keras.Input((16, 16, 3))
    hidden = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="dense")(pooled))
    out = tmp_path / "keras.cam.onnx"
    onnxcam.export(model, out, layer="conv")  # verified against GradientTape
    assert read_bundle_info(out).target_layer == "conv"
    batch = images(3, seed=2).repeat(2, axis=1).repeat(2, axis=2)
    result = Explainer(out, device="cpu").explain(batch, [0, 1, 2])
    want = model.predict(batch.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(result.logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
