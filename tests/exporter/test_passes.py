"""Each pass on tiny graphs built in code: its numbers against numpy, and its bool.

A pass returns True when it changed the graph; every pass is also run where it has
nothing to do, and must then return False and leave the model byte for byte as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from micrographs import draft_of, info, init, model_of, outputs_of, snapshot
from onnx import TensorProto, helper

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
    PREPROCESS_MODES,
)
from onnxcam.errors import ExportError
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.passes import run_passes
from onnxcam.exporter.passes.add_cam import add_cam
from onnxcam.exporter.passes.add_gradients import add_gradients, add_guided_gradients
from onnxcam.exporter.passes.differentiate import differentiate
from onnxcam.exporter.passes.embed_preprocessing import embed_preprocessing
from onnxcam.exporter.passes.expose_activation import expose_activation
from onnxcam.exporter.passes.expose_logits import expose_logits
from onnxcam.exporter.passes.free_reserved_names import free_reserved_names
from onnxcam.exporter.passes.guard_padded_pools import guard_padded_pools
from onnxcam.exporter.passes.linearize_logits import linearize_logits
from onnxcam.exporter.passes.probe_head import probe_head
from onnxcam.exporter.passes.tidy import tidy
from onnxcam.exporter.pipeline import PASSES
from onnxcam.graph import forward_reachable
from onnxcam.layout import Layout

HEIGHT, WIDTH, CHANNELS, CLASSES = 4, 4, 3, 5
RNG = np.random.default_rng(0)
SCALE = RNG.uniform(0.5, 2.0, CHANNELS).astype(np.float32)
FC = RNG.normal(0, 1, (CLASSES, CHANNELS)).astype(np.float32)
BIAS = RNG.normal(0, 0.1, CLASSES).astype(np.float32)
X = RNG.normal(0, 1, (2, CHANNELS, HEIGHT, WIDTH)).astype(np.float32)  # NCHW


def classifier(head: str | None = "Softmax", feat: str = "feat", out: str = "probs"
               ) -> onnx.ModelProto:
    """NCHW x -> scaled = x * SCALE -> feat = Relu -> GAP -> Flatten -> Gemm (scores)
    [-> head] -> ``out``."""
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
        helper.make_node("Relu", ["scaled"], [feat], name="relu"),
        helper.make_node("GlobalAveragePool", [feat], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["scores" if head else out],
                         name="fc", transB=1),
    ]
    if head:
        nodes.append(helper.make_node(head, ["scores"], [out], name="head"))
    inits = [init("scale", SCALE.reshape(1, -1, 1, 1)), init("fc", FC), init("bias", BIAS)]
    return model_of(nodes, [info("x", ["N", CHANNELS, HEIGHT, WIDTH])],
                    [info(out, ["N", CLASSES])], inits)


def numpy_classifier(x: np.ndarray) -> dict[str, np.ndarray]:
    scaled = x.astype(np.float64) * SCALE.reshape(1, -1, 1, 1)
    feat = np.maximum(scaled, 0)
    scores = feat.mean(axis=(2, 3)) @ FC.T.astype(np.float64) + BIAS
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    return {"scaled": scaled, "feat": feat, "scores": scores, "probs": probs}


def classifier_draft(**options: object) -> Draft:
    return draft_of(classifier(), "nchw", [("feat", "nchw")], (HEIGHT, WIDTH, CHANNELS),
                    **options)


def assert_no_op(apply: Callable[[Draft], bool], draft: Draft) -> None:
    before = snapshot(draft.model)
    assert apply(draft) is False
    assert snapshot(draft.model) == before, f"{apply.__name__} changed the graph"


def passes_until(last: Callable[[Draft], bool]) -> tuple:
    return PASSES[: PASSES.index(last) + 1]


def uint8_images(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, HEIGHT, WIDTH, CHANNELS),
                                                dtype=np.uint8)


def as_model_input(images: np.ndarray) -> np.ndarray:
    """``unit`` preprocessing, NCHW: what ``x`` is after embed_preprocessing."""
    return images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0


# --------------------------------------------------------------------------- free_reserved_names


def test_free_reserved_names_moves_source_tensors_aside() -> None:
    draft = draft_of(classifier(feat=OUTPUT_ACTIVATIONS, out=OUTPUT_LOGITS), "nchw",
                     [(OUTPUT_ACTIVATIONS, "nchw")])
    assert free_reserved_names(draft) is True
    assert draft.taps[0].tensor == "activations__source"
    got = outputs_of(draft.model, {"x": X})
    np.testing.assert_allclose(got["logits__source"], numpy_classifier(X)["probs"], rtol=1e-5)
    assert_no_op(free_reserved_names, draft)


def test_free_reserved_names_leaves_free_names() -> None:
    assert_no_op(free_reserved_names, classifier_draft())


# --------------------------------------------------------------------------- guard_padded_pools


def zero_padded_pool(pads: list[int], stride: int) -> onnx.ModelProto:
    """x [2, 3, 7, 7] -> Pad(zeros, ``pads``) -> MaxPool 3x3 -> y, as tf2onnx writes
    Keras's ZeroPadding2D + MaxPooling2D (ResNet50V2's pool1)."""
    return model_of(
        [helper.make_node("Pad", ["x", "pads"], ["padded"]),
         helper.make_node("MaxPool", ["padded"], ["y"], kernel_shape=[3, 3],
                          strides=[stride, stride])],
        [info("x", [None, 3, 7, 7])], [info("y")],
        [init("pads", np.array(pads, np.int64), np.int64)])


def numpy_zero_padded_pool(x: np.ndarray, pads: list[int], stride: int) -> np.ndarray:
    padded = np.pad(x, [(0, 0), (0, 0), (pads[2], pads[6]), (pads[3], pads[7])])
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return windows[:, :, ::stride, ::stride].max(axis=(4, 5))


@pytest.mark.parametrize(("pads", "stride"), [([0, 0, 1, 1, 0, 0, 1, 1], 2),
                                              ([0, 0, 2, 0, 0, 0, 1, 2], 1)])
def test_guard_padded_pools_keeps_the_zeros_onnxruntime_would_drop(pads: list[int],
                                                                   stride: int) -> None:
    # Negative inputs: a border window's max is then the padding's 0.
    x = -np.abs(RNG.normal(0, 1, (2, 3, 7, 7))).astype(np.float32)
    x[:, :, 3, 3] = 1.0
    want = numpy_zero_padded_pool(x, pads, stride)
    model = zero_padded_pool(pads, stride)
    # The bug guarded against: onnxruntime's Pad fusion pads the pool with -inf.
    assert not np.allclose(outputs_of(model, {"x": x})["y"], want)
    draft = draft_of(model, "nchw", [], (7, 7, 3))
    assert guard_padded_pools(draft) is True
    assert [n.op_type for n in draft.graph.node] == ["MaxPool", "Max"]
    np.testing.assert_array_equal(outputs_of(draft.model, {"x": x})["y"], want)
    assert_no_op(guard_padded_pools, draft)


def test_guard_padded_pools_leaves_other_pads() -> None:
    nonzero = zero_padded_pool([0, 0, 1, 1, 0, 0, 1, 1], 2)
    nonzero.graph.node[0].input.append("value")
    nonzero.graph.initializer.append(init("value", np.array(-1.0, np.float32)))
    assert_no_op(guard_padded_pools, draft_of(nonzero, "nchw", [], (7, 7, 3)))
    tapped = zero_padded_pool([0, 0, 1, 1, 0, 0, 1, 1], 2)
    assert_no_op(guard_padded_pools, draft_of(tapped, "nchw", [("padded", "nchw")], (7, 7, 3)))


# --------------------------------------------------------------------------- expose_activation


def test_expose_activation_outputs_each_layer() -> None:
    draft = draft_of(classifier(), "nchw", [("feat", "nchw"), ("scaled", "nchw")])
    assert expose_activation(draft) is True
    got = outputs_of(draft.model, {"x": X})
    want = numpy_classifier(X)
    np.testing.assert_allclose(got[OUTPUT_ACTIVATIONS], want["feat"], rtol=1e-6)
    np.testing.assert_allclose(got["activations.1"], want["scaled"], rtol=1e-6)
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5)
    assert_no_op(expose_activation, draft)


def test_expose_activation_of_a_view_makes_the_head_read_it() -> None:
    """tf2onnx hands a tapped NCHW map out through a Transpose that the head does not
    read; after exposing the view, the logits depend on it (so gradients exist) and
    the numbers are unchanged."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Transpose", ["a"], ["a_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("GlobalAveragePool", ["a"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["scores"], name="fc", transB=1),
    ]
    model = model_of(nodes, [info("x", ["N", CHANNELS, HEIGHT, WIDTH])],
                     [info("scores", ["N", CLASSES]), info("a_nhwc", None)],
                     [init("fc", FC), init("bias", BIAS)])
    draft = draft_of(model, "nchw", [("a_nhwc", "nhwc")])
    assert "scores" not in forward_reachable(draft.graph, "a_nhwc")
    assert expose_activation(draft) is True
    assert "scores" in forward_reachable(draft.graph, "a_nhwc")
    assert [o.name for o in draft.graph.output] == ["scores", OUTPUT_ACTIVATIONS]
    got = outputs_of(draft.model, {"x": X})
    relu = np.maximum(X.astype(np.float64), 0)
    np.testing.assert_allclose(got[OUTPUT_ACTIVATIONS], relu.transpose(0, 2, 3, 1), rtol=1e-6)
    np.testing.assert_allclose(got["scores"], relu.mean(axis=(2, 3)) @ FC.T + BIAS, rtol=1e-5)


