"""Check a finished bundle against its source before anything is written.

Logits are held against the source's own outputs. Gradients, every exported
layer's and the input gradients, are held against TF GradientTape when the
source can give them, else against float64 central differences of the bundle's
own forward graph (channel-uniform and random directions).
"""

from __future__ import annotations

import logging
import math
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
from onnxcam.exporter.shapes import OutputRunner, lean_session, random_images
from onnxcam.graph import constant_tensors, head_nodes, source_of
from onnxcam.layout import ActivationLayout, Layout, TokenGrid
from onnxcam.runtime import run_each_in_copies
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
# A float64 head run takes as many moved starts as fit this budget, counting each
# start's intermediates at HEAD_GROWTH times its own size: the reference evaluator
# keeps every intermediate tensor of a run, and a body's convolutions fan out.
FD_CHUNK_BYTES = 256 * 2**20
HEAD_GROWTH = 32


@dataclass
class Report:
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    advice: dict[str, str] = field(default_factory=dict)  # said when a tensor is refused

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
    names = [o.name for o in session.get_outputs()]
    targets = probe_targets(info.num_classes)
    feeds = {INPUT_IMAGE: images, INPUT_TARGET: targets}
    # A fixed-batch bundle runs each image among copies of itself: where its graph mixes
    # a batch's samples, that is the batch the reference and the float64 head rebuild.
    out = dict(zip(names, run_each_in_copies(session.run, names, feeds, info.batch_size)
                   if info.batch_size else session.run(names, feeds)))
    del session  # as large as the model; the float64 checks below need the room
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
    return report


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
    return float(np.abs(logits).max(initial=0.0)) / max(positions, 1)


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


class CeilMaxPool(OpRun):
    """MaxPool as the ONNX spec defines it, for 2-D NCHW maps: onnx 1.23's reference
    implementation gives padded ``ceil_mode`` windows one output too many (googlenet's
    inception branches then disagree in size and their Concat fails)."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
             pads=None, storage_order=None, strides=None):
        if x.ndim != 4 or (auto_pad not in (None, "NOTSET", b"NOTSET")):
            raise NotImplementedError("MaxPool: only 2-D maps with explicit pads")
        kh, kw = kernel_shape
        sh, sw = strides or (1, 1)
        dh, dw = dilations or (1, 1)
        top, left, bottom, right = pads or (0, 0, 0, 0)
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        rounding = np.ceil if ceil_mode else np.floor
        out_h = int(rounding((x.shape[2] + top + bottom - span_h) / sh)) + 1
        out_w = int(rounding((x.shape[3] + left + right - span_w) / sw)) + 1
        if ceil_mode:  # a last window that starts in the bottom/right padding is dropped
            out_h -= (out_h - 1) * sh >= x.shape[2] + top
            out_w -= (out_w - 1) * sw >= x.shape[3] + left
        need_h, need_w = (out_h - 1) * sh + span_h, (out_w - 1) * sw + span_w
        padded = np.full(x.shape[:2] + (max(need_h, x.shape[2] + top),
                                        max(need_w, x.shape[3] + left)), -np.inf, x.dtype)
        padded[:, :, top:top + x.shape[2], left:left + x.shape[3]] = x
        windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), (2, 3))
        windows = windows[:, :, : need_h - span_h + 1 : sh, : need_w - span_w + 1 : sw,
                          ::dh, ::dw]
        return (windows.max(axis=(4, 5)).astype(x.dtype),)


CeilMaxPool.__name__ = "MaxPool"


class WindowAveragePool(OpRun):
    """AveragePool for 2-D NCHW maps, vectorised: onnx 1.23's reference loops over
    every output element in Python (VGG's 512x7x7 pool then takes minutes)."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None,
             kernel_shape=None, pads=None, strides=None):
        if x.ndim != 4 or (auto_pad not in (None, "NOTSET", b"NOTSET")) or \
                any(d != 1 for d in dilations or ()):
            raise NotImplementedError("AveragePool: only undilated 2-D maps with explicit pads")
        pads = list(pads or (0, 0, 0, 0))
        ones = np.ones((1, 1) + x.shape[2:], x.dtype)
        # Sum over windows of zero-padded maps; divide by the elements each window covers:
        # inside the input, or also in the explicit pads (count_include_pad).
        padded_ones = np.pad(ones, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
                             constant_values=1.0 if count_include_pad else 0.0)
        total = _window_reduce(np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]),
                                          (pads[1], pads[3]))), kernel_shape, strides,
                               ceil_mode, np.sum)
        count = _window_reduce(padded_ones, kernel_shape, strides, ceil_mode, np.sum)
        return ((total / count).astype(x.dtype),)


