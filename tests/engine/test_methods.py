"""Every CAM method against an independent numpy rendering of pytorch-grad-cam's definition.

The references (``cam_references``) read the bundle's own ``activations`` /
``gradients`` (a plain onnxruntime session on the bundle file, not the engine), and
Score-CAM's reference runs the ORIGINAL source model (onnxruntime on the source
.onnx, or Keras) on inputs preprocessed with ``exporter.preprocess.preprocess_numpy``.
Nothing from ``worker.methods`` or ``worker.maps`` is used to compute an expected
value. Mutation tests break one formula at a time and check that the comparison
with its reference then fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnx
import pytest
from cam_references import (
    EIGEN_TERMS,
    GRADIENT_REFS,
    assert_maps_close,
    assert_projection_close,
    bundle_outputs,
    ref_eigen_projection,
    ref_fem,
    ref_gradcam,
    ref_kpca,
    ref_normalize,
    ref_resize_half_pixel,
    ref_scorecam,
    relu,
    source_outputs,
)

from onnxcam.engine import Explainer, Explanation
from onnxcam.engine.methods import METHODS as METHODS_BY_NAME
from onnxcam.engine.methods import ChannelWeightCam, MethodContext
from onnxcam.engine.methods import scorecam as scorecam_module
from onnxcam.engine.methods.fem import FEM
from onnxcam.engine.methods.gradcam_elementwise import GradCAMElementWise
from onnxcam.engine.methods.gradcam_plus_plus import GradCAMPlusPlus
from onnxcam.engine.methods.xgradcam import XGradCAM
from onnxcam.errors import BadMethodError
from onnxcam.exporter import export
from onnxcam.exporter.preprocess import preprocess_numpy

METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise",
           "eigencam", "eigengradcam", "fem", "kpca-cam", "randomcam", "scorecam"]
TARGETS = np.array([0, 3, 1, 4], np.int64)  # mixed classes, one per image; both models have 5
BATCH = len(TARGETS)


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

    # The source model's own pre-softmax scores: its inner ``logits`` tensor.
    scoring = source_outputs(onnx.load(str(source)), ["logits"])
    return make_case(bundle, "nchw", "torch", lambda x: scoring(x)[0], seed=1)


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
    assert_projection_close(got, projection)


def test_eigengradcam_matches_first_principal_component_of_the_product_up_to_sign(
        case: Case) -> None:
    acts, grads = case.outputs["activations"], case.outputs["gradients"]
    projection = ref_eigen_projection(grads * acts)
    got = case.explain("eigengradcam").raw
    assert got.shape == projection.shape and got.dtype == np.float32
    assert_projection_close(got, projection)  # each image's sign is its SVD's
    other = case.explainer.explain(case.images, (TARGETS + 1) % 5, method="eigengradcam")
    assert not np.allclose(other.raw, got)  # unlike Eigen-CAM, the target matters


def test_fem_matches_its_definition_and_ignores_the_target(case: Case) -> None:
    want = ref_fem(case.outputs["activations"])
    got = case.explain("fem").raw
    assert float(want.max()) > 0
    assert_maps_close(got, want)
    other = case.explainer.explain(case.images, (TARGETS + 1) % 5, method="fem").raw
    np.testing.assert_array_equal(other, got)


def test_kpca_cam_matches_scikit_learns_kernel_pca(case: Case) -> None:
    """Its sign is scikit-learn's (the largest entry positive), so no choice is left."""
    want = relu(ref_kpca(case.outputs["activations"]))
    got = case.explain("kpca-cam").raw
    assert float(want.max()) > 0
    assert_maps_close(got, want)
    other = case.explainer.explain(case.images, (TARGETS + 1) % 5, method="kpca-cam").raw
    np.testing.assert_array_equal(other, got)


def test_randomcam_weighs_channels_by_each_images_own_draw(case: Case) -> None:
    """Image i's weights: default_rng([seed, i]).uniform(-1, 1, C), whatever the
    batching; another seed draws others."""
    acts = case.outputs["activations"]
    weights = np.stack([np.random.default_rng([0, i]).uniform(-1, 1, acts.shape[1])
                        for i in range(BATCH)])
    want = relu(np.einsum("nc,nchw->nhw", weights, acts))
    got = case.explain("randomcam").raw
    assert float(want.max()) > 0
    assert_maps_close(got, want)
    one_by_one = case.explainer.explain(case.images, TARGETS, method="randomcam", batch_size=1)
    np.testing.assert_allclose(one_by_one.raw, got, rtol=1e-6)
    reseeded = case.explainer.explain(case.images, TARGETS, method="randomcam", seed=1)
    assert not np.allclose(reseeded.raw, got)