def test_expose_activation_refuses_a_missing_tensor() -> None:
    with pytest.raises(ExportError, match="nowhere"):
        expose_activation(draft_of(classifier(), "nchw", [("nowhere", "nchw")]))


# --------------------------------------------------------------------------- expose and linearize


def test_expose_logits_copies_the_classifier_output_first() -> None:
    draft = classifier_draft()
    run_passes(draft, [expose_activation, expose_logits])
    assert [o.name for o in draft.graph.output] == [OUTPUT_LOGITS, OUTPUT_ACTIVATIONS]
    got = outputs_of(draft.model, {"x": X})
    np.testing.assert_allclose(got[OUTPUT_LOGITS], numpy_classifier(X)["probs"], rtol=1e-5)
    assert_no_op(expose_logits, draft)


@pytest.mark.parametrize(("head", "squash"), [
    ("Softmax", lambda z: np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)),
    ("Sigmoid", lambda z: 1 / (1 + np.exp(-z))),
    ("LogSoftmax", lambda z: z - np.log(np.exp(z).sum(axis=1, keepdims=True))),
])
def test_linearize_logits_removes_terminal_squashing(head: str, squash: Callable) -> None:
    draft = draft_of(classifier(head), "nchw", [("feat", "nchw")])
    run_passes(draft, [expose_activation, expose_logits])
    scores = numpy_classifier(X)["scores"]
    np.testing.assert_allclose(outputs_of(draft.model, {"x": X})[OUTPUT_LOGITS],
                               squash(scores), rtol=1e-5, atol=1e-6)
    assert linearize_logits(draft) is True
    assert draft.removed_activation == head
    got = outputs_of(draft.model, {"x": X})
    np.testing.assert_allclose(got[OUTPUT_LOGITS], scores, rtol=1e-5, atol=1e-6)
    assert_no_op(linearize_logits, draft)
    assert draft.removed_activation == head


