"""Verification refuses real defects at its default tolerances.

Each test first exports a source cleanly, then plants one defect a bug could make
(a wrong gradient rule, swapped channels in the exposed activation, a residual
branch the backward pass drops) and expects ``VerificationError`` with nothing
written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxcam.exporter.pipeline as pipeline
from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.errors import VerificationError
from onnxcam.exporter import export
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.verify.checks import (
    directional_derivatives,
    gradient_scale,
    norm_error,
    relative_error,
)
from onnxcam.exporter.verify.float64_head import Float64Head
from onnxcam.exporter.vjp import Rule, load_rules
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.graph import producers, toposort


def save(folder: Path, model: onnx.ModelProto, name: str) -> Path:
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


Grads = list[str | None]
Mutant = Callable[[Rule, VjpContext, onnx.NodeProto, Grads], Grads]


def replace_rule(monkeypatch: pytest.MonkeyPatch, op_type: str, mutant: Mutant) -> None:
    """Swap the registered VJP rule for ``op_type`` for ``mutant`` (wrapping the real one)."""
    rules = load_rules()  # every rule module imported first, so none re-registers later
    real = rules[op_type]
    monkeypatch.setitem(rules, op_type, lambda ctx, node, grads: mutant(real, ctx, node, grads))


def doubled(real: Rule, ctx: VjpContext, node: onnx.NodeProto, grads: Grads) -> Grads:
    return [None if g is None else ctx.b.op("Mul", [g, ctx.scalar(2.0)])
            for g in real(ctx, node, grads)]


def first_branch_only(real: Rule, ctx: VjpContext, node: onnx.NodeProto, grads: Grads
                      ) -> Grads:
    return [*real(ctx, node, grads)[:1], None]


def assert_refused(src: Path, out: Path, **options: object) -> None:
    with pytest.raises(VerificationError, match="disagrees with its source"):
        export(src, out, **options)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_doubled_gradient_rule_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemm's rule returning twice the gradient: every gradient and weight doubles."""
    src = save(tmp_path, models.onnx_cnn(), "cnn")
    assert export(src, tmp_path / "clean.onnx").info.gradient == "analytic"
    replace_rule(monkeypatch, "Gemm", doubled)
    assert_refused(src, tmp_path / "out" / "bundle.onnx")


