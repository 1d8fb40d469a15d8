"""Multi-label Grad-CAM fidelity (issue 21): every positive finding of a Keras
DenseNet121 with a 14-way sigmoid head, explained in one call, against TF GradientTape
of the logit before the sigmoid; the bundle's ``target_weights`` fed in plain
onnxruntime first, then the engine's ``targets=`` lists, "all-positive" and Contrast.

Expected maps are written out from the gradients the tape gives (cam_references);
nothing from ``onnxcam.engine`` computes one. The fast test checks the seed on a
small ONNX head against its gradient worked out by hand in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnxruntime as ort
import pytest
from cam_references import (
    GRADIENT_REFS,
    assert_maps_close,
    assert_normalised_maps_match,
    positive_findings,
)
from onnx import numpy_helper

from onnxcam.bundle import read_bundle
from onnxcam.engine import Explainer
from onnxcam.exporter import export

# ChestX-ray14's findings, the head the model stands in for.
LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
          "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
          "Pleural_Thickening", "Hernia"]
SIZE = 128  # DenseNet's last block at 4x4
IMAGES = 4
MAP_TOLERANCE = 2e-3  # issue 21: max |difference| of the min-max normalised maps
SAME = 1e-5  # one call against separate calls of the same bundle
METHODS = ("gradcam", "hirescam", "layercam", "xgradcam")


def ort_run(bundle: Path, feeds: dict[str, np.ndarray],
            names: tuple[str, ...] = ("logits", "activations", "gradients"),
            ) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(bundle), providers=["CPUExecutionProvider"])
    return {n: v.astype(np.float64) for n, v in zip(names, session.run(list(names), feeds))}


def one_hot(classes: np.ndarray, count: int = len(LABELS)) -> np.ndarray:
    return np.eye(count, dtype=np.float32)[classes]


def assert_maps_match(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert_normalised_maps_match(got, want, MAP_TOLERANCE, what)


# ------------------------------------------------------------------ fast: a small ONNX head


def test_target_weights_seed_the_gradient_of_a_small_head(tmp_path: Path) -> None:
    """onnx_multilabel: feat -> GAP -> Gemm, so d sum(w * scores) / d feat[n, k, i, j]
    is sum_c w[n, c] W[c, k] / (h w) at every pixel: no model run needed."""
    source = models.onnx_multilabel(classes=5)
    bundle = tmp_path / "multilabel.cam.onnx"
    export(source, bundle)
    assert read_bundle(bundle).info.target_layer in ("feat", "last_relu")
    kernel = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}["fc.weight"]
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
    weights = np.array([[1, 0, 0, 0, 0], [0, 0, 1, 0, -1], [0.5, 2, 0, -3, 0]], np.float32)
    assert read_bundle(bundle).info.activation_layout == "nchw"
    got = ort_run(bundle, {"image": images, "target": np.full(3, -1, np.int64),
                           "target_weights": weights})["gradients"]
    want = (weights.astype(np.float64) @ kernel.astype(np.float64)) / 64.0
    assert np.abs(got - want[:, :, None, None]).max() <= 1e-6 * np.abs(want).max()


# ------------------------------------------------------------------ Keras DenseNet121


@dataclass
class Case:
    """The bundle, the photos it explains, and the tape's view of the same model."""

    bundle: Path
    images: np.ndarray  # uint8 [N, H, W, 3]
    logits: np.ndarray  # float64 [N, K]: Keras' logits before the sigmoid
    grad_model: Any  # keras.Model: image -> (layer activations, logits)

    def tape(self, rows: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Activations and d sum(weights * logits) / d activations, NCHW float64, for
        the images ``rows`` (one tape row per weighting row)."""
        import tensorflow as tf

        x = tf.constant(self.images[rows].astype(np.float32) / np.float32(255))
        with tf.GradientTape() as tape:
            activations, logits = self.grad_model(x, training=False)
            score = tf.reduce_sum(logits * tf.constant(weights, tf.float32))
        gradients = tape.gradient(score, activations)
        return tuple(np.asarray(t, np.float64).transpose(0, 3, 1, 2)
                     for t in (activations, gradients))

    def maps(self, method: str, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return GRADIENT_REFS[method](*self.tape(rows, weights))

    def positive_rows(self) -> tuple[np.ndarray, np.ndarray]:
        return positive_findings(self.logits)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    pytest.importorskip("tensorflow")
    import keras

    folder = tmp_path_factory.mktemp("multilabel")
    model = models.densenet121_findings(size=SIZE)
    model.save(folder / "findings.keras")
    bundle = folder / "findings.cam.onnx"
    export(folder / "findings.keras", bundle, preprocess="unit", labels=LABELS)
    layer = read_bundle(bundle).info.target_layer
    images = models.photos(SIZE)[:IMAGES]
    model.layers[-1].activation = keras.activations.linear
    grad_model = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    logits = models.logits(model, images.astype(np.float32) / np.float32(255))
    # A logit this close to 0 could be positive on one side and not on the other.
    assert np.abs(logits).min() > 1e-3
    return Case(bundle, images, logits.astype(np.float64), grad_model)


@pytest.mark.tf
@pytest.mark.slow
def test_photos_have_several_positive_findings(case: Case) -> None:
    positives = (case.logits > 0).sum(axis=1)
    assert (positives > 1).all() and (positives < len(LABELS)).all(), positives


@pytest.mark.tf
@pytest.mark.slow
def test_bundle_target_weights_give_the_tapes_gradients(case: Case) -> None:
    """Plain onnxruntime, each (image, positive finding) a one-hot row and each image
    a +1/-1 contrast row: gradients and maps as the tape's."""
    rows, classes = case.positive_rows()
    weights = one_hot(classes)
    negative = np.argmin(case.logits, axis=1)
    contrast_rows = np.arange(IMAGES)
    contrast = one_hot(np.argmax(case.logits, axis=1)) - one_hot(negative)
    rows, weights = np.concatenate([rows, contrast_rows]), np.concatenate([weights, contrast])
    got = ort_run(case.bundle, {"image": case.images[rows],
                                "target": np.full(len(rows), -1, np.int64),
                                "target_weights": weights})
    got = {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in got.items()}  # nhwc
    activations, gradients = case.tape(rows, weights)
    assert np.abs(got["logits"] - case.logits[rows]).max() < 1e-3
    assert_maps_close(got["gradients"], gradients, rtol=1e-3)
    for method in METHODS:
        assert_maps_match(GRADIENT_REFS[method](got["activations"], got["gradients"]),
                          GRADIENT_REFS[method](activations, gradients), f"bundle {method}")


@pytest.mark.tf
@pytest.mark.slow
def test_unfed_target_weights_seed_the_target_class(case: Case) -> None:
    """Without ``target_weights`` the seed is one_hot(target), as before issue 21."""
    classes = np.arange(IMAGES, dtype=np.int64) * 3
    fed = ort_run(case.bundle, {"image": case.images, "target": classes,
                                "target_weights": one_hot(classes)})
    plain = ort_run(case.bundle, {"image": case.images, "target": classes})
    assert_maps_close(fed["gradients"], plain["gradients"], rtol=SAME)


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_all_positive_findings_in_one_call(case: Case, method: str) -> None:
    result = Explainer(case.bundle, device="cpu").explain(
        case.images, targets="all-positive", method=method)
    rows, classes = case.positive_rows()
    np.testing.assert_array_equal(result.image_index, rows)
    np.testing.assert_array_equal(result.targets, classes)
    assert list(result.target_names) == [LABELS[c] for c in classes]
    np.testing.assert_allclose(result.logits, case.logits[rows], atol=1e-3)
    assert_maps_match(result.raw, case.maps(method, rows, one_hot(classes)), method)


@pytest.mark.tf
@pytest.mark.slow
def test_targets_listed_per_image_by_name_and_class(case: Case) -> None:
    wanted = [["Effusion", "Mass"], [3], ["Hernia", 0, "Fibrosis"], [13]]
    result = Explainer(case.bundle, device="cpu").explain(case.images, targets=wanted)
    rows = np.array([0, 0, 1, 2, 2, 2, 3])
    classes = np.array([2, 4, 3, 13, 0, 11, 13])
    np.testing.assert_array_equal(result.image_index, rows)
    np.testing.assert_array_equal(result.targets, classes)
    assert list(result.target_names) == [LABELS[c] for c in classes]
    assert_maps_match(result.raw, case.maps("gradcam", rows, one_hot(classes)), "lists")


@pytest.mark.tf
@pytest.mark.slow
def test_top_k_findings_best_first(case: Case) -> None:
    # LayerCAM: these findings' Grad-CAM maps happen to be mostly all zero.
    result = Explainer(case.bundle, device="cpu").explain(case.images, targets="top:3",
                                                          method="layercam")
    classes = np.argsort(-case.logits, axis=1, kind="stable")[:, :3].ravel()
    rows = np.repeat(np.arange(IMAGES), 3)
    np.testing.assert_array_equal(result.image_index, rows)
    np.testing.assert_array_equal(result.targets, classes)
    assert_maps_match(result.raw, case.maps("layercam", rows, one_hot(classes)), "top:3")


CONTRAST = ("Effusion", "Pneumothorax")


def contrast_weights(count: int) -> np.ndarray:
    a, b = (LABELS.index(name) for name in CONTRAST)
    return np.repeat(one_hot(np.array([a])) - one_hot(np.array([b])), count, axis=0)


@pytest.mark.tf
@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_contrast_is_the_gradient_of_a_logit_difference(case: Case, method: str) -> None:
    from onnxcam.engine.targets import Contrast

    result = Explainer(case.bundle, device="cpu").explain(
        case.images, targets=Contrast(*CONTRAST), method=method)
    rows = np.arange(IMAGES)
    np.testing.assert_array_equal(result.image_index, rows)
    assert_maps_match(result.raw, case.maps(method, rows, contrast_weights(IMAGES)),
                      f"contrast {method}")


@pytest.mark.tf
@pytest.mark.slow
def test_contrast_among_an_images_other_targets(case: Case) -> None:
    from onnxcam.engine.targets import Contrast

    contrast = Contrast(*CONTRAST)
    result = Explainer(case.bundle, device="cpu").explain(
        case.images, targets=[[contrast], [3, contrast], [contrast, "Mass"], [contrast]])
    rows = np.array([0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(result.image_index, rows)
    np.testing.assert_array_equal(result.targets, [2, 3, 2, 2, 4, 2])  # a contrast: its a
    assert result.target_names[0] == "Effusion-vs-Pneumothorax"
    weights = contrast_weights(len(rows))
    weights[1], weights[4] = one_hot(np.array([3, 4]))
    assert_maps_match(result.raw, case.maps("gradcam", rows, weights), "mixed contrast")


@pytest.mark.tf
@pytest.mark.slow
def test_fourteen_targets_in_one_call_equal_fourteen_calls(case: Case) -> None:
    engine = Explainer(case.bundle, device="cpu")
    every = list(range(len(LABELS)))
    together = engine.explain(case.images, targets=[every] * IMAGES)
    np.testing.assert_array_equal(together.image_index, np.repeat(np.arange(IMAGES), 14))
    np.testing.assert_array_equal(together.targets, np.tile(every, IMAGES))
    for c in every:
        alone = engine.explain(case.images, targets=c)
        assert_maps_close(together.raw[c::len(LABELS)], alone.raw, rtol=SAME)
        assert np.abs(together.heatmaps[c::len(LABELS)] - alone.heatmaps).max() <= SAME
