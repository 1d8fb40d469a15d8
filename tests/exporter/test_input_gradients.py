"""Whole-network gradients on ONNX sources, checked independently of the exporter's verify.

``input_gradients`` is held against central differences of the SOURCE model run in
float64 by ``onnx.reference``, on torch-shaped ResNet-18 and MobileNetV2 graphs
(strided and padded Conv, MaxPool with pads, depthwise Conv, Clip, residual Add)
and the other ONNX test models. Several layers are held against single-layer
bundles, and bundles without the new flags keep the old contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from checks import assert_close
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam.bundle import BundleInfo, LayerEntry, read_bundle_info
from onnxcam.errors import ExportError, UnsupportedOpError
from onnxcam.exporter import export

BATCH = 3
TORCH_MEAN = np.array([0.485, 0.456, 0.406])
TORCH_STD = np.array([0.229, 0.224, 0.225])
STEP = 1e-6  # central-difference step in float64, relative to mean |x|
# name -> (builder, input size, preprocessing)
SOURCES = {
    "torch_resnet18": (models.torch_resnet18, 32, "torch"),
    "torch_mobilenet_v2": (models.torch_mobilenet_v2, 32, "torch"),
    "onnx_cnn": (models.onnx_cnn, 16, "unit"),
    "onnx_residual_nchw": (models.onnx_residual_nchw, 16, "unit"),
}
OLD_OUTPUTS = ["logits", "activations", "gradients", "weights", "cam"]


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)


def model_input(image: np.ndarray, preprocess: str) -> np.ndarray:
    """The NCHW float64 input the source reads, by the conventions' own formulas."""
    x = image.astype(np.float64) / 255.0
    if preprocess == "torch":
        x = (x - TORCH_MEAN) / TORCH_STD
    return x.transpose(0, 3, 1, 2)


