"""``exporter.export`` on ONNX sources, checked independently of the exporter's own verify.

Logits and activations are compared with the source model run by onnxruntime;
gradients with central differences of the source's own head (target tensor ->
pre-softmax scores), cut out of the source graph here and run in float64 by
``onnx.reference``; the cam with numpy applied to the bundle's own tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from checks import assert_close
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam.bundle import read_bundle_info
from onnxcam.errors import (
    LayerNotFoundError,
    UnsupportedModelError,
    UnsupportedOpError,
)
from onnxcam.exporter import export

BATCH = 3
EXACT = 1e-4  # relative to the largest magnitude, float32 against an independent computation
FD32 = 3e-2  # an fd bundle's own float32 differences
BUNDLE_OUTPUTS = {"logits", "activations", "gradients", "weights", "cam"}


# --------------------------------------------------------------------------- helpers


def save(tmp_path: Path, model: onnx.ModelProto, name: str) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def images(height: int = 16, width: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(BATCH, height, width, channels), dtype=np.uint8)


def mixed_targets(classes: int) -> np.ndarray:
    return np.array([-1, classes - 1, 0], np.int64)


def run_bundle(path: Path, image: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": image, "target": target})))


def run_source(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Run the source with extra (intermediate) tensors as outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {session.get_inputs()[0].name: x})


def unit_nchw(image: np.ndarray) -> np.ndarray:
    """The default ``unit`` preprocessing (x / 255), in the source's NCHW layout."""
    return np.ascontiguousarray((image.astype(np.float32) / 255.0).transpose(0, 3, 1, 2))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def float64_head(model: onnx.ModelProto, start: str, end: str) -> onnx.ModelProto:
    """The source's nodes computing ``end`` from ``start``, as a float64 model."""
    made_by = {out: node for node in model.graph.node for out in node.output}
    needed: set[str] = set()
    todo = [end]
    while todo:
        name = todo.pop()
        if name == start or name in needed or name not in made_by:
            continue
        needed.add(name)
        todo.extend(made_by[name].input)
    nodes = [n for n in model.graph.node if any(o in needed for o in n.output)]
    used = {i for n in nodes for i in n.input}
    inits = []
    for tensor in model.graph.initializer:
        if tensor.name in used:
            array = numpy_helper.to_array(tensor)
            if array.dtype == np.float32:
                array = array.astype(np.float64)
            inits.append(numpy_helper.from_array(array, tensor.name))
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info(start, TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info(end, TensorProto.DOUBLE, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)


def central_differences(
    head: onnx.ModelProto, point: np.ndarray, target: int, directions: np.ndarray
) -> np.ndarray:
    """d score[target] / d point along each direction, float64 central differences."""
    point = point.astype(np.float64)
    step = 1e-6 * (float(np.abs(point).mean()) + 1e-12)
    moved = np.concatenate([point + step * directions, point - step * directions])
    (scores,) = ReferenceEvaluator(head).run(None, {head.graph.input[0].name: moved})
    score = np.asarray(scores, np.float64)[:, target]
    half = len(directions)
    return (score[:half] - score[half:]) / (2 * step)


def channel_directions(shape: tuple[int, ...], channel_axis: int) -> np.ndarray:
    """One all-ones direction per channel (``shape`` excludes the batch axis)."""
    channels = shape[channel_axis]
    directions = np.zeros((channels, *shape))
    for k in range(channels):
        index = [slice(None)] * len(shape)
        index[channel_axis] = k
        directions[(k, *index)] = 1.0
    return directions


def mixed_directions(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Dense Gaussian directions and sparse ones (a handful of elements each)."""
    size = int(np.prod(shape))
    dense = rng.standard_normal((4, size))
    sparse = np.zeros((4, size))
    for direction in sparse:
        spots = rng.choice(size, size=8, replace=False)
        direction[spots] = rng.standard_normal(8)
    return np.concatenate([dense, sparse]).reshape((8, *shape))


def check_gradients_by_fd(
    source: onnx.ModelProto, start: str, end: str, out: dict[str, np.ndarray],
    chosen: np.ndarray, rtol: float = EXACT, live_only: bool = False,
) -> None:
    """Directional derivatives of the bundle's gradients against the source's head.

    ``live_only`` moves only the non-zero elements: a ReLU's zeros tie with each
    other in a following max-pool window, where the score has no derivative.
    """
    head = float64_head(source, start, end)
    rng = np.random.default_rng(1)
    activations = out["activations"]
    for n in range(len(activations)):
        directions = mixed_directions(rng, activations.shape[1:])
        if live_only:
            directions = directions * (activations[n] != 0)
        expected = central_differences(head, activations[n : n + 1], int(chosen[n]), directions)
        grads = out["gradients"][n].astype(np.float64)
        actual = np.array([(grads * d).sum() for d in directions])
        assert_close(actual, expected, rtol, f"directional derivatives, image {n}")


def lrn_head(model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    """``onnx_unsupported_head``'s head (feat -> LRN -> GAP -> Gemm) in float64 numpy.

    Written out here because ``onnx.reference``'s LRN loops over the batch axis
    instead of the channels (onnx 1.23), so it cannot serve as the reference.
    """
    (lrn,) = [n for n in model.graph.node if n.op_type == "LRN"]
    attrs = {a.name: helper.get_attribute_value(a) for a in lrn.attribute}
    size, alpha, beta, bias = attrs["size"], attrs["alpha"], attrs["beta"], attrs["bias"]
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    weight, offset = inits["fc.weight"], inits["fc.bias"]

    def head(x: np.ndarray) -> np.ndarray:
        channels = x.shape[1]
        below, above = (size - 1) // 2, -(-(size - 1) // 2)
        square_sum = np.stack([
            (x[:, max(0, c - below) : min(channels, c + above + 1)] ** 2).sum(axis=1)
            for c in range(channels)
        ], axis=1)
        y = x / (bias + alpha / size * square_sum) ** beta
        return y.mean(axis=(2, 3)) @ weight.T + offset

    return head


def check_fd_weights(model: onnx.ModelProto, out: dict[str, np.ndarray],
                     chosen: np.ndarray) -> None:
    """weights[k] = d score / d (all of channel k) / (H * W), against float64 numpy."""
    head = lrn_head(model)
    acts = out["activations"].astype(np.float64)
    spatial = acts.shape[2] * acts.shape[3]
    for n in range(len(acts)):
        directions = channel_directions(acts.shape[1:], 0)
        step = 1e-6 * float(np.abs(acts[n]).mean())
        plus = head(acts[n] + step * directions)[:, chosen[n]]
        minus = head(acts[n] - step * directions)[:, chosen[n]]
        expected = (plus - minus) / (2 * step) / spatial
        assert_close(out["weights"][n], expected, FD32, f"fd weights, image {n}")


def lrn_cnn(channels: int) -> onnx.ModelProto:
    """``onnx_unsupported_head`` (LRN head) with ``channels`` maps in the target layer."""
    g = models._Graph(0)
    x = g.node("Relu", [g.conv("input", 3, 8, "conv1")], "relu1")
    x = g.node("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Relu", [g.conv(x, 8, channels, "conv2")], "feat", "last_relu")
    x = g.node("LRN", [x], "lrn", size=3, alpha=1.0, beta=0.75, bias=1.0)
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flat", axis=1)
    x = g.gemm(x, channels, 5, "logits")
    g.node("Softmax", [x], "probs", axis=-1)
    return g.model("lrn_cnn", "probs", 5)


def chosen_targets(out: dict[str, np.ndarray], target: np.ndarray) -> np.ndarray:
    return np.where(target < 0, out["logits"].argmax(axis=1), target)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def dynamic_cnn() -> onnx.ModelProto:
    """``onnx_cnn`` with symbolic H and W."""
    model = models.onnx_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "H"
    dims[3].Clear()
    dims[3].dim_param = "W"
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_export")


def exported(folder: Path, name: str, layer: str | None = None
             ) -> tuple[onnx.ModelProto, Path, Path]:
    """(source model, source path, bundle path) for a ``models`` builder, defaults only
    (but ``layer``, where given)."""
    model = getattr(models, name)()
    src = save(folder, model, name)
    out = folder / f"{name}.bundle.onnx"
    export(src, out, layer=layer)  # gradient="auto"
    return model, src, out


@pytest.fixture(scope="module")
def cnn(folder: Path) -> tuple[onnx.ModelProto, Path, Path]:
    return exported(folder, "onnx_cnn")


@pytest.fixture(scope="module")
def residual(folder: Path) -> tuple[onnx.ModelProto, Path, Path]:
    return exported(folder, "onnx_residual_nchw")


@pytest.fixture(scope="module")
def unsupported(folder: Path) -> tuple[onnx.ModelProto, Path, Path]:
    # The default is the LRN's output; the map before it puts LRN in the head.
    return exported(folder, "onnx_unsupported_head", layer="last_relu")


# Per model: fixture, target tensor of the default layer, pre-softmax score tensor.
CASES = {
    "onnx_cnn": ("cnn", "feat", "logits"),
    # AveragePool keeps an 8x8 map; the ReduceMean after it is the classifier's pooling.
    "onnx_residual_nchw": ("residual", "avgpool", "logits"),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto, Path, Path]:
    fixture, _, _ = CASES[request.param]
    model, src, out = request.getfixturevalue(fixture)
    return request.param, model, src, out


# --------------------------------------------------------------------------- default export


def test_cnn_bundle_contract(cnn: tuple[onnx.ModelProto, Path, Path]) -> None:
    _, src, out = cnn
    bundle = onnx.load(str(out))
    onnx.checker.check_model(bundle)
    inputs = {i.name: i.type.tensor_type for i in bundle.graph.input
              if i.name not in {t.name for t in bundle.graph.initializer}}
    assert set(inputs) == {"image", "target"}
    assert inputs["image"].elem_type == TensorProto.UINT8
    assert [d.dim_value for d in inputs["image"].shape.dim][1:] == [16, 16, 3]
    assert inputs["target"].elem_type == TensorProto.INT64
    assert {o.name for o in bundle.graph.output} == BUNDLE_OUTPUTS

    props = metadata(out)
    assert props["onnxcam.layout"] == "nchw"
    assert props["onnxcam.activation_layout"] == "nchw"
    assert props["onnxcam.target_layer"] == "last_relu"
    assert props["onnxcam.input_height"] == "16"
    assert props["onnxcam.input_width"] == "16"
    assert props["onnxcam.input_channels"] == "3"
    assert props["onnxcam.num_classes"] == "5"
    assert props["onnxcam.preprocess"] == "unit"
    assert props["onnxcam.gradient"] == "analytic"
    assert props["onnxcam.source_format"] == "onnx"
    assert props["onnxcam.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert props["onnxcam.removed_activation"] == "Softmax"
    assert json.loads(props["onnxcam.labels"]) == []


def test_logits_match_source(case) -> None:
    name, model, _, out = case
    _, tensor, scores = CASES[name]
    image, target = images(), mixed_targets(4 if name == "onnx_residual_nchw" else 5)
    got = run_bundle(out, image, target)
    final, pre, activations = run_source(
        model, unit_nchw(image), [model.graph.output[0].name, scores, tensor]
    )
    assert_close(got["logits"], pre, EXACT, "logits vs source pre-softmax scores")
    info = read_bundle_info(out)
    squashed = softmax(got["logits"]) if info.removed_activation == "Softmax" else got["logits"]
    assert_close(squashed, final, EXACT, "squashed logits vs source output")
    assert_close(got["activations"], activations, EXACT, "activations vs source tensor")


def test_gradients_match_float64_differences(case) -> None:
    name, model, _, out = case
    _, tensor, scores = CASES[name]
    target = mixed_targets(4 if name == "onnx_residual_nchw" else 5)
    got = run_bundle(out, images(seed=2), target)
    assert got["gradients"].shape == got["activations"].shape
    check_gradients_by_fd(model, tensor, scores, got, chosen_targets(got, target))


def test_cam_is_relu_of_weighted_activations(case) -> None:
    _, _, _, out = case
    got = run_bundle(out, images(seed=3), np.array([-1, 0, -1], np.int64))
    weights = got["gradients"].astype(np.float64).mean(axis=(2, 3))  # NCHW
    assert_close(got["weights"], weights, EXACT, "weights vs mean of gradients")
    cam = np.maximum(np.einsum("nchw,nc->nhw", got["activations"].astype(np.float64), weights), 0)
    assert got["cam"].shape == got["activations"].shape[:1] + got["activations"].shape[2:]
    assert_close(got["cam"], cam, EXACT, "cam vs numpy Grad-CAM")
    assert (got["cam"] >= 0).all()


def test_target_selects_the_class(cnn) -> None:
    """target -1 is the top class; explicit targets pick their own gradient."""
    _, _, out = cnn
    image = np.repeat(images(seed=4)[:1], BATCH, axis=0)
    got = run_bundle(out, image, np.array([-1, 0, 1], np.int64))
    top = int(got["logits"][0].argmax())
    other = run_bundle(out, image, np.array([top, 0, 1], np.int64))
    np.testing.assert_array_equal(got["gradients"][0], other["gradients"][0])
    assert not np.allclose(got["gradients"][1], got["gradients"][2])


# --------------------------------------------------------------------------- layer selection


@pytest.mark.parametrize(
    ("layer", "node", "tensor"),
    [("conv2", "conv2", "conv2"), ("feat", "last_relu", "feat"), ("last_relu", "last_relu", "feat"),
     ("pool1", "pool1", "pool1")],
    ids=["node-conv2", "tensor-feat", "node-last_relu", "node-pool1"],
)
def test_layer_by_node_or_tensor_name(tmp_path: Path, cnn, layer: str, node: str,
                                      tensor: str) -> None:
    model, src, _ = cnn
    out = tmp_path / "bundle.onnx"
    result = export(src, out, layer=layer)
    assert result.info.target_layer == node
    assert read_bundle_info(out).target_layer == node
    target = mixed_targets(5)
    image = images(seed=5)
    got = run_bundle(out, image, target)
    (expected,) = run_source(model, unit_nchw(image), [tensor])
    assert_close(got["activations"], expected, EXACT, f"activations of {tensor}")
    check_gradients_by_fd(model, tensor, "logits", got, chosen_targets(got, target))


def test_a_misspelt_layer_gets_a_suggestion_not_every_layer() -> None:
    from onnxcam.errors import LayerNotFoundError

    deep = [f"conv{stage}_block{block}_out" for stage in range(2, 6) for block in range(1, 40)]
    typo = LayerNotFoundError("conv5_blok3_out", deep)
    assert str(typo).startswith("no layer named 'conv5_blok3_out'; did you mean "
                                "'conv5_block3_out' or ")  # and two more near ones
    assert str(typo).count(" or ") == 2 and str(typo).endswith("?")
    unknown = str(LayerNotFoundError("head", deep))
    assert unknown.startswith("no layer named 'head'; 156 candidates, the last: conv5_block34_out")
    assert unknown.endswith("(`onnxcam layers` lists them all)") and len(unknown) < 250


def test_unknown_layer_lists_candidates(tmp_path: Path, cnn) -> None:
    _, src, _ = cnn
    with pytest.raises(LayerNotFoundError) as caught:
        export(src, tmp_path / "bundle.onnx", layer="nope")
    assert caught.value.name == "nope"
    assert {"conv1", "conv2", "last_relu"} <= set(caught.value.candidates)
    assert "last_relu" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_non_spatial_layer_is_refused(tmp_path: Path, cnn) -> None:
    _, src, _ = cnn
    with pytest.raises(UnsupportedModelError, match="4-D"):
        export(src, tmp_path / "bundle.onnx", layer="flat")


def test_layer_before_maxpool_exports(tmp_path: Path, cnn) -> None:
    """The head crosses MaxPool: activations against the source, gradients against
    float64 differences of the source's own head (moving the ReLU's live elements)."""
    model, src, _ = cnn
    out = tmp_path / "bundle.onnx"
    assert export(src, out, layer="relu1").info.target_layer == "relu1"
    image, target = images(seed=13), mixed_targets(5)
    got = run_bundle(out, image, target)
    (expected,) = run_source(model, unit_nchw(image), ["relu1"])
    assert_close(got["activations"], expected, EXACT, "activations of relu1")
    check_gradients_by_fd(model, "relu1", "logits", got, chosen_targets(got, target),
                          live_only=True)


# --------------------------------------------------------------------------- gradient modes


def test_analytic_on_unsupported_head_names_the_op(tmp_path: Path) -> None:
    src = save(tmp_path, models.onnx_unsupported_head(), "lrn")
    out = tmp_path / "out" / "bundle.onnx"
    with pytest.raises(UnsupportedOpError, match="LRN"):
        export(src, out, layer="last_relu", gradient="analytic")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_auto_falls_back_to_fd(unsupported) -> None:
    model, src, out = unsupported
    info = read_bundle_info(out)
    props = metadata(out)
    assert info.gradient == "fd"
    assert props["onnxcam.gradient"] == "fd"
    assert float(props["onnxcam.fd_epsilon"]) > 0
    assert int(props["onnxcam.fd_chunk"]) > 0
    assert info.target_layer == "last_relu"

    bundle = onnx.load(str(out))
    names = {o.name for o in bundle.graph.output}
    assert "gradients" not in names
    assert {"logits", "activations", "weights", "cam"} <= names

    target = mixed_targets(5)
    image = images(seed=6)
    got = run_bundle(out, image, target)
    final, pre = run_source(model, unit_nchw(image), ["probs", "logits"])
    assert_close(got["logits"], pre, EXACT, "fd bundle logits")
    assert_close(softmax(got["logits"]), final, EXACT, "fd bundle probabilities")

    check_fd_weights(model, got, chosen_targets(got, target))
    acts = got["activations"]
    cam = np.maximum(np.einsum("nchw,nc->nhw", acts.astype(np.float64),
                               got["weights"].astype(np.float64)), 0)
    assert_close(got["cam"], cam, EXACT, "fd cam vs its own weights")


def test_fd_bundle_for_wider_lrn_head_is_right(tmp_path: Path) -> None:
    """Unverified, the fd bundle of a 24-channel LRN head is correct (independent check)."""
    model = lrn_cnn(24)
    out = tmp_path / "bundle.onnx"
    result = export(save(tmp_path, model, "lrn24"), out, layer="last_relu", verify=False)
    assert result.info.gradient == "fd"
    target = mixed_targets(5)
    got = run_bundle(out, images(seed=12), target)
    check_fd_weights(model, got, chosen_targets(got, target))


def test_fd_bundle_for_wider_lrn_head_verifies(tmp_path: Path) -> None:
    """Verified, the same bundle's weights hold against float64 numpy differences."""
    model = lrn_cnn(24)
    out = tmp_path / "bundle.onnx"
    result = export(save(tmp_path, model, "lrn24"), out, layer="last_relu")
    assert result.info.gradient == "fd" and result.report is not None
    target = mixed_targets(5)
    got = run_bundle(out, images(seed=14), target)
    check_fd_weights(model, got, chosen_targets(got, target))


def test_forced_fd_agrees_with_analytic(tmp_path: Path, cnn) -> None:
    _, src, analytic = cnn
    out = tmp_path / "fd.onnx"
    result = export(src, out, gradient="fd")
    assert result.info.gradient == "fd"
    assert "gradients" not in {o.name for o in onnx.load(str(out)).graph.output}
    image, target = images(seed=7), mixed_targets(5)
    exact = run_bundle(analytic, image, target)
    approx = run_bundle(out, image, target)
    assert_close(approx["logits"], exact["logits"], EXACT, "logits")
    assert_close(approx["weights"], exact["weights"], FD32, "fd weights")
    assert_close(approx["cam"], exact["cam"], FD32, "fd cam")


# --------------------------------------------------------------------------- odd sources


def test_source_output_already_named_logits(residual) -> None:
    model, _, out = residual
    assert model.graph.output[0].name == "logits"
    bundle = onnx.load(str(out))
    assert sorted(o.name for o in bundle.graph.output) == sorted(BUNDLE_OUTPUTS)
    info = read_bundle_info(out)
    assert info.removed_activation == ""
    assert info.num_classes == 4
    assert info.target_layer == "avgpool"
    image = images(seed=8)
    got = run_bundle(out, image, mixed_targets(4))
    (expected,) = run_source(model, unit_nchw(image), ["logits"])
    assert_close(got["logits"], expected, EXACT, "logits of a source named 'logits'")


def test_residual_block_layer(tmp_path: Path, residual) -> None:
    """A target before the residual Add's consumer: the head has a depthwise conv and Clip."""
    model, src, _ = residual
    out = tmp_path / "bundle.onnx"
    assert export(src, out, layer="block_out").info.target_layer == "block_relu"
    target = mixed_targets(4)
    got = run_bundle(out, images(seed=9), target)
    check_gradients_by_fd(model, "block_out", "logits", got, chosen_targets(got, target))


def test_dynamic_size_needs_input_size(tmp_path: Path) -> None:
    model = dynamic_cnn()
    src = save(tmp_path, model, "dynamic")
    out = tmp_path / "out" / "bundle.onnx"
    with pytest.raises(UnsupportedModelError, match="input-size"):
        export(src, out)
    assert not out.exists()

    result = export(src, out, input_size=(20, 24))
    info = read_bundle_info(out)
    assert (info.height, info.width, result.info.height, result.info.width) == (20, 24, 20, 24)
    image, target = images(20, 24, seed=10), mixed_targets(5)
    got = run_bundle(out, image, target)
    assert got["cam"].shape == (BATCH, 10, 12)
    (final,) = run_source(model, unit_nchw(image), ["probs"])
    assert_close(softmax(got["logits"]), final, EXACT, "probabilities at 20x24")
    check_gradients_by_fd(model, "feat", "logits", got, chosen_targets(got, target))


def test_static_size_rejects_other_input_size(tmp_path: Path, cnn) -> None:
    _, src, _ = cnn
    with pytest.raises(UnsupportedModelError, match="does not match"):
        export(src, tmp_path / "bundle.onnx", input_size=(20, 20))
    export(src, tmp_path / "bundle.onnx", input_size=(16, 16))  # the model's own size
    image, target = images(seed=15), mixed_targets(5)
    assert_close(run_bundle(tmp_path / "bundle.onnx", image, target)["logits"],
                 run_source(cnn[0], unit_nchw(image), ["logits"])[0], EXACT, "logits")


@pytest.mark.tf
def test_nhwc_source_from_tf2onnx(tmp_path: Path) -> None:
    """An NHWC-input model (Keras via tf2onnx): input nhwc, the Conv/Relu map nchw."""
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((12, 16, 3), name="pixels")
    x = L.Conv2D(5, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = L.Conv2D(6, 3, padding="same", name="conv_b")(x)
    x = L.ReLU(name="relu_b")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out_layer = L.Dense(4, activation="softmax", name="predictions")
    net = keras.Model(inp, out_layer(x))
    src = tmp_path / "nhwc.onnx"
    spec = [tf.TensorSpec((None, 12, 16, 3), tf.float32, name="pixels")]
    tf2onnx.convert.from_keras(net, input_signature=spec, opset=17, output_path=str(src))

    out = tmp_path / "bundle.onnx"
    info = export(src, out).info
    assert info.layout == "nhwc"
    assert info.activation_layout == "nchw"  # the tapped Relu follows an ONNX Conv
    assert "relu_b" in info.target_layer

    image, target = images(12, 16, seed=11), np.array([-1, 3, 0], np.int64)
    got = run_bundle(out, image, target)
    assert got["activations"].shape == (BATCH, 6, 12, 16)
    assert got["cam"].shape == (BATCH, 12, 16)

    # Reference: Keras itself, with the softmax swapped for linear.
    x = image.astype(np.float32) / 255.0
    tap = keras.Model(inp, [net.get_layer("relu_b").output, net.outputs[0]])
    out_layer.activation = keras.activations.linear
    chosen = chosen_targets(got, target)
    with tf.GradientTape() as tape:
        acts, logits = tap(x, training=False)
        score = tf.gather(logits, chosen, batch_dims=1)
    grads = tape.gradient(score, acts).numpy().transpose(0, 3, 1, 2)
    acts = acts.numpy().transpose(0, 3, 1, 2)
    assert_close(got["logits"], logits.numpy(), EXACT, "logits vs Keras")
    assert_close(got["activations"], acts, EXACT, "activations vs Keras (to NCHW)")
    assert_close(got["gradients"], grads, EXACT, "gradients vs GradientTape (to NCHW)")
    cam = np.maximum(np.einsum("nchw,nc->nhw", acts, grads.mean(axis=(2, 3))), 0)
    assert_close(got["cam"], cam, EXACT, "cam vs Keras Grad-CAM")


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("gradient", ["analytic", "fd"])
def test_lean_sessions_do_not_change_the_bundle(tmp_path: Path, gradient: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The probes and verification run lean sessions (no prepacking, basic rewrites,
    loaded from a file) to save memory; the bundle must be byte for byte the one full
    sessions give, fd step and all."""
    import onnxcam.runtime as runtime

    src = tmp_path / "cnn.onnx"
    onnx.save(models.onnx_cnn(), src)
    lean = export(src, tmp_path / "lean.onnx", gradient=gradient).path.read_bytes()
    full_session = runtime.cpu_session
    monkeypatch.setattr(runtime, "cpu_session",
                        lambda model, threads=None, lean=False: full_session(model, threads))
    import onnxcam.exporter.shapes as shapes

    monkeypatch.setattr(shapes, "cpu_session", runtime.cpu_session)
    full = export(src, tmp_path / "full.onnx", gradient=gradient).path.read_bytes()
    assert hashlib.sha256(lean).hexdigest() == hashlib.sha256(full).hexdigest()


@pytest.mark.torch
@pytest.mark.slow
def test_resnet18_exports_within_the_memory_and_time_bounds() -> None:
    """Issue 10's bound, 2 GB and 60 s with verification on, for torchvision's
    resnet18 at 224 px and its usual layer, measured by the bench in fresh processes
    (peak RSS of the export alone, torch's not counted)."""
    import subprocess
    import sys

    pytest.importorskip("torchvision")
    bench = Path(__file__).resolve().parents[2] / "bench" / "export_memory.py"
    done = subprocess.run([sys.executable, str(bench), "--models", "resnet18", "--size", "224"],
                          capture_output=True, text=True, timeout=900, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row.get("gradient") == "analytic", row
    assert row["peak_mb"] < 2048 and row["seconds"] < 60, row
