"""Every CAM method against an independent numpy rendering of pytorch-grad-cam's definition.

The references read the bundle's own ``activations`` / ``gradients`` (a plain
onnxruntime session on the bundle file, not the engine), and Score-CAM's reference
runs the ORIGINAL source model (onnxruntime on the source .onnx, or Keras) on
inputs preprocessed with ``exporter.preprocess.preprocess_numpy``. Nothing from
``worker.methods`` or ``worker.maps`` is used to compute an expected value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxcam.exporter import export
from onnxcam.exporter.preprocess import preprocess_numpy
from onnxcam.worker import Explainer, Explanation

METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam"]
TARGETS = np.array([0, 3, 1, 4], np.int64)  # mixed classes, one per image; both models have 5
BATCH = len(TARGETS)


# ------------------------------------------------------------------------------ helpers


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def assert_maps_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    """Per image: |got - want| <= rtol * max|want| (+ a float32 floor)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    for n, (g, w) in enumerate(zip(got, want)):
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(g.astype(np.float64) - w).max())
        assert err <= rtol * scale, f"image {n}: max error {err:.3g} vs scale {scale:.3g}"


def bundle_outputs(path: Path, images: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """logits, activations and gradients straight from the bundle file, as NCHW float64."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    names = ["logits", "activations", "gradients"]
    values = dict(zip(names, session.run(names, {"image": images, "target": targets})))
    out = {k: v.astype(np.float64) for k, v in values.items()}
    if meta["onnxcam.activation_layout"] == "nhwc":
        for key in ("activations", "gradients"):
            out[key] = out[key].transpose(0, 3, 1, 2)
    return out


# -- pytorch-grad-cam's definitions, written out again in float64 --


def cam_of(weights: np.ndarray, acts: np.ndarray) -> np.ndarray:
    return relu((weights[:, :, None, None] * acts).sum(axis=1))


def ref_gradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return cam_of(grads.mean(axis=(2, 3)), acts)


def ref_gradcam_pp(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    g2 = grads**2
    g3 = g2 * grads
    sums = acts.sum(axis=(2, 3))[:, :, None, None]
    aij = g2 / (2 * g2 + sums * g3 + 1e-6)
    aij = np.where(grads != 0, aij, 0.0)
    return cam_of((relu(grads) * aij).sum(axis=(2, 3)), acts)


def ref_xgradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    sums = acts.sum(axis=(2, 3))[:, :, None, None]
    return cam_of((grads * acts / (sums + 1e-7)).sum(axis=(2, 3)), acts)


def ref_layercam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return relu((relu(grads) * acts).sum(axis=1))


def ref_hirescam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    return relu((grads * acts).sum(axis=1))


def ref_eigen_projection(acts: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's get_2d_projection, before the ReLU (sign as the SVD gives it)."""
    projections = []
    for a in acts:
        c, h, w = a.shape
        matrix = a.reshape(c, -1).T  # [hw, C]
        matrix = matrix - matrix.mean(axis=0)
        _, _, vt = np.linalg.svd(matrix, full_matrices=True)
        projections.append((matrix @ vt[0]).reshape(h, w))
    return np.array(projections)


GRADIENT_REFS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "gradcam": ref_gradcam,
    "gradcam++": ref_gradcam_pp,
    "xgradcam": ref_xgradcam,
    "layercam": ref_layercam,
    "hirescam": ref_hirescam,
}


def align_corners_matrix(size_out: int, size_in: int) -> np.ndarray:
    """torch.nn.UpsamplingBilinear2d along one axis, via np.interp on unit vectors."""
    positions = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    grid = np.arange(size_in)
    return np.stack([np.interp(positions, grid, np.eye(size_in)[i]) for i in range(size_in)],
                    axis=1)