def _window_reduce(padded: np.ndarray, kernel: list[int], strides: list[int] | None,
                   ceil_mode: int | None, reduce: object) -> np.ndarray:
    """``reduce`` over each window of an already padded map; ``ceil_mode`` windows that
    overhang the bottom or right edge take what they cover (zeros beyond)."""
    kh, kw = kernel
    sh, sw = strides or (1, 1)
    rounding = np.ceil if ceil_mode else np.floor
    out_h = int(rounding((padded.shape[2] - kh) / sh)) + 1
    out_w = int(rounding((padded.shape[3] - kw) / sw)) + 1
    if ceil_mode:  # a window must start inside the padded map
        out_h -= (out_h - 1) * sh >= padded.shape[2]
        out_w -= (out_w - 1) * sw >= padded.shape[3]
    extra_h = max(0, (out_h - 1) * sh + kh - padded.shape[2])
    extra_w = max(0, (out_w - 1) * sw + kw - padded.shape[3])
    grown = np.pad(padded, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)))
    windows = np.lib.stride_tricks.sliding_window_view(grown, (kh, kw), (2, 3))
    return reduce(windows[:, :, ::sh, ::sw][:, :, :out_h, :out_w], axis=(4, 5))  # type: ignore[operator]


WindowAveragePool.__name__ = "AveragePool"


class ExactErf(OpRun):
    """Erf in the input's precision (onnx 1.23's reference rounds it to float32, which
    puts float32 noise into every GELU of a float64 head)."""

    op_domain = ""
    _erf = np.vectorize(math.erf, otypes=[np.float64])

    def _run(self, x):
        return (self._erf(x).astype(x.dtype),)


ExactErf.__name__ = "Erf"


class ExactGelu(OpRun):
    """Gelu in the input's precision: onnx 1.23 has no reference Gelu and expands its
    function body, whose Erf is the float32 one ``ExactErf`` replaces elsewhere. That
    puts float32 noise into every MLP of a float64 transformer head, and float64
    differences of ViT-B's last block then misread its gradients by 20%."""

    op_domain = ""

    def _run(self, x, approximate=None):
        if approximate in ("tanh", b"tanh"):
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        return ((0.5 * x * (1 + ExactErf._erf(x / math.sqrt(2)))).astype(x.dtype),)


ExactGelu.__name__ = "Gelu"


class FlatMatMul(OpRun):
    """MatMul by a 2-D matrix as one 2-D product: numpy runs a stack of thin products
    ([17, 1, 768] @ [768, 2304], dynamo's ViT attention) without BLAS, 25 times slower,
    and a float64 ViT-B head then takes minutes."""

    op_domain = ""

    def _run(self, a, b):
        if a.ndim < 2 or b.ndim != 2:
            return (np.matmul(a, b),)
        flat = product(a.reshape(-1, a.shape[-1]), b)
        return (flat.reshape(*a.shape[:-1], b.shape[-1]),)


FlatMatMul.__name__ = "MatMul"


class WeightGemm(OpRun):
    """Gemm whose weight may stay float32 (``float64_head``), exact in float64."""

    op_domain = ""

    def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
        out = product(a.T if transA else a, b.T if transB else b)
        out *= 1.0 if alpha is None else alpha
        if c is not None and beta != 0:
            out = out + c * (1.0 if beta is None else beta)
        return (out.astype(a.dtype),)


WeightGemm.__name__ = "Gemm"

