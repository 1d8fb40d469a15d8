"""Every CAM method that reads the layer against pytorch-grad-cam's own class of the same
name, with and without eigen_smooth, on two torchvision models with random weights,
perturbed: a ResNet-18 with a 10-class head spread on the photos
(``models.torch_findings``; at ``layer4.1``, 4x4 at 128x128, a different class per
photo) and a ViT-B/16 at 64x64 (``zoo``; at the last block's ``ln_1``, its tokens
reshaped to a 4x4 grid by pytorch-grad-cam's usual transform, each image's most
telling class). Each exported at a free batch by the legacy exporter.
pytorch-grad-cam's map is taken after its ReLU and before its resizing; the
projections' (Eigen-CAM, Eigen-Grad-CAM, eigen_smooth) before the ReLU, since each
SVD picks its own sign."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Case:
    model: Any
    explainer: Explainer
    images: np.ndarray
    targets: list[int]
    layer: str
    reshape: Any  # pytorch-grad-cam's reshape_transform, or None


@pytest.fixture(scope="module", params=["resnet18", "vit_b_16"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp(f"methods_{request.param}")
    if request.param == "resnet18":
        model = models.torch_findings("resnet18", SIZE)
        entry = zoo.ZooModel("resnet18", lambda: model, SIZE, LAYER)
        images, targets = models.photos(SIZE)[:len(TARGETS)], TARGETS
    else:
        entry = zoo.ZOO[request.param]
        model = entry.model()
        images = zoo.images(entry.size)
        targets = list(zoo.telling_targets(entry, model, images))
    source = zoo.export_torch(entry, model, "dynamic", folder / f"{entry.name}.onnx")
    example = zoo.torch_input(zoo.images(entry.size, 1, seed=99))
    bundle = folder / f"{entry.name}.cam.onnx"
    export(source, bundle, preprocess="torch",
           layer=zoo.onnx_layer_name(source, model, entry.layer, example))
    return Case(model, Explainer(bundle, device="cpu"), images, targets, entry.layer,
                entry.reshape_transform())


def pgc_cam(method: str, case: Case, eigen_smooth: bool = False) -> np.ndarray:
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

    with Raw(model=case.model, target_layers=[case.model.get_submodule(case.layer)],
             reshape_transform=case.reshape) as cam:
        cam(input_tensor=zoo.torch_input(case.images),
            targets=[ClassifierOutputTarget(t) for t in case.targets], eigen_smooth=eigen_smooth)
        return cam.raw if method in SIGNED or eigen_smooth else relu(cam.raw)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_matches_pytorch_grad_cam(case: Case, method: str) -> None:
    got = case.explainer.explain(case.images, case.targets, method=method).raw
    want = pgc_cam(method, case)
    if method in SIGNED:
        want = signed_as(got, want)
    assert_normalised_maps_match(got, want, MAP_TOLERANCE, method)


@pytest.mark.parametrize("method", SMOOTHABLE)
def test_eigen_smooth_matches_pytorch_grad_cam(case: Case, method: str) -> None:
    got = case.explainer.explain(case.images, case.targets, method=method,
                                 eigen_smooth=True).raw
    want = signed_as(got, pgc_cam(method, case, eigen_smooth=True))
    assert_normalised_maps_match(got, want, MAP_TOLERANCE, f"{method}, eigen_smooth")


def signed_as(got: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """Each image's projection, after the ReLU, with the sign that its own SVD gave the
    map ``got`` (each side's SVD picks its own)."""
    def error(ours: np.ndarray, theirs: np.ndarray) -> float:
        return float(np.abs(zoo.normalise(ours[None]) - zoo.normalise(theirs[None])).max())

    return np.stack([min((relu(sign * p) for sign in (1, -1)), key=lambda c, g=g: error(g, c))
                     for g, p in zip(got, projections)])
