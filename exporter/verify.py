"""Check a finished bundle against its source before anything is written.

Logits are held against the source's own outputs. Gradients, every exported
layer's and the input gradients, are held against TF GradientTape when the
source can give them, else against float64 central differences of the bundle's
own forward graph (channel-uniform and random directions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_ACTIVATIONS,
    OUTPUT_CAM,
    OUTPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
    OUTPUT_WEIGHTS,
    BundleInfo,
    LayerEntry,
)
from onnxcam.errors import VerificationError
from onnxcam.exporter.frontends import SourceModel
from onnxcam.exporter.preprocess import preprocess_numpy
from onnxcam.exporter.shapes import random_images, run_with_outputs
from onnxcam.graph import head_nodes, source_of
from onnxcam.layout import Layout
from onnxcam.runtime import cpu_session
from onnxcam.scores import softmax

log = logging.getLogger(__name__)

# Relative error allowed against an independent float32 computation, and against
# finite differences (which carry their own rounding).
EXACT_TOLERANCE = 1e-4
# An fd bundle's float32 differences are exact for affine tails and for
# piecewise-linear heads whose kinks the step does not cross; through BN and ReLU6
# (MobileNetV2) errors of 5e-2 were seen. Real defects (a wrong channel, layout or
# class) give errors of order 1, which this still catches.
FD_TOLERANCE = 1e-1
FD_CHANNELS = 8  # channel directions checked per image by finite differences
FD_RANDOM_DIRECTIONS = 4  # sparse random directions checked per image
FD_DENSE_DIRECTIONS = 2  # dense random directions per image, for input gradients
FD_STEP = 1e-6  # relative to the mean |activation|; float64 keeps it exact
FD64_TOLERANCE = 1e-3
# Input gradients cross every layer of the body: two float32 forward passes that
# differ in the last bit put a few of a deep net's millions of ReLU inputs on
# opposite sides of zero (Keras ResNet50: 1.3e-4 against TF, 1e-6 for small nets).
INPUT_GRADIENT_TOLERANCE = 1e-3
PROBE_BATCH = 2


@dataclass
class Report:
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
        self.errors[name] = relative_error(actual, expected)
        self.tolerances[name] = tolerance

    @property
    def worst(self) -> tuple[str, float, float]:
        name = max(self.errors, key=lambda n: self.errors[n] / max(self.tolerances[n], 1e-300))
        return name, self.errors[name], self.tolerances[name]

    @property
    def ok(self) -> bool:
        return all(self.errors[n] <= self.tolerances[n] for n in self.errors)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| over max |e|: scale-free and robust to tiny entries."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    return float(np.abs(actual - expected).max(initial=0.0)) / scale


def squash(logits: np.ndarray, removed: str) -> np.ndarray:
    """Re-apply the activation the linearize pass removed, to compare with the source."""
    if removed == "Softmax":
        return softmax(logits, axis=1)
    if removed == "LogSoftmax":
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if removed == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def cam_from(activations: np.ndarray, weights: np.ndarray, layout: str) -> np.ndarray:
    """Grad-CAM in numpy: ReLU(sum_k weights[n, k] * activations[n, k]), [N, h, w]."""
    maps = Layout.of(layout).to_nchw(activations)
    return np.maximum(np.einsum("nchw,nc->nhw", maps, weights), 0)


def channel_mean(gradients: np.ndarray, layout: str) -> np.ndarray:
    return gradients.mean(axis=Layout.of(layout).spatial_axes)


def probe_targets(logits_count: int) -> np.ndarray:
    return np.array([-1, logits_count - 1] + [-1] * (PROBE_BATCH - 2), np.int64)[:PROBE_BATCH]


def verify_bundle(bundle: onnx.ModelProto, info: BundleInfo, source: SourceModel) -> Report:
    """Run the bundle on a probe batch and compare it with the source; raise on mismatch.

    Every exported layer is checked, and ``input_gradients`` where the bundle has
    them. ``guided_input_gradients`` are no derivative, so nothing here can check
    them; the tests hold them against a TF custom-gradient ReLU.
    """
    images = random_images(PROBE_BATCH, info.height, info.width, info.channels, seed=7)
    session = cpu_session(bundle.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    targets = probe_targets(info.num_classes)
    out = dict(zip(names, session.run(names, {INPUT_IMAGE: images, INPUT_TARGET: targets})))
    chosen = np.where(targets < 0, out[OUTPUT_LOGITS].argmax(axis=1), targets)
    with_input = OUTPUT_INPUT_GRADIENTS in info.input_gradients
    reference = source.reference(preprocess_numpy(images, info.preprocess), chosen,
                                 **({"input_gradients": True} if with_input else {}))

    report = Report()
    logits = out[OUTPUT_LOGITS]
    compared = logits if reference.linear else squash(logits, info.removed_activation)
    report.add("logits", compared, reference.logits, EXACT_TOLERANCE)
    layers = sorted(info.layers, key=lambda entry: entry.index)
    if reference.gradients is not None and reference.activations is not None:
        pairs = [(reference.activations, reference.gradients), *reference.more]
        for entry, (activations, gradients) in zip(layers, pairs):
            tape_check(out, entry, activations, gradients, info.has_gradients, report)
        if with_input and reference.input_gradients is not None:
            report.add(OUTPUT_INPUT_GRADIENTS, out[OUTPUT_INPUT_GRADIENTS],
                       reference.input_gradients, INPUT_GRADIENT_TOLERANCE)
    else:
        for entry in layers:
            finite_difference_check(bundle, images, chosen, out, entry, report)
            cam = entry.output(OUTPUT_CAM)
            report.add(cam, out[cam], cam_from(out[entry.output(OUTPUT_ACTIVATIONS)],
                                               out[entry.output(OUTPUT_WEIGHTS)], entry.layout),
                       EXACT_TOLERANCE)
        if with_input:
            input_gradient_check(bundle, info, images, chosen, out, report)
    name, error, tolerance = report.worst
    log.info("verification: worst %s relative error %.2e (tolerance %.0e)", name, error,
             tolerance)
    if not report.ok:
        raise VerificationError(
            f"bundle disagrees with its source: worst tensor {name!r}, relative error "
            f"{error:.3e} > {tolerance:.0e}"
        )
    return report


def tape_check(
    out: dict[str, np.ndarray], entry: LayerEntry, activations: np.ndarray,
    gradients: np.ndarray, analytic: bool, report: Report,
) -> None:
    """One layer's outputs against the source's own activations and gradients."""
    layout = entry.layout
    report.add(entry.output(OUTPUT_ACTIVATIONS), out[entry.output(OUTPUT_ACTIVATIONS)],
               activations, EXACT_TOLERANCE)
    expected_weights = channel_mean(gradients, layout)
    tolerance = EXACT_TOLERANCE if analytic else FD_TOLERANCE
    if analytic:
        report.add(entry.output(OUTPUT_GRADIENTS), out[entry.output(OUTPUT_GRADIENTS)],
                   gradients, tolerance)
    report.add(entry.output(OUTPUT_WEIGHTS), out[entry.output(OUTPUT_WEIGHTS)],
               expected_weights, tolerance)
    report.add(entry.output(OUTPUT_CAM), out[entry.output(OUTPUT_CAM)],
               cam_from(activations, expected_weights, layout), tolerance)


class ChannelLRN(OpRun):
    """LRN across channels, as the ONNX spec defines it (onnx 1.23's reference
    implementation windows over the batch axis instead)."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha = 1e-4 if alpha is None else alpha
        beta = 0.75 if beta is None else beta
        bias = 1.0 if bias is None else bias
        channels = x.shape[1]
        below, above = (size - 1) // 2, size - 1 - (size - 1) // 2
        squares = x**2
        sums = np.zeros_like(x)
        for c in range(channels):
            sums[:, c] = squares[:, max(0, c - below) : min(channels, c + above + 1)].sum(axis=1)
        return ((x / (bias + alpha / size * sums) ** beta).astype(x.dtype),)


