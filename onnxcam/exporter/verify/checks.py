"""The checks of a finished bundle against its source, before anything is written.

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

from onnxcam.bundle import (
    DECODED_OUTPUTS,
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_ACTIVATIONS,
    OUTPUT_CAM,
    OUTPUT_DETECTION_LABELS,
    OUTPUT_DETECTION_SCORES,
    OUTPUT_DETECTION_SOURCE,
    OUTPUT_DETECTIONS,
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
from onnxcam.exporter.shapes import lean_session, random_images
from onnxcam.exporter.verify.float64_head import Float64Head, class_scores, float64_head
from onnxcam.graph import sized_by_data, source_of
from onnxcam.layout import ActivationLayout, Layout, TokenGrid
from onnxcam.runtime import RunFn, run_each_in_copies
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
# Input gradients cross every layer of the body: two float32 computations that differ
# in the last bit put some of a deep net's ReLU inputs (and max-pool ties) on opposite
# sides, and each such flip moves a few input pixels by the size of the gradient
# itself. So they are judged in norm (per image, relative L2), not by the worst pixel,
# and against what float32 rounding alone does to the reference: TF's own input
# gradients after moving every input value by one ulp (``rounding_noise``). A defect
# moves the gradient by far more than either. Measured figures are in the README.
INPUT_GRADIENT_TOLERANCE = 1e-3  # relative L2, the least the tolerance is
ROUNDING_MARGIN = 10  # tolerance: this many times the rounding noise, where larger
PROBE_BATCH = 2
# A two-stage detector's scores per proposal: float32 rounding alone moves them by
# 1.7e-4 (Faster R-CNN's, between onnxruntime's optimized and plain runs of the
# source: its boxes move the RoiAlign samples), a wrong row by 0.1 and more.
PROPOSAL_TOLERANCE = 1e-3
# Logits that differ by less than this (relative to their size) over the probe images
# are taken as constant. Different random images move any live classifier's logits by
# orders of magnitude more; a zero-initialised head (torchvision's ViT) moves them by 0.
CONSTANT_LOGITS_TOLERANCE = 1e-6
CONSTANT_LOGITS_WARNING = ("the logits do not depend on the input: every map will be empty; "
                           "was the head initialised?")


@dataclass
class Report:
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    advice: dict[str, str] = field(default_factory=dict)  # said when a tensor is refused
    # The logits were the same for every probe image: verification passes (zero
    # gradients match zero gradients), yet every map is empty.
    constant_logits: bool = False

    def add(self, name: str, actual: np.ndarray, expected: np.ndarray, tolerance: float,
            floor: float = 0.0) -> None:
        """Record max |actual - expected| over max(max |expected|, ``floor``)."""
        self.errors[name] = relative_error(actual, expected, floor)
        self.tolerances[name] = tolerance

    @property
    def worst(self) -> tuple[str, float, float]:
        name = max(self.errors, key=lambda n: self.errors[n] / max(self.tolerances[n], 1e-300))
        return name, self.errors[name], self.tolerances[name]

    @property
    def ok(self) -> bool:
        return all(self.errors[n] <= self.tolerances[n] for n in self.errors)


def relative_error(actual: np.ndarray, expected: np.ndarray, floor: float = 0.0) -> float:
    """max |a - e| over max(max |e|, ``floor``): scale-free and robust to tiny entries.

    ``floor`` is the size of the quantity implied by the logits (``gradient_scale``),
    so a correct map far smaller than that is not judged on its rounding alone.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(float(np.abs(expected).max(initial=0.0)), floor, 1e-12)
    return float(np.abs(actual - expected).max(initial=0.0)) / scale