def test_linearize_logits_without_squashing_changes_nothing() -> None:
    draft = draft_of(classifier(None, out="scores"), "nchw", [("feat", "nchw")])
    run_passes(draft, [expose_activation, expose_logits])
    assert_no_op(linearize_logits, draft)
    assert draft.removed_activation == ""


def nhwc_segmenter(axis: int) -> onnx.ModelProto:
    """NHWC x -> NCHW -> 1x1 conv to CLASSES -> NHWC scores -> Softmax over ``axis``:
    a tf2onnx-like segmenter, [N, H, W, K] out."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], name="in", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "w"], ["feat"], name="conv"),
        helper.make_node("Transpose", ["feat"], ["scores"], name="out", perm=[0, 2, 3, 1]),
        helper.make_node("Softmax", ["scores"], ["probs"], name="head", axis=axis),
    ]
    return model_of(nodes, [info("x", ["N", HEIGHT, WIDTH, CHANNELS])],
                    [info("probs", ["N", HEIGHT, WIDTH, CLASSES])],
                    [init("w", FC.reshape(CLASSES, CHANNELS, 1, 1))])


@pytest.mark.parametrize("axis", [-1, 3])
def test_linearize_logits_finds_a_segmenters_softmax_behind_its_transposes(axis: int) -> None:
    """The class axis is followed through expose_logits's NHWC -> NCHW transpose and the
    model's own; the logits are the per-pixel scores, class axis 1."""
    draft = draft_of(nhwc_segmenter(axis), "nhwc", [("feat", "nchw")])
    draft.pixels_layout = Layout.NHWC
    run_passes(draft, [expose_activation, expose_logits])
    nhwc = X.transpose(0, 2, 3, 1)
    scores = np.einsum("nchw,kc->nkhw", X.astype(np.float64), FC)
    assert linearize_logits(draft) is True
    assert draft.removed_activation == "Softmax"
    got = outputs_of(draft.model, {"x": nhwc})[OUTPUT_LOGITS]
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-6)


def test_linearize_logits_keeps_a_softmax_over_the_pixels() -> None:
    draft = draft_of(nhwc_segmenter(1), "nhwc", [("feat", "nchw")])
    draft.pixels_layout = Layout.NHWC
    run_passes(draft, [expose_activation, expose_logits])
    assert_no_op(linearize_logits, draft)
    assert draft.removed_activation == ""