def test_a_dropped_residual_branch_is_refused(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Below a residual Add, the gradient must sum both branches; the mutant Add rule
    passes it down the first (the block's convolutions) and drops the skip."""
    src = save(tmp_path, models.onnx_residual_nchw(), "residual")
    assert export(src, tmp_path / "clean.onnx", layer="stem_relu").info.gradient == "analytic"
    replace_rule(monkeypatch, "Add", first_branch_only)
    assert_refused(src, tmp_path / "out" / "bundle.onnx", layer="stem_relu")


def swap_channels(draft: Draft) -> bool:
    """A defect planted after the passes: ``activations`` (and the cam computed from
    it) get the layer's channels in reverse order, the gradients stay right."""
    graph = draft.graph
    exposed = producers(graph)[OUTPUT_ACTIVATIONS]
    reversed_ = f"{exposed.input[0]}/reversed"
    bounds = [numpy_helper.from_array(np.array([value], np.int64), f"reverse/{name}")
              for name, value in (("start", -1), ("end", -2**62), ("axis", 3), ("step", -1))]
    graph.initializer.extend(bounds)
    graph.node.append(helper.make_node("Slice", [exposed.input[0], *(b.name for b in bounds)],
                                       [reversed_], name="reverse_channels"))
    exposed.input[0] = reversed_
    toposort(graph)
    return True


@pytest.mark.tf
def test_swapped_channels_in_the_exposed_activation_are_refused(
    mnist_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Keras source: verification holds the activations against TensorFlow's own."""
    assert export(mnist_path, tmp_path / "clean.onnx").info.activation_layout == "nhwc"
    monkeypatch.setattr(pipeline, "PASSES", (*pipeline.PASSES, swap_channels))
    assert_refused(mnist_path, tmp_path / "out" / "bundle.onnx")



def test_errors_are_judged_on_the_logits_scale() -> None:
    """A 1e-11 gradient off by 1e-15 (rounding, against logits of 2) passes; the same
    error relative to the gradient alone would be 1e-4. A doubled gradient of the
    size the logits imply does not pass."""
    logits = np.array([[2.0, -1.0]])
    activations = np.full((1, 4, 2, 2), 0.5)
    scale = gradient_scale(logits, activations)
    assert scale == pytest.approx(2.0 / 8.0)
    tiny = np.full(4, 1e-11)
    assert relative_error(tiny + 1e-15, tiny) == pytest.approx(1e-4)
    assert relative_error(tiny + 1e-15, tiny, floor=scale) < 1e-13
    normal = np.full(4, scale)
    assert relative_error(2 * normal, normal, floor=scale) == pytest.approx(1.0)


def test_a_doubled_conv_rule_is_refused(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """At ``relu1`` the head holds a MaxPool, a Conv and a ReLU before the Gemm."""
    src = save(tmp_path, models.onnx_cnn(), "cnn")
    assert export(src, tmp_path / "clean.onnx", layer="relu1").report.ok
    replace_rule(monkeypatch, "Conv", doubled)
    assert_refused(src, tmp_path / "out" / "bundle.onnx", layer="relu1")


def pair_head(op_type: str) -> Float64Head:
    """A float64 head on a [1, 1, 1, 2] start: ``op_type`` then the sum, as the score."""
    start = helper.make_tensor_value_info("a", onnx.TensorProto.DOUBLE, None)
    if op_type == "MaxPool":
        first = helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[1, 2])
    else:
        first = helper.make_node(op_type, ["a"], ["m"])
    nodes = [first, helper.make_node("Flatten", ["m"], ["f"]),
             helper.make_node("ReduceSum", ["f", "axes"], ["s"], keepdims=1)]
    graph = helper.make_graph(nodes, "pair", [start],
                              [helper.make_tensor_value_info("s", onnx.TensorProto.DOUBLE, None)],
                              [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    values = [{"a": np.array([[[[3.0, 3.0]]]], np.float32)}]
    return Float64Head(ReferenceEvaluator(model), "a", [], [], [], values)


def test_a_direction_across_a_max_pool_tie_is_a_kink_and_smooth_heads_have_none() -> None:
    directions = np.array([[[[1.0, 0.0]]], [[[0.0, 1.0]]], [[[1.0, 1.0]]]])
    tie = directional_derivatives(pair_head("MaxPool"), 0, 0, directions, scale=0.0)
    assert tie.kink.tolist() == [True, True, False]  # moving both keeps the tie: slope 1
    np.testing.assert_allclose(tie.central[2], 1.0, rtol=1e-9)
    smooth = directional_derivatives(pair_head("Sigmoid"), 0, 0, directions, scale=0.0)
    assert not smooth.kink.any()
    slope = 1 / (1 + np.exp(-3.0)) * (1 - 1 / (1 + np.exp(-3.0)))
    np.testing.assert_allclose(smooth.central, [slope, slope, 2 * slope], rtol=1e-7)


@pytest.mark.parametrize("axis", [-1, 1])
def test_float64_layer_normalization_keeps_float64(axis: int) -> None:
    """The float64 head's LayerNormalization: statistics in float64, any stash_type
    (dynamo writes stash_type explicitly, which the head lifts to double)."""
    from onnxcam.exporter.verify.kernels import REFERENCE_OPS

    rng = np.random.default_rng(0)
    x = 1.0 + 1e-6 * rng.standard_normal((2, 3, 5))  # tiny variance: float32 would lose it
    shape = x.shape[axis % 3:]
    scale, bias = rng.standard_normal(shape), rng.standard_normal(shape)
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis,
                            epsilon=1e-12, stash_type=TensorProto.DOUBLE)
    graph = helper.make_graph(
        [node], "ln", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None)
                       for n in ("x", "s", "b")],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (got,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"x": x, "s": scale,
                                                                         "b": bias})
    axes = tuple(range(axis % 3, 3))
    centred = x - x.mean(axis=axes, keepdims=True)
    want = centred / np.sqrt((centred ** 2).mean(axis=axes, keepdims=True) + 1e-12) * scale + bias
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32 statistics: ~1e-1


def test_input_gradients_are_judged_per_image_in_norm() -> None:
    """The worst image's L2 error over its own norm (or the floor over its size): a
    few pixels off by their own size (flipped ReLUs) weigh by their share of the norm,
    not as the worst pixel does; a doubled gradient is off by 1 either way."""
    want = np.ones((2, 10, 10, 3))
    want[1] *= 100.0
    spiked = want.copy()
    spiked[0, 0, 0, 0] = 0.0  # one value of 300 off by its own size
    assert relative_error(spiked, want) == pytest.approx(1e-2)  # against image 1's 100
    assert norm_error(spiked, want) == pytest.approx(1 / np.sqrt(300))
    assert norm_error(2 * want, want) == pytest.approx(1.0)
    tiny = 1e-9 * want
    assert norm_error(tiny * 1.5, tiny, floor=1.0) == pytest.approx(0.5e-7)  # the floor rules


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_float64_gelu_keeps_float64(approximate: str) -> None:
    """The float64 head's Gelu, against its closed form: onnx's reference expands
    Gelu's function body with a float32 Erf, whose noise (~1e-8) made float64
    differences of ViT-B's last block misread its gradients by 20%."""
    import math

    from onnxcam.exporter.verify.kernels import REFERENCE_OPS

    x = np.linspace(-4.0, 3.0, 29).reshape(1, 29) + 1e-3
    node = helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    graph = helper.make_graph([node], "gelu", [helper.make_tensor_value_info(
        "x", TensorProto.DOUBLE, None)], [helper.make_tensor_value_info(
        "y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    (got,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"x": x})
    if approximate == "tanh":
        want = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    else:
        want = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)  # float32's Erf: ~3e-8


@pytest.mark.parametrize(("group", "strides", "dilations", "pads"), [
    (1, (1, 1), (12, 12), (12, 12, 12, 12)),  # DeepLabV3's ASPP: rates past the map
    (2, (2, 1), (2, 3), (1, 0, 2, 3)),
    (2, (1, 1), (1, 1), (1, 1, 1, 1))])  # undilated: the stock kernel
def test_float64_conv_is_torchs(group: int, strides: tuple[int, int],
                                dilations: tuple[int, int], pads: tuple[int, ...]) -> None:
    """The head's Conv, dilated ones summed tap by tap (the stock reference spreads the
    kernel to its dilated span: 15 GiB for DeepLabV3), against torch in float64."""
    torch = pytest.importorskip("torch")
    from onnxcam.exporter.verify.kernels import REFERENCE_OPS

    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((2, 4, 6, 7)), rng.standard_normal((6, 4 // group, 3, 3)), \
        rng.standard_normal(6)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, strides=strides,
                            dilations=dilations, pads=pads)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info(
        name, TensorProto.DOUBLE, None) for name in "xwb"], [helper.make_tensor_value_info(
        "y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (got,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"x": x, "w": w, "b": b})
    padded = torch.nn.functional.pad(torch.tensor(x), (pads[1], pads[3], pads[0], pads[2]))
    want = torch.nn.functional.conv2d(padded, torch.tensor(w), torch.tensor(b), stride=strides,
                                      dilation=dilations, groups=group).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("left", "right"), [
    ((17, 1, 8), (8, 5)), ((2, 3, 4, 8), (8, 5)), ((3, 8), (8, 5)), ((8,), (8, 5)),
    ((2, 3, 8), (2, 8, 5))])
def test_float64_matmul_is_numpys(left: tuple[int, ...], right: tuple[int, ...]) -> None:
    """The head's MatMul, which flattens stacks by a matrix into one product."""
    from onnxcam.exporter.verify.kernels import REFERENCE_OPS

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(left), rng.standard_normal(right)
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info(
        name, TensorProto.DOUBLE, None) for name in "ab"], [helper.make_tensor_value_info(
        "y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (got,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"a": a, "b": b})
    want = np.matmul(a, b)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "GemmTransposed"])
def test_float64_products_widen_float32_weights_by_blocks(
        op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 weight beside float64 activations (VGG's Dense weights stay float32 in
    the float64 head): the product is float64's, though the weight is widened a few
    columns at a time (blocks of 5 columns here, 37 columns in all)."""
    from onnxcam.exporter.verify import kernels

    monkeypatch.setattr(kernels, "PRODUCT_BLOCK_BYTES", 8 * 11 * 5)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 11))
    weight = rng.standard_normal((11, 37)).astype(np.float32)
    bias = rng.standard_normal(37)
    transposed = op == "GemmTransposed"
    b = np.ascontiguousarray(weight.T) if transposed else weight
    if op == "MatMul":
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        want = a @ weight.astype(np.float64)
    else:
        node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], alpha=0.5, beta=2.0,
                                transB=int(transposed))
        want = 0.5 * (a @ weight.astype(np.float64)) + 2.0 * bias
    graph = helper.make_graph([node], "product", [helper.make_tensor_value_info(
        name, TensorProto.UNDEFINED, None) for name in node.input],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (got,) = ReferenceEvaluator(model, new_ops=kernels.REFERENCE_OPS).run(
        None, {"a": a, "b": b, "c": bias})
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_only_large_product_weights_stay_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxcam.exporter.verify import float64_head

    monkeypatch.setattr(float64_head, "NARROW_WEIGHT_ELEMENTS", 12)
    weights = {"w": np.ones((4, 3)), "shared": np.ones((4, 3)), "small": np.ones((2, 3)),
               "bias": np.ones(12)}
    nodes = [helper.make_node("Gemm", ["x", "w", "bias"], ["y"]),
             helper.make_node("MatMul", ["x", "shared"], ["z"]),
             helper.make_node("Add", ["shared", "shared"], ["s"]),
             helper.make_node("MatMul", ["x", "small"], ["t"])]
    graph = helper.make_graph(nodes, "head", [], [], initializer=[
        numpy_helper.from_array(value.astype(np.float32), name)
        for name, value in weights.items()])
    assert float64_head.product_weights(nodes, graph) == {"w"}