def norm_error(actual: np.ndarray, expected: np.ndarray, floor: float = 0.0) -> float:
    """The worst image's ||actual - expected|| over max(||expected||, ``floor`` times the
    root of its size): ``relative_error`` in L2, for a whole image's gradient."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    worst = 0.0
    for got, want in zip(actual, expected):
        scale = max(float(np.linalg.norm(want)), floor * np.sqrt(want.size), 1e-12)
        worst = max(worst, float(np.linalg.norm(got - want)) / scale)
    return worst


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


def as_layout(layout: ActivationLayout | str) -> ActivationLayout:
    """A layer's layout: a token grid as it is, a string as a Layout."""
    return layout if isinstance(layout, TokenGrid) else Layout.of(layout)


def cam_from(activations: np.ndarray, weights: np.ndarray,
             layout: ActivationLayout | str) -> np.ndarray:
    """Grad-CAM in numpy: ReLU(sum_k weights[n, k] * activations[n, k]), [N, h, w], over
    a token layer's grid only."""
    maps = as_layout(layout).to_nchw(activations)
    return np.maximum(np.einsum("nchw,nc->nhw", maps, weights), 0)


def channel_mean(gradients: np.ndarray, layout: ActivationLayout | str) -> np.ndarray:
    """Grad-CAM's weights: each channel's mean gradient over the map (or the grid)."""
    return as_layout(layout).to_nchw(gradients).mean(axis=(2, 3))


def probe_targets(logits_count: int) -> np.ndarray:
    return np.array([-1, logits_count - 1] + [-1] * (PROBE_BATCH - 2), np.int64)[:PROBE_BATCH]


def verify_bundle(bundle: onnx.ModelProto, info: BundleInfo, source: SourceModel) -> Report:
    """Run the bundle on a probe batch and compare it with the source; raise on mismatch.

    Every exported layer is checked, and ``input_gradients`` where the bundle has
    them. ``guided_input_gradients`` are no derivative, so nothing here can check
    them; the tests hold them against a TF custom-gradient ReLU.
    """
    images = random_images(PROBE_BATCH, info.height, info.width, info.channels, seed=7)
    session = lean_session(bundle)  # its weights once: verify holds the source too
    names = [o.name for o in session.get_outputs() if o.name not in DECODED_OUTPUTS]
    proposals = sized_by_data(bundle.graph, source_of(bundle.graph, OUTPUT_LOGITS))
    if info.output == OUTPUT_DETECTIONS:
        sources_check(session.run, images)
    if proposals:  # rows per proposal, as many as each image has: one image
        images = images[:1]
    targets = probe_targets(info.num_classes)
    feeds = {INPUT_IMAGE: images, INPUT_TARGET: targets}
    # A fixed-batch bundle runs each image among copies of itself: where its graph mixes
    # a batch's samples, that is the batch the reference and the float64 head rebuild.
    out = dict(zip(names, run_each_in_copies(session.run, names, feeds, info.batch_size)
                   if info.batch_size else session.run(names, feeds)))
    del session  # as large as the model; the float64 checks below need the room
    chosen = np.where(targets < 0, class_scores(out[OUTPUT_LOGITS]).argmax(axis=1), targets)
    with_input = OUTPUT_INPUT_GRADIENTS in info.input_gradients
    reference = source.reference(preprocess_numpy(images, info.preprocess), chosen,
                                 **({"input_gradients": True} if with_input else {}))

    report = Report()
    logits = out[OUTPUT_LOGITS]
    # One image (proposals) has no second to differ from.
    report.constant_logits = len(logits) > 1 and logits_are_constant(logits)
    compared = logits if reference.linear else squash(logits, info.removed_activation)
    if proposals:
        add_proposal_logits(report, compared, reference.logits)
    else:
        report.add("logits", compared, reference.logits, EXACT_TOLERANCE)
    layers = sorted(info.layers, key=lambda entry: entry.index)
    if reference.gradients is not None and reference.activations is not None:
        pairs = [(reference.activations, reference.gradients), *reference.more]
        for entry, (activations, gradients) in zip(layers, pairs):
            tape_check(out, entry, activations, gradients, info.has_gradients, report)
        if with_input and reference.input_gradients is not None:
            input_gradient_tape_check(source, preprocess_numpy(images, info.preprocess),
                                      chosen, out, reference.input_gradients, report)
            if report.errors[OUTPUT_INPUT_GRADIENTS] > report.tolerances[OUTPUT_INPUT_GRADIENTS]:
                # TF's own float32 input gradients are at times the ones off: DenseNet121's
                # were 2.2e-3 from a float64 run of the same model in one process and
                # 6.6e-7 in another (the bundle's: 5e-7 in both). The forward graph has
                # just matched TF, so float64 differences of it say which is right.
                log.info("verification: input gradients %.2e from TF's; judging them by "
                         "float64 differences of the forward graph instead",
                         report.errors[OUTPUT_INPUT_GRADIENTS])
                input_gradient_check(bundle, info, images, chosen, out, report)
    else:
        for entry in layers:
            finite_difference_check(bundle, images, chosen, out, entry, report,
                                    info.batch_size)
            cam = entry.output(OUTPUT_CAM)
            activations = out[entry.output(OUTPUT_ACTIVATIONS)]
            report.add(cam, out[cam], cam_from(activations, out[entry.output(OUTPUT_WEIGHTS)],
                                               entry.activation_layout),
                       EXACT_TOLERANCE, floor=cam_scale(logits, out[cam]))
        if with_input:
            input_gradient_check(bundle, info, images, chosen, out, report)
    name, error, tolerance = report.worst
    log.info("verification: worst %s relative error %.2e (tolerance %.0e)", name, error,
             tolerance)
    if not report.ok:
        raise VerificationError(
            f"bundle disagrees with its source: worst tensor {name!r}, relative error "
            f"{error:.3e} > {tolerance:.0e}{report.advice.get(name, '')}"
        )
    if report.constant_logits:
        log.warning(CONSTANT_LOGITS_WARNING)
    return report