def ref_scorecam(
    acts: np.ndarray, model_input: np.ndarray, layout: str, targets: np.ndarray,
    source_logits: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """ScoreCAM.get_cam_weights: masks from upsampled activations, softmax of target scores."""
    n, c = acts.shape[:2]
    height, width = (model_input.shape[2:] if layout == "nchw" else model_input.shape[1:3])
    rows = align_corners_matrix(height, acts.shape[2])
    cols = align_corners_matrix(width, acts.shape[3])
    upsampled = np.einsum("hi,nkij,wj->nkhw", rows, acts, cols)
    lows = upsampled.min(axis=(2, 3), keepdims=True)
    highs = upsampled.max(axis=(2, 3), keepdims=True)
    masks = (upsampled - lows) / (highs - lows + 1e-8)
    scores = np.zeros((n, c))
    for i in range(n):
        if layout == "nchw":
            masked = model_input[i][None] * masks[i][:, None]
        else:
            masked = model_input[i][None] * masks[i][..., None]
        scores[i] = source_logits(masked.astype(np.float32))[:, targets[i]]
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights = shifted / shifted.sum(axis=1, keepdims=True)
    return cam_of(weights, acts)


def ref_normalize(raw: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image before the resize."""
    out = raw - raw.min(axis=(1, 2), keepdims=True)
    return out / (1e-7 + out.max(axis=(1, 2), keepdims=True))


def ref_resize_half_pixel(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize(..., INTER_LINEAR) one output pixel at a time (edge samples clamped)."""
    n, h, w = maps.shape
    out = np.zeros((n, height, width))

    def source(i: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        s = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1.0)
        low = int(np.floor(s))
        return low, min(low + 1, size_in - 1), s - low

    for y in range(height):
        y0, y1, fy = source(y, h, height)
        for x in range(width):
            x0, x1, fx = source(x, w, width)
            top = (1 - fx) * maps[:, y0, x0] + fx * maps[:, y0, x1]
            bottom = (1 - fx) * maps[:, y1, x0] + fx * maps[:, y1, x1]
            out[:, y, x] = (1 - fy) * top + fy * bottom
    return out


# ------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One analytic bundle, a batch of images and everything the references need."""

    bundle: Path
    explainer: Explainer
    images: np.ndarray  # uint8 NHWC at the bundle's size
    layout: str  # the source model's input layout
    preprocess: str
    source_logits: Callable[[np.ndarray], np.ndarray]  # preprocessed input -> logits
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    results: dict[str, Explanation] = field(default_factory=dict)

    def explain(self, method: str) -> Explanation:
        if method not in self.results:
            self.results[method] = self.explainer.explain(self.images, TARGETS, method=method)
        return self.results[method]

    def model_input(self) -> np.ndarray:
        x = preprocess_numpy(self.images, self.preprocess).astype(np.float64)
        return x.transpose(0, 3, 1, 2) if self.layout == "nchw" else x


def random_images(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (BATCH, *shape), dtype=np.uint8)


def make_case(bundle: Path, layout: str, preprocess: str,
              source_logits: Callable[[np.ndarray], np.ndarray], seed: int) -> Case:
    explainer = Explainer(bundle, device="cpu")
    info = explainer.info
    images = random_images((info.height, info.width, info.channels), seed)
    case = Case(bundle, explainer, images, layout, preprocess, source_logits)
    case.outputs = bundle_outputs(bundle, images, TARGETS)
    return case


@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """``models.onnx_cnn`` (NCHW, softmax head) with torch preprocessing, analytic bundle."""
    folder = tmp_path_factory.mktemp("methods_onnx")
    source = folder / "onnx_cnn.onnx"
    onnx.save(models.onnx_cnn(), str(source))
    bundle = folder / "onnx_cnn.bundle.onnx"
    result = export(source, bundle, preprocess="torch")
    assert result.info.gradient == "analytic" and result.info.layout == "nchw"

    # The source model's own pre-softmax scores: expose its ``logits`` tensor as an output.
    scoring = onnx.load(str(source))
    scoring.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                                              ["N", 5]))
    session = ort.InferenceSession(scoring.SerializeToString(),
                                   providers=["CPUExecutionProvider"])

    def source_logits(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input": x.astype(np.float32)})[0].astype(np.float64)

    return make_case(bundle, "nchw", "torch", source_logits, seed=1)


@pytest.fixture(scope="module")
def keras_case(residual_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """``models.residual_bn`` (NHWC, BN, softmax head), analytic bundle at ``block2_out``."""
    import keras

    bundle = tmp_path_factory.mktemp("methods_keras") / "residual.bundle.onnx"
    result = export(residual_path, bundle)
    assert result.info.gradient == "analytic" and result.info.layout == "nhwc"
    model = keras.models.load_model(residual_path)

    def source_logits(x: np.ndarray) -> np.ndarray:
        return models.logits(model, x.astype(np.float32)).astype(np.float64)

    case = make_case(bundle, "nhwc", "unit", source_logits, seed=2)
    case.keras_model = model  # type: ignore[attr-defined]
    return case


CASES = ["onnx_case", pytest.param("keras_case", marks=pytest.mark.tf)]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("method", list(GRADIENT_REFS))
def test_gradient_methods_match_pytorch_grad_cam(case: Case, method: str) -> None:
    acts, grads = case.outputs["activations"], case.outputs["gradients"]
    want = GRADIENT_REFS[method](acts, grads)
    got = case.explain(method)
    assert got.method == method
    assert got.raw.dtype == np.float32
    assert got.raw.shape == (BATCH, *acts.shape[2:])
    assert (got.raw >= 0).all()
    assert float(want.max()) > 0, "degenerate case: every reference map is zero"
    assert_maps_close(got.raw, want)
    np.testing.assert_array_equal(got.targets, TARGETS)
    np.testing.assert_allclose(got.logits, case.outputs["logits"], rtol=1e-5, atol=1e-5)


def test_eigencam_matches_first_principal_component_up_to_sign(case: Case) -> None:
    projection = ref_eigen_projection(case.outputs["activations"])
    got = case.explain("eigencam").raw
    assert got.shape == projection.shape and got.dtype == np.float32
    for n in range(BATCH):
        candidates = [relu(projection[n]), relu(-projection[n])]
        errors = [float(np.abs(got[n] - c).max()) for c in candidates]
        best = int(np.argmin(errors))
        assert float(candidates[best].max()) > 0
        assert_maps_close(got[n][None], candidates[best][None], rtol=1e-4)


def test_eigencam_ignores_the_target(case: Case) -> None:
    other = case.explainer.explain(case.images, (TARGETS + 1) % 5, method="eigencam")
    np.testing.assert_array_equal(other.raw, case.explain("eigencam").raw)


def test_scorecam_matches_pytorch_grad_cam_with_the_source_model(case: Case) -> None:
    want = ref_scorecam(case.outputs["activations"], case.model_input(), case.layout, TARGETS,
                        case.source_logits)
    got = case.explain("scorecam")
    assert got.raw.dtype == np.float32 and got.raw.shape == want.shape
    assert float(want.max()) > 0
    assert_maps_close(got.raw, want, rtol=2e-4)


def test_scorecam_reference_uses_the_same_logits_as_the_bundle(case: Case) -> None:
    """The source model, fed the preprocessed images, reproduces the bundle's logits."""
    np.testing.assert_allclose(case.source_logits(case.model_input()), case.outputs["logits"],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_heatmaps_are_normalised_raw_resized_half_pixel(case: Case, method: str) -> None:
    got = case.explain(method)
    info = case.explainer.info
    assert got.heatmaps.dtype == np.float32
    assert got.heatmaps.shape == (BATCH, info.height, info.width)
    assert got.heatmaps.min() >= 0.0 and got.heatmaps.max() <= 1.0
    want = np.clip(ref_resize_half_pixel(ref_normalize(got.raw.astype(np.float64)),
                                         info.height, info.width), 0, 1)
    np.testing.assert_allclose(got.heatmaps, want, atol=2e-6)


def test_top1_default_explains_the_argmax(case: Case) -> None:
    got = case.explainer.explain(case.images, None, method="gradcam")
    np.testing.assert_array_equal(got.targets, got.logits.argmax(axis=1))
    top1 = bundle_outputs(case.bundle, case.images, np.full(BATCH, -1, np.int64))
    assert_maps_close(got.raw, ref_gradcam(top1["activations"], top1["gradients"]))


def test_onnx_gradients_match_the_head_analytically(onnx_case: Case) -> None:
    """onnx_cnn's head is GAP -> Gemm: d logit_t / d A[c, i, j] = W[t, c] / (h * w)."""
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in models.onnx_cnn().graph.initializer}
    fc = weights["fc.weight"].astype(np.float64)  # [K, C]
    grads = onnx_case.outputs["gradients"]
    h, w = grads.shape[2:]
    want = np.broadcast_to(fc[TARGETS][:, :, None, None] / (h * w), grads.shape)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-8)


@pytest.mark.tf
def test_keras_gradcam_matches_gradient_tape(keras_case: Case) -> None:
    import keras
    import tensorflow as tf

    model = keras_case.keras_model  # type: ignore[attr-defined]
    info = keras_case.explainer.info
    head = model.get_layer("predictions")
    layer = model.get_layer(info.target_layer)
    tapped = keras.Model(model.inputs, [layer.output, model.output])
    x = tf.constant(preprocess_numpy(keras_case.images, "unit"))
    saved = head.activation
    head.activation = keras.activations.linear
    try:
        with tf.GradientTape() as tape:
            acts, logits = tapped(x, training=False)
            score = tf.reduce_sum(tf.gather(logits, TARGETS, axis=1, batch_dims=1))
        grads = tape.gradient(score, acts)
    finally:
        head.activation = saved
    acts = np.asarray(acts, np.float64)  # NHWC
    grads = np.asarray(grads, np.float64)
    want = relu((grads.mean(axis=(1, 2))[:, None, None, :] * acts).sum(axis=-1))
    assert float(want.max()) > 0
    got = keras_case.explain("gradcam")
    assert_maps_close(got.raw, want, rtol=1e-4)
    np.testing.assert_allclose(got.logits, np.asarray(logits), rtol=1e-4, atol=1e-4)
    # the bundle's full gradient map is the tape's too
    assert_maps_close(keras_case.outputs["gradients"].transpose(0, 2, 3, 1).reshape(BATCH, -1)
                      [:, None], grads.reshape(BATCH, -1)[:, None], rtol=1e-4)