@pytest.mark.parametrize("method", list(EIGEN_TERMS))
def test_eigen_smooth_is_the_first_component_of_the_channel_terms(case: Case,
                                                                 method: str) -> None:
    terms = EIGEN_TERMS[method](case.outputs["activations"], case.outputs["gradients"])
    projection = ref_eigen_projection(terms)
    got = case.explainer.explain(case.images, TARGETS, method=method, eigen_smooth=True).raw
    assert not np.allclose(got, case.explain(method).raw)
    assert_projection_close(got, projection)  # each image's sign is its SVD's


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam", "fem", "kpca-cam"])
def test_eigen_smooth_leaves_the_methods_that_ignore_it(case: Case, method: str) -> None:
    """As pytorch-grad-cam's classes of these methods ignore it."""
    smoothed = case.explainer.explain(case.images, TARGETS, method=method, eigen_smooth=True)
    np.testing.assert_array_equal(smoothed.raw, case.explain(method).raw)


def uncentred_component(maps: np.ndarray) -> np.ndarray:
    """The first principal axis of the positions taken without centring them."""
    n, c, h, w = maps.shape
    samples = maps.reshape(n, c, h * w).transpose(0, 2, 1)
    _, _, vt = np.linalg.svd(samples, full_matrices=True)
    return np.einsum("npc,nc->np", samples, vt[:, 0, :]).reshape(n, h, w)