ChannelLRN.__name__ = "LRN"


def head_in_float64(
    bundle: onnx.ModelProto, start: str = ""
) -> tuple[onnx.ModelProto, list[str]]:
    """The head alone (target layer, or the tensor ``start``, -> logits) as a float64 model.

    Its inputs are the activation tensor first, then any other computed tensor the
    head reads (a residual branch, say). Returns the model and those input names.
    """
    graph = bundle.graph
    start = start or source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    nodes = head_nodes(graph, start, end, differentiable_only=False)
    made_inside = {o for n in nodes for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    externals = [start] + sorted({i for n in nodes for i in n.input
                                  if i and i not in made_inside and i not in inits
                                  and i != start})
    used = {i for n in nodes for i in n.input}
    head = helper.make_graph(
        [_to_float64(n) for n in nodes], "head",
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
         for name in externals],
        [helper.make_tensor_value_info(end, onnx.TensorProto.DOUBLE, None)],
        [_array_to_float64(inits[name]) for name in used if name in inits],
    )
    model = helper.make_model(head, opset_imports=list(bundle.opset_import))
    return model, externals


def _array_to_float64(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    if array.dtype == np.float32:
        array = array.astype(np.float64)
    return numpy_helper.from_array(array, tensor.name)


def _to_float64(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attr in copy.attribute:
        if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
            attr.i = onnx.TensorProto.DOUBLE
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
            attr.t.CopyFrom(_array_to_float64(attr.t))
    return copy


def directional_derivatives(
    head: ReferenceEvaluator, inputs: dict[str, np.ndarray], target: int,
    directions: np.ndarray,
) -> np.ndarray:
    """d score / d activations along each direction: central differences in float64.

    In float64 a tiny step is both exact for piecewise-linear heads (it crosses no
    kink) and free of rounding, so the comparison is as tight as float32 allows.
    """
    start, *others = list(inputs)
    activation = inputs[start].astype(np.float64)
    step = FD_STEP * (float(np.abs(activation).mean()) + 1e-12)
    moved = np.concatenate([activation + step * directions, activation - step * directions])
    feeds = {start: moved}
    for name in others:
        feeds[name] = np.repeat(inputs[name].astype(np.float64), len(moved), axis=0)
    (scores,) = head.run(None, feeds)
    score = np.asarray(scores, np.float64)[:, target]
    half = len(directions)
    return (score[:half] - score[half:]) / (2 * step)


def sparse_directions(rng: np.random.Generator, activation: np.ndarray) -> np.ndarray:
    """Random directions that each move a few elements, so they test where the
    gradient sits in the map, which channel sums alone would not catch.

    Only non-zero elements move: zeros left by a ReLU tie with each other in a
    following max-pool window, where no one-sided derivative is the gradient.
    """
    live = np.flatnonzero(activation.reshape(-1))
    directions = np.zeros((FD_RANDOM_DIRECTIONS, activation.size), np.float64)
    if live.size:
        for direction in directions:
            spots = rng.choice(live, size=min(16, live.size), replace=False)
            direction[spots] = rng.standard_normal(len(spots))
    return directions.reshape((FD_RANDOM_DIRECTIONS, *activation.shape))


def finite_difference_check(
    bundle: onnx.ModelProto, images: np.ndarray, chosen: np.ndarray,
    out: dict[str, np.ndarray], entry: LayerEntry, report: Report,
) -> None:
    """Hold one layer's weights (and full gradients, where present) against float64
    differences."""
    weights_name, gradients_name = entry.output(OUTPUT_WEIGHTS), entry.output(OUTPUT_GRADIENTS)
    head_model, externals = head_in_float64(
        bundle, source_of(bundle.graph, entry.output(OUTPUT_ACTIVATIONS)))
    head = ReferenceEvaluator(head_model, new_ops=[ChannelLRN])
    values = run_with_outputs(bundle, externals, {INPUT_IMAGE: images,
                                                  INPUT_TARGET: chosen.astype(np.int64)})
    activations = values[externals[0]]
    channel_axis = Layout.of(entry.layout).channel_axis
    channels = activations.shape[channel_axis]
    spatial = activations[0].size // channels
    rng = np.random.default_rng(3)
    picked = np.sort(rng.choice(channels, size=min(FD_CHANNELS, channels), replace=False))
    full = gradients_name in out
    tolerance = FD64_TOLERANCE if full else FD_TOLERANCE
    got_w, want_w, got_g, want_g = [], [], [], []
    for n in range(len(images)):
        directions = np.zeros((len(picked),) + activations.shape[1:], np.float64)
        for j, k in enumerate(picked):
            index: list[slice | int] = [slice(None)] * 3
            index[channel_axis - 1] = int(k)
            directions[j][tuple(index)] = 1.0
        if full:
            directions = np.concatenate([directions, sparse_directions(rng, activations[n])])
        inputs = {name: values[name][n : n + 1] for name in externals}
        slopes = directional_derivatives(head, inputs, int(chosen[n]), directions)
        got_w.append(out[weights_name][n, picked])
        want_w.append(slopes[: len(picked)] / spatial)
        if full:
            grads = out[gradients_name][n].astype(np.float64)
            got_g.append([(grads * d).sum() for d in directions[len(picked):]])
            want_g.append(slopes[len(picked):])
    report.add(weights_name, np.array(got_w), np.array(want_w), tolerance)
    if got_g:
        report.add(gradients_name, np.array(got_g), np.array(want_g), tolerance)


def input_gradient_check(
    bundle: onnx.ModelProto, info: BundleInfo, images: np.ndarray, chosen: np.ndarray,
    out: dict[str, np.ndarray], report: Report,
) -> None:
    """Hold ``input_gradients`` against float64 differences of the whole body, along
    sparse and dense random directions in the model input."""
    body_model, externals = head_in_float64(bundle, info.model_input)
    body = ReferenceEvaluator(body_model, new_ops=[ChannelLRN])
    values = run_with_outputs(bundle, externals, {INPUT_IMAGE: images,
                                                  INPUT_TARGET: chosen.astype(np.int64)})
    model_input = values[externals[0]]
    gradients = Layout.of(info.layout).from_nhwc(out[OUTPUT_INPUT_GRADIENTS].astype(np.float64))
    rng = np.random.default_rng(5)
    got, want = [], []
    for n in range(len(images)):
        dense = rng.standard_normal((FD_DENSE_DIRECTIONS, *model_input.shape[1:]))
        directions = np.concatenate([sparse_directions(rng, model_input[n]), dense])
        inputs = {name: values[name][n : n + 1] for name in externals}
        want.append(directional_derivatives(body, inputs, int(chosen[n]), directions))
        got.append([(gradients[n] * d).sum() for d in directions])
    report.add(OUTPUT_INPUT_GRADIENTS, np.array(got), np.array(want), FD64_TOLERANCE)