# --------------------------------------------------------------------------- embed_preprocessing

# The published conventions, written out here rather than read from the exporter:
# Keras' imagenet_utils (caffe: BGR minus the ImageNet mean; tf: [-1, 1]) and
# torchvision's normalisation (RGB / 255 minus mean over std).
CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]
TORCH_MEAN = [0.485, 0.456, 0.406]
TORCH_STD = [0.229, 0.224, 0.225]
CONVENTIONS = {
    "none": lambda x: x,
    "unit": lambda x: x / 255.0,
    "tf": lambda x: x / 127.5 - 1.0,
    "caffe": lambda x: x[..., ::-1] - np.array(CAFFE_MEAN_BGR),
    "torch": lambda x: (x / 255.0 - np.array(TORCH_MEAN)) / np.array(TORCH_STD),
}


def test_every_preprocessing_mode_has_a_reference() -> None:
    assert sorted(CONVENTIONS) == sorted(PREPROCESS_MODES)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("mode", sorted(CONVENTIONS))
def test_embed_preprocessing_matches_the_published_conventions(mode: str, layout: str) -> None:
    h, w, c = 4, 5, 3
    shape = ["N", h, w, c] if layout == "nhwc" else ["N", c, h, w]
    model = model_of([helper.make_node("Identity", ["x"], ["y"])], [info("x", shape)],
                     [info("y", shape)])
    draft = draft_of(model, layout, [], (h, w, c), preprocess=mode)
    assert embed_preprocessing(draft) is True
    assert draft.model_input == "x"
    graph = draft.graph
    assert [i.name for i in graph.input] == [INPUT_IMAGE]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    onnx.checker.check_model(draft.model)
    images = np.random.default_rng(3).integers(0, 256, (2, h, w, c), dtype=np.uint8)
    images[0, 0, 0] = [0, 128, 255]  # distinct channels, so a channel flip cannot hide
    (got,) = outputs_of(draft.model, {INPUT_IMAGE: images}).values()
    want = CONVENTIONS[mode](images.astype(np.float64))
    if layout == "nchw":
        want = want.transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=3e-5)
    assert_no_op(embed_preprocessing, draft)


# --------------------------------------------------------------------------- tidy and probe_head


def test_tidy_prunes_and_sorts() -> None:
    model = classifier()
    nodes = list(model.graph.node)
    dead = helper.make_node("Neg", ["feat"], ["unused"], name="dead")
    del model.graph.node[:]
    model.graph.node.extend([dead, *reversed(nodes)])
    model.graph.initializer.append(init("orphan", [1.0]))
    draft = draft_of(model, "nchw", [])
    assert tidy(draft) is True
    assert [n.name for n in draft.graph.node] == [n.name for n in nodes]
    assert "orphan" not in {i.name for i in draft.graph.initializer}
    np.testing.assert_allclose(outputs_of(draft.model, {"x": X})["probs"],
                               numpy_classifier(X)["probs"], rtol=1e-5)
    assert_no_op(tidy, draft)


def test_probe_head_records_shapes_and_classes_only() -> None:
    draft = classifier_draft()
    run_passes(draft, passes_until(tidy))
    assert_no_op(probe_head, draft)
    assert draft.num_classes == CLASSES
    feat = draft.shapes["feat"]
    assert feat.dims == (1, CHANNELS, HEIGHT, WIDTH)
    assert feat.batched == (True, False, False, False)


def test_probe_head_refuses_labels_of_another_length() -> None:
    draft = classifier_draft(labels=("cat", "dog"))
    with pytest.raises(ExportError, match="2 labels"):
        run_passes(draft, passes_until(probe_head))


# --------------------------------------------------------------------------- differentiate


@pytest.mark.parametrize("targets", [[-1, -1], [0, CLASSES - 1]])
def test_differentiate_adds_exact_gradients(targets: list[int]) -> None:
    """Through GAP and Gemm, d score_t / d feat[c, i, j] = FC[t, c] / (H W) everywhere."""
    draft = classifier_draft()
    run_passes(draft, passes_until(differentiate))
    assert draft.gradient == "analytic"
    images, target = uint8_images(), np.array(targets, np.int64)
    got = outputs_of(draft.model, {INPUT_IMAGE: images, INPUT_TARGET: target})
    want = numpy_classifier(as_model_input(images))
    np.testing.assert_allclose(got[OUTPUT_LOGITS], want["scores"], rtol=1e-5, atol=1e-6)
    chosen = np.where(target < 0, want["scores"].argmax(axis=1), target)
    expected = np.broadcast_to((FC[chosen] / (HEIGHT * WIDTH))[:, :, None, None],
                               got[OUTPUT_GRADIENTS].shape)
    np.testing.assert_allclose(got[OUTPUT_GRADIENTS], expected, rtol=1e-6)
    assert_no_op(differentiate, draft)
    assert_no_op(add_gradients, draft)