def test_a_broken_eigen_smooth_fails_its_reference(onnx_case: Case,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The eigen_smooth comparison above can fail: project without centring."""
    monkeypatch.setattr("onnxcam.engine.methods.base.first_component", uncentred_component)
    with pytest.raises(AssertionError, match="max error"):
        test_eigen_smooth_is_the_first_component_of_the_channel_terms(onnx_case, "layercam")


def test_eigen_smooth_is_refused_for_gradient_methods(onnx_case: Case) -> None:
    with pytest.raises(BadMethodError, match="eigen_smooth applies to the CAM methods"):
        onnx_case.explainer.explain(onnx_case.images, TARGETS, method="saliency",
                                    eigen_smooth=True)


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


def test_tiny_maps_span_zero_to_one_and_flat_maps_are_zeros_and_flagged() -> None:
    """Issue 12: random weights give raw maps near 1e-11; a fixed epsilon of 1e-7 left
    their heatmap's maximum at 1.8e-4. A constant map (up to float32 rounding) shows
    nothing, and is flagged rather than magnified into noise."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    from onnxcam.engine.maps import flat, heatmaps

    rng = np.random.default_rng(5)
    usual = rng.uniform(0, 3, (4, 7, 7)).astype(np.float32)
    tiny = usual * np.float32(1e-11)
    constant = np.full((7, 7), 2.5, np.float32)
    noisy = constant + rng.choice([0, 1], (7, 7)) * np.spacing(np.float32(2.5))
    raw = np.stack([*usual[:2], tiny[2], tiny[3], np.zeros((7, 7), np.float32), noisy])
    got = heatmaps(raw, 7, 7)
    assert flat(raw).tolist() == [False, False, False, False, True, True]
    # pytorch-grad-cam's own scaling, where its epsilon is negligible (maps of order 1)
    np.testing.assert_allclose(got[:2], scale_cam_image(usual[:2]), atol=1e-6)
    # tiny maps: the same picture as the usual ones, exactly spanning [0, 1]
    np.testing.assert_allclose(got[2:4], scale_cam_image(usual[2:4]), atol=1e-6)
    assert got[2:4].max(axis=(1, 2)).tolist() == [1.0, 1.0]
    assert not got[4:].any()


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


@pytest.fixture(scope="module")
def keras_tape(keras_case: Case) -> dict[str, np.ndarray]:
    """TF GradientTape's activations and gradients at the bundle's layer (NCHW), and
    the logits, for the keras case's images and targets: the Keras model itself."""
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
    return {"activations": np.asarray(acts, np.float64).transpose(0, 3, 1, 2),
            "gradients": np.asarray(grads, np.float64).transpose(0, 3, 1, 2),
            "logits": np.asarray(logits, np.float64)}


@pytest.mark.tf
def test_keras_gradcam_matches_gradient_tape(keras_case: Case,
                                             keras_tape: dict[str, np.ndarray]) -> None:
    acts, grads = keras_tape["activations"], keras_tape["gradients"]
    want = ref_gradcam(acts, grads)
    assert float(want.max()) > 0
    got = keras_case.explain("gradcam")
    assert_maps_close(got.raw, want, rtol=1e-4)
    np.testing.assert_allclose(got.logits, keras_tape["logits"], rtol=1e-4, atol=1e-4)
    # the bundle's full gradient map is the tape's too
    assert_maps_close(keras_case.outputs["gradients"].reshape(BATCH, -1)[:, None],
                      grads.reshape(BATCH, -1)[:, None], rtol=1e-4)


def tape_reference(method: str, acts: np.ndarray, grads: np.ndarray,
                   eigen_smooth: bool = False) -> tuple[np.ndarray, bool]:
    """A method's map from the tape's activations and gradients, and whether it is a
    projection (signed as its SVD gives it: the map is one of its two ReLUs)."""
    if eigen_smooth:
        return ref_eigen_projection(EIGEN_TERMS[method](acts, grads)), True
    if method in GRADIENT_REFS:
        return GRADIENT_REFS[method](acts, grads), False
    if method == "fem":
        return ref_fem(acts), False
    if method == "kpca-cam":
        return relu(ref_kpca(acts)), False
    if method == "eigengradcam":
        return ref_eigen_projection(grads * acts), True
    return ref_eigen_projection(acts), True  # eigencam


TAPE_METHODS = [*GRADIENT_REFS, "fem", "kpca-cam", "eigencam", "eigengradcam",
                *(f"{m}+eigen" for m in EIGEN_TERMS)]


@pytest.mark.tf
@pytest.mark.parametrize("method", TAPE_METHODS)
def test_keras_methods_match_their_definitions_on_gradient_tape(
        keras_case: Case, keras_tape: dict[str, np.ndarray], method: str) -> None:
    """Every CAM method that reads the layer, on the Keras model's own activations and
    GradientTape's gradients (``+eigen``: with eigen_smooth)."""
    name, _, smooth = method.partition("+")
    want, signed = tape_reference(name, keras_tape["activations"], keras_tape["gradients"],
                                  bool(smooth))
    got = keras_case.explainer.explain(keras_case.images, TARGETS, method=name,
                                       eigen_smooth=bool(smooth)).raw
    chosen = []
    for n in range(BATCH):
        candidates = [relu(want[n]), relu(-want[n])] if signed else [want[n]]
        chosen.append(candidates[int(np.argmin([float(np.abs(got[n] - c).max())
                                                for c in candidates]))])
    assert float(np.max(chosen)) > 0, f"{method}: every reference map is flat"
    assert_maps_close(got, np.stack(chosen), rtol=1e-4)


# ------------------------------------------------------------------------------ the hooks


class MeanGradientCAM(ChannelWeightCam):
    """Grad-CAM from the full gradient map, written as a user would add a method."""

    name = "mean-gradient-cam"

    def weights(self, context: MethodContext) -> np.ndarray:
        return context.gradients.mean(axis=(2, 3))


def test_a_new_method_is_one_class_overriding_one_hook(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base does the rest: outputs to ask for, NCHW views, the ReLU, every layer."""
    monkeypatch.setitem(METHODS_BY_NAME, MeanGradientCAM.name, MeanGradientCAM)
    got = case.explainer.explain(case.images, TARGETS, method=MeanGradientCAM.name)
    want = ref_gradcam(case.outputs["activations"], case.outputs["gradients"])
    assert float(want.max()) > 0
    assert_maps_close(got.raw, want)
    assert list(got.layer_maps) == [entry.name for entry in case.explainer.info.layers]
    assert got.input_gradients is None


def broken_gradcam_pp(self: Any, context: MethodContext) -> np.ndarray:
    """Grad-CAM++ with alpha's ``2 *`` dropped."""
    grads, acts = context.gradients, context.activations
    squared = grads**2
    sums = acts.sum(axis=(2, 3))[:, :, None, None]
    alpha = np.where(grads != 0, squared / (squared + sums * squared * grads + 1e-6), 0)
    return (np.maximum(grads, 0) * alpha).sum(axis=(2, 3))


def broken_xgradcam(self: Any, context: MethodContext) -> np.ndarray:
    """XGrad-CAM without normalising the activations by their sum."""
    return (context.gradients * context.activations).sum(axis=(2, 3))


def sum_to_one(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Score-CAM's softmax over channels replaced by a plain division by the sum."""
    return values / values.sum(axis=axis, keepdims=True)


def broken_elementwise(self: Any, context: MethodContext) -> np.ndarray:
    """Grad-CAM element-wise with its negative products kept (HiResCAM)."""
    return (context.gradients * context.activations).sum(axis=1)


def broken_fem(self: Any, context: MethodContext) -> np.ndarray:
    """FEM thresholding each channel at its mean alone."""
    acts = context.activations
    return (acts > acts.mean(axis=(2, 3), keepdims=True)).mean(axis=(2, 3))


# method -> (what to patch, its attribute, the broken stand-in)
MUTATIONS: dict[str, tuple[Any, str, Callable[..., np.ndarray]]] = {
    "gradcam++": (GradCAMPlusPlus, "weights", broken_gradcam_pp),
    "xgradcam": (XGradCAM, "weights", broken_xgradcam),
    "gradcam-elementwise": (GradCAMElementWise, "cam", broken_elementwise),
    "fem": (FEM, "weights", broken_fem),
    "scorecam": (scorecam_module, "softmax", sum_to_one),
}


def reference(case: Case, method: str) -> np.ndarray:
    acts = case.outputs["activations"]
    if method == "scorecam":
        return ref_scorecam(acts, case.model_input(), case.layout, TARGETS, case.source_logits)
    if method == "fem":
        return ref_fem(acts)
    return GRADIENT_REFS[method](acts, case.outputs["gradients"])


@pytest.mark.parametrize("method", list(MUTATIONS))
def test_a_broken_formula_fails_its_reference(onnx_case: Case, method: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference comparisons above can fail: break one method's formula and the
    same comparison that passes for the real one raises."""
    want = reference(onnx_case, method)
    rtol = 2e-4 if method == "scorecam" else 1e-4
    assert_maps_close(onnx_case.explain(method).raw, want, rtol)
    owner, attribute, broken = MUTATIONS[method]
    monkeypatch.setattr(owner, attribute, broken)
    mutant = onnx_case.explainer.explain(onnx_case.images, TARGETS, method=method)
    with pytest.raises(AssertionError, match="max error"):
        assert_maps_close(mutant.raw, want, rtol)


SCORECAM_MEMORY = """
import resource, sys
import numpy as np
from onnxcam.engine import Explainer

explainer = Explainer(sys.argv[1], device="cpu")
images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
explainer.explain(images, method="gradcam")  # sessions built, arenas warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scorecam = explainer.explain(images, method="scorecam", batch_size=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.save(sys.argv[2], scorecam.raw)
print((after - before) // 1024)
"""


def test_scorecam_memory_does_not_grow_with_the_channels(tmp_path: Path) -> None:
    """Two images of a 2048-channel layer (ResNet50's) at 224²: the masks of one
    image alone are 1.2 GB of masked inputs at once; made a chunk at a time they stay
    small (issue 12: Keras ResNet50 peaked at 3.2 GB for one image, 8.8 GB for 50)."""
    import subprocess
    import sys

    source = tmp_path / "wide.onnx"
    onnx.save(models.onnx_wide(), str(source))
    bundle = export(source, tmp_path / "wide.cam.onnx", preprocess="torch").path
    raw = tmp_path / "raw.npy"
    run = subprocess.run([sys.executable, "-c", SCORECAM_MEMORY, str(bundle), str(raw)],
                         capture_output=True, text=True, timeout=240, check=True)
    grown_mb = int(run.stdout.split()[-1])
    assert grown_mb < 300, f"Score-CAM grew the process by {grown_mb} MB"
    assert np.load(raw).max() > 0
