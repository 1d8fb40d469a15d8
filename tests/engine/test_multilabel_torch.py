"""Multi-label Grad-CAM against pytorch-grad-cam itself (issue 21): torchvision's
ResNet-18 with a 14-way logits head (the sigmoid outside, as torch users write it),
exported by torch.onnx both ways, every positive finding explained in one call and
held against one ``ClassifierOutputTarget`` per finding; a single-logit head against
``BinaryClassifierOutputTarget`` for both categories.

Kept apart from the Keras module: torch and TensorFlow in one process are slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnxruntime as ort
import pytest
import zoo
from cam_references import GRADIENT_REFS, assert_normalised_maps_match, positive_findings

from onnxcam.engine import Explainer
from onnxcam.exporter import export

pytestmark = [pytest.mark.torch, pytest.mark.slow]
pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")

SIZE = 128  # layer4 at 4x4
LAYER = "layer4.1"
IMAGES = 4
MAP_TOLERANCE = 2e-3  # issue 21: max |difference| of the min-max normalised maps
METHODS = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM"}


@dataclass
class Case:
    """A torch model, its bundle (one exporter's ONNX file), photos and torch's logits."""

    model: Any
    bundle: Path
    images: np.ndarray  # uint8 [N, H, W, 3]
    logits: np.ndarray  # float64 [N, K], torch's own

    def positive_rows(self) -> tuple[np.ndarray, np.ndarray]:
        return positive_findings(self.logits)


def make_case(folder: Path, exporter: str, findings: int) -> Case:
    import torch

    model = models.torch_findings("resnet18", SIZE, findings)
    entry = zoo.ZooModel("resnet18", lambda: model, SIZE, LAYER)
    source = zoo.export_torch(entry, model, exporter, folder / f"findings_{exporter}.onnx")
    bundle = folder / f"findings_{exporter}.cam.onnx"
    export(source, bundle, preprocess="torch", layer=LAYER, head="sigmoid")
    images = models.photos(SIZE)[:IMAGES]
    with torch.no_grad():
        logits = model(zoo.torch_input(images)).numpy().astype(np.float64)
    # A logit this close to 0 could be positive on one side and not on the other.
    assert np.abs(logits).min() > 1e-3
    return Case(model, bundle, images, logits)


@pytest.fixture(scope="module", params=zoo.PLAIN_EXPORTERS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("findings"), request.param, models.FINDINGS)


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("binary"), "dynamo", 1)


def pgc_maps(model: Any, method: str, images: np.ndarray, targets: list[Any]) -> np.ndarray:
    """pytorch-grad-cam's map for each image row and its target object: the cam after
    its ReLU, before the resizing ``compute_cam_per_layer`` does."""
    import pytorch_grad_cam

    class Raw(getattr(pytorch_grad_cam, METHODS[method])):  # type: ignore[misc]
        raw: np.ndarray

        def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
            cam = super().get_cam_image(*args, **kwargs)
            self.raw = np.maximum(cam, 0)
            return cam

    with Raw(model=model, target_layers=[model.get_submodule(LAYER)]) as cam:
        cam(input_tensor=zoo.torch_input(images), targets=targets)
        return cam.raw.astype(np.float64)


def classifier_targets(classes: np.ndarray) -> list[Any]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(c)) for c in classes]


def assert_maps_match(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert_normalised_maps_match(got, want, MAP_TOLERANCE, what)


def bundle_gradcam(case: Case, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Grad-CAM by hand from the bundle's own outputs, ``target_weights`` fed."""
    session = ort.InferenceSession(str(case.bundle), providers=["CPUExecutionProvider"])
    activations, gradients = session.run(["activations", "gradients"], {
        "image": case.images[rows], "target": np.full(len(rows), -1, np.int64),
        "target_weights": weights.astype(np.float32)})
    return GRADIENT_REFS["gradcam"](activations.astype(np.float64), gradients.astype(np.float64))


def test_bundle_target_weights_match_classifier_output_targets(case: Case) -> None:
    rows, classes = case.positive_rows()
    weights = np.eye(models.FINDINGS)[classes]
    assert_maps_match(bundle_gradcam(case, rows, weights),
                      pgc_maps(case.model, "gradcam", case.images[rows],
                               classifier_targets(classes)), "bundle gradcam")


@pytest.mark.parametrize("method", list(METHODS))
def test_all_positive_findings_match_pytorch_grad_cam(case: Case, method: str) -> None:
    result = Explainer(case.bundle, device="cpu").explain(
        case.images, targets="all-positive", method=method)
    rows, classes = case.positive_rows()
    np.testing.assert_array_equal(result.image_index, rows)
    np.testing.assert_array_equal(result.targets, classes)
    np.testing.assert_allclose(result.logits, case.logits[rows], atol=1e-3)
    assert_maps_match(result.raw, pgc_maps(case.model, method, case.images[rows],
                                           classifier_targets(classes)), method)


def test_binary_classifier_target_both_categories(binary: Case) -> None:
    """BinaryClassifierOutputTarget(1) is the logit, (0) its negative: target_weights
    +1 and -1 at the bundle, class 0 and Weighting([-1]) at the engine."""
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    from onnxcam.engine.targets import Weighting

    rows = np.repeat(np.arange(IMAGES), 2)
    categories = np.tile([1, 0], IMAGES)
    want = pgc_maps(binary.model, "gradcam", binary.images[rows],
                    [BinaryClassifierOutputTarget(int(c)) for c in categories])
    signs = np.where(categories == 1, 1.0, -1.0)[:, None]
    assert_maps_match(bundle_gradcam(binary, rows, signs), want, "bundle binary")
    against = Weighting(np.array([-1.0], np.float32), name="not-0")
    result = Explainer(binary.bundle, device="cpu").explain(
        binary.images, targets=[[0, against]] * IMAGES)
    np.testing.assert_array_equal(result.image_index, rows)
    np.testing.assert_array_equal(result.targets, np.tile([0, -1], IMAGES))
    assert_maps_match(result.raw, want, "engine binary")
