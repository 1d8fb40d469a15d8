"""The RoiAlign rule against float64 central differences and torchvision's autograd.

RoiAlign reads several images' features through per-box batch indices, so it does
not fit ``test_vjp``'s per-sample harness; here the whole feature map is one input.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam.exporter.passes.add_gradients import backpropagate
from onnxcam.exporter.vjp.context import TensorShape, VjpContext
from onnxcam.graph import GraphBuilder, initializer_values
from onnxcam.runtime import cpu_session

OPSET = 17
STEP = 1e-6

# Boxes (x0, y0, x1, y1) in image pixels: inside, across the border, thinner than a
# pixel at the feature scale (the legacy mode widens it to one), off the map.
BOXES = np.float32([[1.0, 2.0, 9.5, 11.0], [-3.0, 4.0, 7.0, 16.5], [5.0, 5.0, 5.6, 9.0],
                    [2.5, 0.5, 13.0, 6.0], [20.0, 20.0, 26.0, 30.0]])
IMAGES = np.int64([0, 1, 1, 0, 1])


def roi_align_model(dtype: int, x_shape: tuple[int, ...], **attrs: object) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], **attrs)], "roi",
        [helper.make_tensor_value_info("x", dtype, list(x_shape))],
        [helper.make_tensor_value_info("y", dtype, ["r", "c", "h", "w"])],
        [numpy_helper.from_array(BOXES.astype(np.float64 if dtype == TensorProto.DOUBLE
                                              else np.float32), "rois"),
         numpy_helper.from_array(IMAGES, "batch")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=8)


def analytic(x: np.ndarray, gy: np.ndarray, **attrs: object) -> np.ndarray:
    """d sum(gy * y) / dx by the rule, run in onnxruntime."""
    model = roi_align_model(TensorProto.FLOAT, x.shape, **attrs)
    graph = model.graph
    shapes = {"x": TensorShape(x.shape, (False,) * 4),
              "y": TensorShape(gy.shape, (False,) * 4)}
    b = GraphBuilder(graph, "grad")
    ctx = VjpContext(b, shapes, initializer_values(graph), OPSET, {"x", "y"})
    graph.input.append(helper.make_tensor_value_info("gy", TensorProto.FLOAT, list(gy.shape)))
    (gx,) = backpropagate(ctx, list(graph.node), "y", "gy", ["x"])
    b.nodes.append(helper.make_node("Identity", [gx], ["gx"]))
    b.commit()
    graph.output.append(helper.make_tensor_value_info("gx", TensorProto.FLOAT, list(x.shape)))
    onnx.checker.check_model(model)
    return cpu_session(model.SerializeToString()).run(["gx"], {"x": x, "gy": gy})[0]


def numeric(x: np.ndarray, gy: np.ndarray, **attrs: object) -> np.ndarray:
    """The same by float64 central differences through onnx's reference RoiAlign."""
    session = ReferenceEvaluator(roi_align_model(TensorProto.DOUBLE, x.shape, **attrs))
    x64, gy64 = x.astype(np.float64), gy.astype(np.float64)
    grad = np.zeros_like(x64)
    for i in np.ndindex(x.shape):
        total = []
        for step in (STEP, -STEP):
            moved = x64.copy()
            moved[i] += step
            total.append(float((session.run(["y"], {"x": moved})[0] * gy64).sum()))
        grad[i] = (total[0] - total[1]) / (2 * STEP)
    return grad


def torch_autograd(x: np.ndarray, gy: np.ndarray, **attrs: object) -> np.ndarray:
    """torchvision.ops.roi_align's own backward, in float64."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    features = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(np.concatenate([IMAGES[:, None], BOXES], 1), dtype=torch.float64)
    y = ops.roi_align(features, boxes, (attrs["output_height"], attrs["output_width"]),
                      spatial_scale=attrs["spatial_scale"],
                      sampling_ratio=attrs["sampling_ratio"],
                      aligned=attrs["coordinate_transformation_mode"] == "half_pixel")
    (y * torch.tensor(gy, dtype=torch.float64)).sum().backward()
    return features.grad.numpy()


# torchvision's MultiScaleRoIAlign (aligned=False: output_half_pixel, sampling 2),
# and the aligned mode with one sample and a non-square output.
SETTINGS = {
    "multiscale_roi_align": dict(output_height=3, output_width=3, sampling_ratio=2,
                                 spatial_scale=0.5,
                                 coordinate_transformation_mode="output_half_pixel"),
    "aligned": dict(output_height=2, output_width=3, sampling_ratio=1, spatial_scale=0.25,
                    coordinate_transformation_mode="half_pixel"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_roi_align_rule_matches_numerical_and_torch_vjp(name: str) -> None:
    attrs = SETTINGS[name]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    gy = rng.standard_normal((len(BOXES), 3, attrs["output_height"],
                              attrs["output_width"])).astype(np.float32)
    got = analytic(x, gy, **attrs)
    want = numeric(x, gy, **attrs)
    scale = float(np.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got, torch_autograd(x, gy, **attrs), rtol=1e-4,
                               atol=1e-5 * scale)


def test_roi_align_rule_refuses_max_and_adaptive_sampling() -> None:
    x = np.zeros((2, 3, 6, 7), np.float32)
    gy = np.zeros((len(BOXES), 3, 2, 2), np.float32)
    for attrs in (dict(mode="max", sampling_ratio=2), dict(sampling_ratio=0)):
        with pytest.raises(Exception, match="RoiAlign"):
            analytic(x, gy, output_height=2, output_width=2, **attrs)