# --------------------------------------------------------------------------- add_cam


def layer_maps_model(layouts: list[str], fd_layers: set[int]) -> onnx.ModelProto:
    """Inputs a<i> (and g<i>, or w<i> for fd layers) exposed as activations.i and
    gradients.i (weights.i): what add_cam finds after the gradient passes."""
    nodes, inputs, outputs = [], [], []
    for index, layout in enumerate(layouts):
        suffix = f".{index}" if index else ""
        shape = ["N", 3, 4, 5] if layout == "nchw" else ["N", 4, 5, 3]
        second, second_shape = ("weights", ["N", 3]) if index in fd_layers else (
            "gradients", shape)
        for name, tensor, dims in (("activations", f"a{index}", shape),
                                   (second, f"{second[0]}{index}", second_shape)):
            inputs.append(info(tensor, dims))
            nodes.append(helper.make_node("Identity", [tensor], [name + suffix],
                                          name=f"onnxcam/{name}{suffix}"))
            outputs.append(info(name + suffix, dims))
    return model_of(nodes, inputs, outputs)


@pytest.mark.parametrize(("layouts", "fd_layers"), [
    (["nchw"], set()),
    (["nhwc"], set()),
    (["nchw", "nhwc", "nchw"], set()),
    (["nhwc", "nchw"], {0}),
])
def test_add_cam_is_relu_of_weighted_activations(layouts: list[str], fd_layers: set[int]
                                                 ) -> None:
    """cam_i = ReLU(sum_k w_k A_k) with w = the spatial mean of the gradients (or the
    fd pass's weights), per layer, in either layout."""
    rng = np.random.default_rng(4)
    model = layer_maps_model(layouts, fd_layers)
    feeds = {i.name: rng.normal(0, 1, [2] + [d.dim_value for d in
                                            i.type.tensor_type.shape.dim[1:]]).astype(np.float32)
             for i in model.graph.input}
    draft = draft_of(model, "nchw", [(f"a{i}", layout) for i, layout in enumerate(layouts)])
    assert add_cam(draft) is True
    got = outputs_of(draft.model, feeds)
    for index, layout in enumerate(layouts):
        suffix = f".{index}" if index else ""
        maps = feeds[f"a{index}"].astype(np.float64)
        if layout == "nhwc":
            maps = maps.transpose(0, 3, 1, 2)
        if index in fd_layers:
            weights = feeds[f"w{index}"].astype(np.float64)
        else:
            gradients = feeds[f"g{index}"].astype(np.float64)
            weights = gradients.mean(axis=(1, 2) if layout == "nhwc" else (2, 3))
            np.testing.assert_allclose(got["weights" + suffix], weights, rtol=1e-5, atol=1e-7)
        cam = np.maximum((maps * weights[:, :, None, None]).sum(axis=1), 0)
        assert got["cam" + suffix].shape == (2, 4, 5)
        np.testing.assert_allclose(got["cam" + suffix], cam, rtol=1e-5, atol=1e-6)
    assert_no_op(add_cam, draft)


def test_input_gradients_are_exact_and_guided_ones_added_once() -> None:
    """x -> scaled = x * SCALE -> Relu -> GAP -> Gemm: d score_t / d x[c, i, j] is
    FC[t, c] SCALE[c] / (H W) where x[c, i, j] * SCALE[c] > 0, else 0 (NHWC out, for
    the unit preprocessing's x = image / 255)."""
    draft = classifier_draft(input_gradients=True, guided=True)
    run_passes(draft, passes_until(differentiate))
    images, target = uint8_images(5), np.array([-1, 2], np.int64)
    got = outputs_of(draft.model, {INPUT_IMAGE: images, INPUT_TARGET: target})
    x = as_model_input(images)
    chosen = np.where(target < 0, numpy_classifier(x)["scores"].argmax(axis=1), target)
    slope = (FC[chosen] * SCALE / (HEIGHT * WIDTH))[:, :, None, None]
    expected = np.where(x * SCALE.reshape(1, -1, 1, 1) > 0, slope, 0).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got["input_gradients"], expected, rtol=1e-5, atol=1e-8)
    assert got["guided_input_gradients"].shape == expected.shape
    assert_no_op(add_guided_gradients, draft)