def nearest_rows(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per row of ``reference`` [1, K, R], the row of ``logits`` [1, K, R'] nearest to
    it (the largest difference over the classes)."""
    got, want = logits[0].T, reference[0].T
    return np.concatenate([
        np.abs(want[first : first + 64, None] - got[None]).max(axis=2).argmin(axis=1)
        for first in range(0, len(want), 64)]).astype(np.int64)


def add_proposal_logits(report: Report, logits: np.ndarray, reference: np.ndarray) -> None:
    """A two-stage detector's logits [1, K, R] against the reference's as sets of
    rows: each row of either has a near row in the other (proposals whose objectness
    ties to rounding leave the model's TopK in either order), and both hold as many."""
    if logits.shape != reference.shape:
        report.add("logits", logits, reference, PROPOSAL_TOLERANCE)  # shapes: refused
        return
    forward = relative_error(logits[:, :, nearest_rows(logits, reference)], reference)
    backward = relative_error(logits, reference[:, :, nearest_rows(reference, logits)])
    report.errors["logits"] = max(forward, backward)
    report.tolerances["logits"] = PROPOSAL_TOLERANCE


def sources_check(run: RunFn, images: np.ndarray) -> None:
    """A detector that decodes its own, run on each image alone (its detections'
    counts differ): each detection's source entry of the logits (class s mod K, anchor
    s div K) holds its score, bit for bit, and its class is the detection's label; else
    the traced picking is not the model's."""
    names = [OUTPUT_LOGITS, OUTPUT_DETECTION_SCORES, OUTPUT_DETECTION_LABELS,
             OUTPUT_DETECTION_SOURCE]
    checked = 0
    for image in images:
        logits, scores, labels, sources = run(names, {
            INPUT_IMAGE: image[None], INPUT_TARGET: np.full(1, -1, np.int64)})
        classes, anchors = sources[0] % logits.shape[1], sources[0] // logits.shape[1]
        wrong = (logits[0, classes, anchors] != scores[0]) | (classes != labels[0])
        if wrong.any():
            raise VerificationError(
                f"{int(wrong.sum())} of {wrong.size} detections are not the logits entry "
                "their traced source names (the score or the class differs): the graph "
                "picks its detections in a way onnxcam does not follow")
        checked += wrong.size
    log.info("verification: %d detections' sources hold their scores", checked)


def logits_are_constant(logits: np.ndarray) -> bool:
    """Whether every image of the batch got the same logits, to within float32 rounding
    (all zeros included)."""
    logits = np.asarray(logits, np.float64)
    spread = float(np.ptp(logits, axis=0).max(initial=0.0)) if len(logits) else 0.0
    scale = float(np.abs(logits).max(initial=0.0))
    return spread <= CONSTANT_LOGITS_TOLERANCE * scale


def input_gradient_tape_check(
    source: SourceModel, model_input: np.ndarray, chosen: np.ndarray,
    out: dict[str, np.ndarray], expected: np.ndarray, report: Report,
) -> None:
    """``input_gradients`` against the source's (TF GradientTape), in norm, with a
    tolerance of ``ROUNDING_MARGIN`` times what float32 rounding alone does to them."""
    floor = gradient_scale(out[OUTPUT_LOGITS], model_input)
    noise = rounding_noise(source, model_input, chosen, expected, floor)
    name = OUTPUT_INPUT_GRADIENTS
    report.errors[name] = norm_error(out[name], expected, floor)
    report.tolerances[name] = max(INPUT_GRADIENT_TOLERANCE, ROUNDING_MARGIN * noise)
    log.info("verification: input gradients %.2e from the source's in norm; float32 "
             "rounding alone moves the source's own by %.2e", report.errors[name], noise)
    report.advice[name] = (
        f" (relative L2 norm; moving the input by one ulp moves the source's own input "
        f"gradients by {noise:.1e}). Export without --input-gradients and --guided for "
        f"Grad-CAM alone, or with --no-verify to skip the check")


def rounding_noise(source: SourceModel, model_input: np.ndarray, chosen: np.ndarray,
                   expected: np.ndarray, floor: float) -> float:
    """How far the source's own input gradients move when every input value moves by
    one ulp, up or down at random: the scale of float32 rounding alone, which two
    correct computations in different orders can differ by."""
    rng = np.random.default_rng(11)
    away = np.where(rng.random(model_input.shape) < 0.5, -np.inf, np.inf)
    moved = np.nextafter(model_input.astype(np.float32), away.astype(np.float32))
    again = source.reference(moved, chosen, input_gradients=True).input_gradients
    return 0.0 if again is None else norm_error(again, expected, floor)


def tape_check(
    out: dict[str, np.ndarray], entry: LayerEntry, activations: np.ndarray,
    gradients: np.ndarray, analytic: bool, report: Report,
) -> None:
    """One layer's outputs against the source's own activations and gradients."""
    layout = entry.activation_layout
    report.add(entry.output(OUTPUT_ACTIVATIONS), out[entry.output(OUTPUT_ACTIVATIONS)],
               activations, EXACT_TOLERANCE)
    expected_weights = channel_mean(gradients, layout)
    tolerance = EXACT_TOLERANCE if analytic else FD_TOLERANCE
    scale = gradient_scale(out[OUTPUT_LOGITS], activations)
    if analytic:
        report.add(entry.output(OUTPUT_GRADIENTS), out[entry.output(OUTPUT_GRADIENTS)],
                   gradients, tolerance, floor=scale)
    report.add(entry.output(OUTPUT_WEIGHTS), out[entry.output(OUTPUT_WEIGHTS)],
               expected_weights, tolerance, floor=scale)
    cam = out[entry.output(OUTPUT_CAM)]
    report.add(entry.output(OUTPUT_CAM), cam, cam_from(activations, expected_weights, layout),
               tolerance, floor=cam_scale(out[OUTPUT_LOGITS], cam))


def cam_scale(logits: np.ndarray, cam: np.ndarray) -> float:
    """The size below which a cam is noise: the logits' magnitude spread over the map
    (a cam sums weight times activation, as a logit sums them over the map too)."""
    positions = cam[0].size if cam.ndim > 1 else 1
    return float(np.abs(class_scores(logits)).max(initial=0.0)) / max(positions, 1)


@dataclass
class Slopes:
    """Float64 differences of the head along directions, and which of them to trust.

    ``kink`` marks directions whose forward and backward differences disagree: the
    step crossed a kink (a ReLU at zero, a near-tie in a MaxPool window that float32
    and float64 break differently), where no single slope is the gradient.
    """

    central: np.ndarray
    kink: np.ndarray


def directional_derivatives(
    head: Float64Head, image: int, target: int, directions: np.ndarray, scale: float,
) -> Slopes:
    """d score / d start along each direction, from float64 differences.

    In float64 a tiny step is both exact for piecewise-linear heads (it crosses no
    kink) and free of rounding. ``scale`` is the size below which a slope counts as
    zero (see ``gradient_scale``); forward and backward differences further apart
    than the tolerance of that, or of the slope, mark a kink.
    """
    activation = head.values[image][head.start].astype(np.float64)
    step = FD_STEP * (float(np.abs(activation).mean()) + 1e-300)
    moved = np.concatenate([activation, activation + step * directions,
                            activation - step * directions])
    score = head.scores(image, moved, target)
    half = len(directions)
    forward = (score[1 : half + 1] - score[0]) / step
    backward = (score[0] - score[half + 1 :]) / step
    central = (forward + backward) / 2
    size = np.maximum(np.abs(central), scale * np.abs(directions).reshape(half, -1).sum(axis=1))
    return Slopes(central, np.abs(forward - backward) > FD64_TOLERANCE * size)


def gradient_scale(logits: np.ndarray, activations: np.ndarray) -> float:
    """The size below which a gradient with respect to ``activations`` is noise.

    Moving every element of the layer by its own size, a gradient error this small
    moves the logits by no more than their own magnitude: max |logit| over the
    largest sum |activation| of a probe image. A map of 1e-13 whose logits are set by
    the biases (googlenet's initial weights) is then judged on that scale, while a
    trained net's gradients sit well above it.
    """
    per_image = np.abs(activations.astype(np.float64)).reshape(len(activations), -1).sum(axis=1)
    largest = float(np.abs(class_scores(logits)).max(initial=0.0))
    return largest / max(float(per_image.max(initial=0.0)), 1e-300)


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


def channel_directions(picked: np.ndarray, shape: tuple[int, ...], channel_axis: int
                       ) -> np.ndarray:
    """One direction per picked channel: that channel moved uniformly, [k, *shape]."""
    directions = np.zeros((len(picked), *shape), np.float64)
    for j, k in enumerate(picked):
        index: list[slice | int] = [slice(None)] * len(shape)
        index[channel_axis - 1] = int(k)
        directions[j][tuple(index)] = 1.0
    return directions


def finite_difference_check(
    bundle: onnx.ModelProto, images: np.ndarray, chosen: np.ndarray,
    out: dict[str, np.ndarray], entry: LayerEntry, report: Report, batch_size: int = 0,
) -> None:
    """Hold one layer's weights (and full gradients, where present) against float64
    differences, leaving out directions that straddle a kink."""
    weights_name, gradients_name = entry.output(OUTPUT_WEIGHTS), entry.output(OUTPUT_GRADIENTS)
    head = float64_head(bundle, images, chosen,
                        source_of(bundle.graph, entry.output(OUTPUT_ACTIVATIONS)), batch_size)
    activations = out[entry.output(OUTPUT_ACTIVATIONS)]
    scale = gradient_scale(out[OUTPUT_LOGITS], activations)
    layout = entry.activation_layout
    channel_axis = layout.channel_axis
    channels = activations.shape[channel_axis]
    # Grad-CAM's weights average over the map: a token layer's grid, not its leading tokens.
    spatial = layout.height * layout.width if isinstance(layout, TokenGrid) else \
        activations[0].size // channels
    rng = np.random.default_rng(3)
    picked = np.sort(rng.choice(channels, size=min(FD_CHANNELS, channels), replace=False))
    full = gradients_name in out
    tolerance = FD64_TOLERANCE if full else FD_TOLERANCE
    weights, gradients = Comparison(), Comparison()
    for n in range(len(images)):
        start = head.values[n][head.start]
        directions = channel_directions(picked, start.shape[1:], channel_axis)
        if isinstance(layout, TokenGrid):
            directions[:, : layout.leading] = 0  # move the grid's tokens only
        if full:
            directions = np.concatenate([directions, sparse_directions(rng, start[0])])
        slopes = directional_derivatives(head, n, int(chosen[n]), directions, scale)
        along = slice(len(picked))
        # A channel's weight is its mean gradient: its uniform slope over the spatial size.
        weights.add(out[weights_name][n, picked], slopes.central[along] / spatial,
                    slopes.kink[along])
        if full:
            rest = slice(len(picked), None)
            sparse = directions[rest]
            grads = out[gradients_name][n].astype(np.float64)
            weights_of = np.abs(sparse).reshape(len(sparse), -1).sum(axis=1)
            # Per unit of |direction|, so that one scale fits every direction.
            gradients.add([(grads * d).sum() / w for d, w in zip(sparse, weights_of)],
                          slopes.central[rest] / weights_of, slopes.kink[rest])
    weights.report(report, weights_name, tolerance, scale)
    if full:
        gradients.report(report, gradients_name, tolerance, scale)


@dataclass
class Comparison:
    """Bundle values against float64 slopes, gathered over images; kinks left out."""

    got: list[float] = field(default_factory=list)
    want: list[float] = field(default_factory=list)
    kink: list[bool] = field(default_factory=list)

    def add(self, got: np.ndarray | list[float], want: np.ndarray, kink: np.ndarray) -> None:
        self.got.extend(float(g) for g in np.asarray(got, np.float64))
        self.want.extend(float(w) for w in want)
        self.kink.extend(bool(k) for k in kink)

    def report(self, report: Report, name: str, tolerance: float, scale: float) -> None:
        kink = np.array(self.kink, bool)
        if 2 * kink.sum() > len(kink):
            # Most directions at kinks says the step, not the head, is at fault: compare
            # them all, as strictly as before, rather than check next to nothing.
            log.warning("verification: %d of %d directions for %s straddle a kink; "
                        "comparing all of them", kink.sum(), len(kink), name)
            kink[:] = False
        elif kink.any():
            log.info("verification: %d of %d directions for %s straddle a kink; left out",
                     kink.sum(), len(kink), name)
        report.add(name, np.array(self.got)[~kink], np.array(self.want)[~kink], tolerance,
                   floor=scale)


def input_gradient_check(
    bundle: onnx.ModelProto, info: BundleInfo, images: np.ndarray, chosen: np.ndarray,
    out: dict[str, np.ndarray], report: Report,
) -> None:
    """Hold ``input_gradients`` against float64 differences of the whole body, along
    sparse and dense random directions in the model input."""
    body = float64_head(bundle, images, chosen, info.model_input, info.batch_size)
    model_input = np.concatenate([values[body.start] for values in body.values])
    scale = gradient_scale(out[OUTPUT_LOGITS], model_input)
    gradients = Layout.of(info.layout).from_nhwc(out[OUTPUT_INPUT_GRADIENTS].astype(np.float64))
    rng = np.random.default_rng(5)
    comparison = Comparison()
    for n in range(len(images)):
        dense = rng.standard_normal((FD_DENSE_DIRECTIONS, *model_input.shape[1:]))
        directions = np.concatenate([sparse_directions(rng, model_input[n]), dense])
        slopes = directional_derivatives(body, n, int(chosen[n]), directions, scale)
        size = np.abs(directions).reshape(len(directions), -1).sum(axis=1)
        comparison.add([(gradients[n] * d).sum() / w for d, w in zip(directions, size)],
                       slopes.central / size, slopes.kink)
    comparison.report(report, OUTPUT_INPUT_GRADIENTS, FD64_TOLERANCE, scale)