# Bytes of a float64 block of a float32 weight, in ``product``.
PRODUCT_BLOCK_BYTES = 64 << 20


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D arrays, in ``a``'s precision. A float32 ``b`` beside a float64
    ``a`` is widened a block of columns at a time (exactly: float32 to float64 loses
    nothing), never whole: VGG's first Dense weight is 800 MB in float64."""
    if b.dtype == a.dtype:
        return a @ np.ascontiguousarray(b)
    out = np.empty((a.shape[0], b.shape[1]), a.dtype)
    step = max(1, PRODUCT_BLOCK_BYTES // (a.itemsize * max(1, b.shape[0])))
    for first in range(0, b.shape[1], step):
        out[:, first : first + step] = a @ b[:, first : first + step].astype(a.dtype)
    return out


class ExactLayerNormalization(OpRun):
    """LayerNormalization with its statistics in the input's precision: onnx 1.23's
    reference keeps them in float32 and refuses a double ``stash_type``."""

    op_domain = ""

    def _run(self, x, scale, bias=None, axis=None, epsilon=None, stash_type=None):
        first = (-1 if axis is None else axis) % x.ndim
        axes = tuple(range(first, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        inverse = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True)
                                + (1e-5 if epsilon is None else epsilon))
        normal = (x - mean) * inverse * scale
        if bias is not None:
            normal = normal + bias
        outputs = (normal.astype(x.dtype), mean.astype(x.dtype), inverse.astype(x.dtype))
        return outputs[: len(self.onnx_node.output)]


ExactLayerNormalization.__name__ = "LayerNormalization"
REFERENCE_OPS = [ChannelLRN, CeilMaxPool, WindowAveragePool, ExactErf, ExactGelu,
                 ExactLayerNormalization, FlatMatMul, WeightGemm]


@dataclass
class Float64Head:
    """The head (``start`` -> logits) in float64, and what it reads from outside.

    Parameters, also behind Identity, Cast or Constant nodes, are computed inside
    the head from ``parameters`` (float64 arrays, fed as they are). What the graph
    computes from its input is fed: ``batched`` tensors (activations of earlier
    layers, with the batch first) are repeated for each moved copy; ``fixed`` ones
    (a shape read from the input, a value derived from one) hold at the batch they
    were computed for, so a head that reads them runs one copy at a time. The head
    of a fixed-batch bundle (``rows``) runs on a batch of copies of the image, the
    first one moved, and scores the sum over the batch: what the bundle's backward
    pass differentiates (every row's target, summed). All it reads is then fixed,
    taken from a run on those copies.
    """

    evaluator: ReferenceEvaluator
    start: str
    batched: list[str]
    invariant: list[str]  # the same at any batch size: fed as they are
    fixed: list[str]
    values: list[dict[str, np.ndarray]]  # per probe image, at batch 1 (or ``rows`` copies)
    parameters: dict[str, np.ndarray] = field(default_factory=dict)  # float64, fed as is
    rows: int = 0  # the bundle's fixed batch; 0: any

    def scores(self, image: int, moved: np.ndarray, target: int) -> np.ndarray:
        """The head's score for ``target`` at each of ``moved`` (a batch of starts)."""
        values = self.values[image]
        per_run = 1 if self.fixed or self.rows else \
            max(1, FD_CHUNK_BYTES // (8 * HEAD_GROWTH * moved[0].size))
        scores = []
        for first in range(0, len(moved), per_run):
            chunk = moved[first : first + per_run]
            if self.rows:  # one moved copy, then the unmoved ones up to the fixed batch
                unmoved = _as_float64(values[self.start])
                chunk = np.concatenate([chunk, np.repeat(unmoved, self.rows - 1, axis=0)])
            feeds = {self.start: chunk, **self.parameters}
            feeds.update({name: np.repeat(_as_float64(values[name]), len(chunk), axis=0)
                          for name in self.batched})
            feeds.update({name: _as_float64(values[name])
                          for name in self.invariant + self.fixed})
            (logits,) = self.evaluator.run(None, feeds)
            rows = np.asarray(logits, np.float64)[:, target]
            scores.append(rows.sum(keepdims=True) if self.rows else rows)
        return np.concatenate(scores)


def _as_float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype == np.float32 else array


def float64_head(bundle: onnx.ModelProto, images: np.ndarray, chosen: np.ndarray,
                 start: str = "", batch_size: int = 0) -> Float64Head:
    """The head alone (target layer, or the tensor ``start``, -> logits) in float64,
    with the values it reads from outside the head for each probe image.

    ``batch_size`` is the bundle's fixed batch (0: any): its values are then taken
    from a run on that many copies of each image, as the head will run.
    Precondition: graph sorted (a finished bundle is).
    """
    graph = bundle.graph
    start = start or source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    inside = head_nodes(graph, start, end, differentiable_only=False)
    made_inside = {o for n in inside for o in n.output}
    read = {i for n in inside for i in n.input if i and i not in made_inside and i != start}
    constant = constant_tensors(graph)
    # Nodes are told apart by their first output (protobuf wrappers have no stable id).
    wanted = {n.output[0] for n in inside} | constant_producers(graph, read & constant)
    nodes = [n for n in graph.node if n.output and n.output[0] in wanted]
    made = {o for n in nodes for o in n.output}
    initializers = {i.name for i in graph.initializer}
    outside = sorted(name for name in read if name not in constant)
    runner = OutputRunner(bundle, [start, *outside], lean=True)
    copies = batch_size or 1
    feeds = [{INPUT_IMAGE: np.repeat(images[n : n + 1], copies, axis=0),
              INPUT_TARGET: np.repeat(chosen[n : n + 1].astype(np.int64), copies)}
             for n in range(len(images))]
    values = [runner(feed) for feed in feeds]
    both = runner({INPUT_IMAGE: images[:2], INPUT_TARGET: chosen[:2].astype(np.int64)}) \
        if len(images) > 1 and not batch_size else values[0]
    del runner  # a session of the whole bundle: gone before the float64 parameters come
    used = {i for n in nodes for i in n.input if i in initializers and i not in made}
    # Parameters are fed, not stored in the head's proto: VGG's first Dense layer is
    # 800 MB in float64, and the proto and the evaluator would each hold a copy. Large
    # weights that only products read stay float32 (``product`` widens them by blocks).
    narrow = product_weights(nodes, graph)
    parameters = {i.name: numpy_helper.to_array(i) if i.name in narrow
                  else _as_float64(numpy_helper.to_array(i))
                  for i in graph.initializer if i.name in used}
    head = helper.make_graph(
        [_to_float64(n) for n in nodes], "head",
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
         for name in [start, *outside, *parameters]],
        [helper.make_tensor_value_info(end, onnx.TensorProto.DOUBLE, None)])
    model = helper.make_model(head, opset_imports=list(bundle.opset_import))
    evaluator = ReferenceEvaluator(model, new_ops=REFERENCE_OPS)
    batched, invariant, fixed = [], [], []
    for name in outside:
        one, two = values[0][name], both[name]
        if batch_size:
            fixed.append(name)  # at the bundle's batch, as every run of the head is
        elif one.ndim and two.shape[1:] == one.shape[1:] and two.shape[0] != one.shape[0]:
            batched.append(name)
        elif one.shape == two.shape and np.array_equal(one, two):
            invariant.append(name)
        else:
            fixed.append(name)  # a shape read from the input, or a batch on another axis
    for per_image in values:  # the copies' starts are one; the differences move one
        per_image[start] = per_image[start][:1]
    return Float64Head(evaluator, start, batched, invariant, fixed, values, parameters,
                       batch_size)


# A float32 weight at least this large stays float32 in the float64 head.
NARROW_WEIGHT_ELEMENTS = 1 << 20


def product_weights(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> set[str]:
    """Large 2-D float32 initializers that ``nodes`` read only as the weight of a Gemm
    or MatMul (its second input), which the float64 head multiplies by blocks."""
    large = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
             and len(i.dims) == 2 and int(np.prod(i.dims)) >= NARROW_WEIGHT_ELEMENTS}
    for node in nodes:
        for position, name in enumerate(node.input):
            if name in large and (node.op_type not in ("Gemm", "MatMul") or position != 1):
                large.discard(name)
    return large


def constant_producers(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """The first outputs of the nodes that compute the constant tensors ``names``."""
    needed, found = set(names), set()
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            found.add(node.output[0])
            needed.update(i for i in node.input if i)
    return found


def _array_to_float64(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    if array.dtype == np.float32:
        array = array.astype(np.float64)
    return numpy_helper.from_array(array, tensor.name)


def _to_float64(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attr in copy.attribute:
        # LayerNormalization's stash_type would otherwise keep its statistics in float32.
        if attr.name in ("to", "dtype", "stash_type") and attr.i == onnx.TensorProto.FLOAT:
            attr.i = onnx.TensorProto.DOUBLE
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
            attr.t.CopyFrom(_array_to_float64(attr.t))
    return copy


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
    return float(np.abs(logits).max(initial=0.0)) / max(float(per_image.max(initial=0.0)),
                                                         1e-300)


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
