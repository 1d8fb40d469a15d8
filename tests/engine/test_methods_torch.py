"""Every CAM method that reads the layer against pytorch-grad-cam's own class of the same
name, on a torchvision ResNet-18 (``models.torch_findings``: 10 classes, random weights
perturbed, BatchNorm calibrated, its head spread on the photos) exported at a free
batch by the legacy exporter, at ``layer4.1`` (4x4 at 128x128), for a different class
per photo. pytorch-grad-cam's map is taken after its ReLU and before its resizing;
Eigen-CAM's and Eigen-Grad-CAM's before the ReLU, since each SVD picks its own sign."""

from __future__ import annotations

from typing import Any

import models
import numpy as np
import pytest
import zoo
from cam_references import assert_normalised_maps_match, relu

from onnxcam import Explainer, export

pytestmark = [pytest.mark.torch, pytest.mark.slow]
pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")

SIZE, LAYER = 128, "layer4.1"
TARGETS = [0, 3, 1, 4]
MAP_TOLERANCE = 2e-3  # max |difference| of the min-max normalised maps
# onnxcam's name -> pytorch-grad-cam's class
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "hirescam": "HiResCAM",
           "gradcam-elementwise": "GradCAMElementWise", "fem": "FEM", "kpca-cam": "KPCA_CAM",
           "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM"}
SIGNED = {"eigencam", "eigengradcam"}
SMOOTHABLE = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
              "gradcam-elementwise"]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Explainer, np.ndarray]:
    model = models.torch_findings("resnet18", SIZE)
    entry = zoo.ZooModel("resnet18", lambda: model, SIZE, LAYER)
    folder = tmp_path_factory.mktemp("methods_torch")
    source = zoo.export_torch(entry, model, "dynamic", folder / "resnet18.onnx")
    bundle = folder / "resnet18.cam.onnx"
    export(source, bundle, preprocess="torch", layer=LAYER)
    return model, Explainer(bundle, device="cpu"), models.photos(SIZE)[:len(TARGETS)]


def pgc_cam(method: str, model: Any, images: np.ndarray, eigen_smooth: bool = False
            ) -> np.ndarray:
    """pytorch-grad-cam's map at the layer, before its resizing (after its ReLU but for
    the signed methods and with ``eigen_smooth``)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Raw(getattr(pytorch_grad_cam, METHODS[method])):  # type: ignore[misc]
        raw: np.ndarray

        def get_cam_image(self, *args: Any, **kwargs: Any) -> np.ndarray:
            cam = super().get_cam_image(*args, **kwargs)
            self.raw = np.asarray(cam, np.float64)
            return cam

    with Raw(model=model, target_layers=[model.get_submodule(LAYER)]) as cam:
        cam(input_tensor=zoo.torch_input(images),
            targets=[ClassifierOutputTarget(t) for t in TARGETS], eigen_smooth=eigen_smooth)
        return cam.raw if method in SIGNED or eigen_smooth else relu(cam.raw)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_matches_pytorch_grad_cam(resnet: tuple[Any, Explainer, np.ndarray],
                                              method: str) -> None:
    model, explainer, images = resnet
    got = explainer.explain(images, TARGETS, method=method).raw
    want = pgc_cam(method, model, images)
    if method in SIGNED:
        want = signed_as(got, want)
    assert_normalised_maps_match(got, want, MAP_TOLERANCE, method)


@pytest.mark.parametrize("method", SMOOTHABLE)
def test_eigen_smooth_matches_pytorch_grad_cam(resnet: tuple[Any, Explainer, np.ndarray],
                                               method: str) -> None:
    model, explainer, images = resnet
    got = explainer.explain(images, TARGETS, method=method, eigen_smooth=True).raw
    want = signed_as(got, pgc_cam(method, model, images, eigen_smooth=True))
    assert_normalised_maps_match(got, want, MAP_TOLERANCE, f"{method}, eigen_smooth")


def signed_as(got: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """Each image's projection, after the ReLU, with the sign that its own SVD gave the
    map ``got`` (each side's SVD picks its own)."""
    def error(ours: np.ndarray, theirs: np.ndarray) -> float:
        return float(np.abs(zoo.normalise(ours[None]) - zoo.normalise(theirs[None])).max())

    return np.stack([min((relu(sign * p) for sign in (1, -1)), key=lambda c, g=g: error(g, c))
                     for g, p in zip(got, projections)])