def float64_source(model: onnx.ModelProto) -> ReferenceEvaluator:
    """The source model with float64 weights and input, returning the pre-softmax
    scores (every test model calls them ``logits``)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.DOUBLE, None))
    for i, init in enumerate(graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float64),
                                                                  init.name))
    for info in list(graph.input) + list(graph.output):
        info.type.tensor_type.elem_type = TensorProto.DOUBLE
    return ReferenceEvaluator(wide)


def run(path: Path, image: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": image, "target": target})))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("input_gradients")
    for name, (build, _, _) in SOURCES.items():
        onnx.save(build(), str(folder / f"{name}.onnx"))
    return folder


@pytest.fixture(scope="module")
def bundles(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, (_, _, preprocess) in SOURCES.items():
        paths[name] = folder / f"{name}.bundle.onnx"
        export(folder / f"{name}.onnx", paths[name], preprocess=preprocess,
               input_gradients=True, guided=True)
    return paths


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_input_gradients_match_float64_differences(folder: Path, bundles: dict[str, Path],
                                                   name: str) -> None:
    _, size, preprocess = SOURCES[name]
    source = onnx.load(str(folder / f"{name}.onnx"))
    evaluator = float64_source(source)
    image = images(size)
    classes = source.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    target = np.array([-1, classes - 1, 0], np.int64)
    out = run(bundles[name], image, target)
    chosen = np.where(target < 0, out["logits"].argmax(axis=1), target)
    gradients = out["input_gradients"].transpose(0, 3, 1, 2).astype(np.float64)  # NHWC -> NCHW
    x = model_input(image, preprocess)
    rng = np.random.default_rng(1)
    got, want = [], []
    for n in range(BATCH):
        directions = rng.standard_normal((4, *x.shape[1:]))
        step = STEP * float(np.abs(x[n]).mean())
        moved = np.concatenate([x[n] + step * directions, x[n] - step * directions])
        (scores,) = evaluator.run(None, {"input": moved})
        score = np.asarray(scores)[:, chosen[n]]
        want.append((score[:4] - score[4:]) / (2 * step))
        got.append((gradients[n] * directions).sum(axis=(1, 2, 3)))
    assert_close(got, want, 1e-4, f"{name} input gradients along random directions")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_contract_of_a_bundle_with_input_gradients(bundles: dict[str, Path], name: str) -> None:
    _, size, _ = SOURCES[name]
    out = run(bundles[name], images(size), np.full(BATCH, -1, np.int64))
    assert out["input_gradients"].shape == (BATCH, size, size, 3)
    assert out["guided_input_gradients"].shape == (BATCH, size, size, 3)
    info = read_bundle_info(bundles[name])
    assert info.input_gradients == ("input_gradients", "guided_input_gradients")
    meta = {p.key: p.value for p in onnx.load(str(bundles[name])).metadata_props}
    assert json.loads(meta["onnxcam.input_gradients"]) == list(info.input_gradients)
    # Guided backprop changes ReLU's backward only (the TF tests hold its values);
    # like keras-vis and pytorch-grad-cam it leaves ReLU6 (Clip) as it is.
    has_relu = any(n.op_type == "Relu" for n in onnx.load(str(bundles[name])).graph.node
                   if not n.name.startswith("onnxcam/"))
    assert has_relu != np.allclose(out["guided_input_gradients"], out["input_gradients"])


def test_guided_output_alone(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "guided.onnx"
    export(folder / "onnx_cnn.onnx", out, guided=True)
    info = read_bundle_info(out)
    assert info.input_gradients == ("guided_input_gradients",)
    assert "input_gradients" not in {o.name for o in onnx.load(str(out)).graph.output}


def test_bundle_without_flags_keeps_the_old_contract(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.onnx"
    # layer4 (1x1 at this size; the default is now layer3, the last map over 1x1):
    # a head without convolutions, so any ConvTranspose would be the body's.
    export(folder / "torch_resnet18.onnx", out, layer="layer4", preprocess="torch")
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == OLD_OUTPUTS
    keys = {p.key for p in model.metadata_props}
    assert "onnxcam.input_gradients" not in keys and "onnxcam.layers" not in keys
    # The body's forward stays as the source wrote it: no MaxPool indices, no masks.
    assert all(len(n.output) == 1 for n in model.graph.node if n.op_type == "MaxPool")
    assert not any(n.op_type == "ConvTranspose" for n in model.graph.node)


def test_several_layers_equal_single_layer_bundles(folder: Path, tmp_path: Path) -> None:
    source = folder / "torch_resnet18.onnx"
    chosen = ["layer2", "layer1", "layer4"]
    several = tmp_path / "several.onnx"
    export(source, several, layer=chosen, preprocess="torch", input_gradients=True)
    info = read_bundle_info(several)
    assert info.target_layer == "layer2"
    assert [(e.name, e.index) for e in info.layers] == [("layer1", 1), ("layer2", 0),
                                                          ("layer4", 2)]
    image, target = images(32, seed=3), np.array([-1, 2, 5], np.int64)
    got = run(several, image, target)
    for index, layer in enumerate(chosen):
        single = tmp_path / f"{layer}.onnx"
        export(source, single, layer=layer, preprocess="torch", verify=False)
        want = run(single, image, target)
        suffix = f".{index}" if index else ""
        for name in ("activations", "gradients", "weights", "cam"):
            assert_close(got[name + suffix], want[name], 1e-5, f"{layer} {name}")
    meta = {p.key: p.value for p in onnx.load(str(several)).metadata_props}
    listed = json.loads(meta["onnxcam.layers"])
    assert [item["name"] for item in listed] == ["layer1", "layer2", "layer4"]
    assert listed[0]["outputs"]["cam"] == "cam.1"


def test_one_backward_pass_serves_every_layer(folder: Path, tmp_path: Path) -> None:
    """Several layers and the input share one pass: one backward convolution
    (ConvTranspose, or Conv on the flipped kernel at stride 1) per forward Conv, not
    one set per layer."""
    out = tmp_path / "shared.onnx"
    export(folder / "torch_resnet18.onnx", out, layer=["layer4", "layer1"],
           preprocess="torch", input_gradients=True, verify=False)
    nodes = onnx.load(str(out)).graph.node
    backward = [n for n in nodes if n.name.startswith("onnxcam/grad/")]
    forward_convs = sum(n.op_type == "Conv" for n in nodes if n not in backward)
    strided = sum(n.op_type == "ConvTranspose" for n in backward)
    assert 0 < strided < forward_convs
    assert sum(n.op_type in ("Conv", "ConvTranspose") for n in backward) == forward_convs


def test_fd_cannot_give_input_gradients(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="analytic"):
        export(folder / "onnx_cnn.onnx", tmp_path / "x.onnx", gradient="fd",
               input_gradients=True)
    assert not (tmp_path / "x.onnx").exists()


def test_input_gradients_need_a_rule_for_every_body_op(tmp_path: Path) -> None:
    source = tmp_path / "lrn.onnx"
    onnx.save(models.onnx_unsupported_head(), str(source))
    with pytest.raises(UnsupportedOpError, match="LRN"):
        export(source, tmp_path / "x.onnx", input_gradients=True)


def test_bundle_info_round_trip() -> None:
    layers = (LayerEntry("early", 1, "nchw"), LayerEntry("late", 0, "nchw"))
    info = BundleInfo(height=8, width=8, channels=3, preprocess="unit", layout="nchw",
                      activation_layout="nchw", target_layer="late", num_classes=2,
                      labels=[], gradient="analytic",
                      input_gradients=("input_gradients",), all_layers=layers)
    again = BundleInfo.from_metadata(info.to_metadata())
    assert again == info
    assert [e.output("cam") for e in again.layers] == ["cam.1", "cam"]
    old = {k: v for k, v in info.to_metadata().items()
           if k not in ("onnxcam.layers", "onnxcam.input_gradients")}
    assert BundleInfo.from_metadata(old).layers == [LayerEntry("late", 0, "nchw")]
    assert BundleInfo.from_metadata(old).input_gradients == ()
