"""Segmenters exported to bundles: Grad-CAM for a class over a mask, from the bundle run in
plain onnxruntime with ``target_weights``, against pytorch-grad-cam's GradCAM with its
SemanticSegmentationTarget (torchvision models) and TF GradientTape (a Keras U-Net).

Maps are compared at the layer's resolution, min-max normalised, as the references
make them; never against the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from segmenters import (
    SIZE,
    TORCH_MODELS,
    export_torch,
    image,
    map_error,
    pytorch_grad_cam_maps,
    tape_outputs,
    tiny_segmenter,
    torch_input,
    torchvision_segmenter,
    unet_pair,
)

import onnxcam
from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
    OUTPUT_PIXELS,
    BundleInfo,
)
from onnxcam.errors import ExportError
from onnxcam.layout import Layout
from onnxcam.runtime import cpu_session

MAP_TOLERANCE = 2e-3  # max |a - b| of min-max normalised maps


# ------------------------------------------------------------------ shared pieces


def gradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """ReLU(sum_k mean(gradients_k) activations_k) of one NCHW image."""
    weights = gradients[0].mean(axis=(1, 2))
    return np.maximum(np.einsum("chw,c->hw", activations[0], weights), 0)


def region_of(logits: np.ndarray) -> tuple[int, np.ndarray]:
    """The class owning the most pixels of the image, and its mask at the output's size."""
    owner = logits[0].argmax(axis=0)
    cls = int(np.bincount(owner.reshape(-1), minlength=logits.shape[1]).argmax())
    return cls, owner == cls


def run_bundle(path: Path, pixels: np.ndarray, weights: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
    session = cpu_session(Path(path).read_bytes())
    feeds = {INPUT_IMAGE: pixels, INPUT_TARGET: np.array([-1], np.int64)}
    if weights is not None:
        feeds[INPUT_TARGET_WEIGHTS] = weights.astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def bundle_region_cam(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """The bundle's Grad-CAM for the largest class over its own pixels, that class and
    its mask; the bundle's logits must be [1, K, h, w] with ``onnxcam.output = pixels``."""
    info = BundleInfo.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})
    assert info.output == OUTPUT_PIXELS
    cls, mask = region_of(run_bundle(path, pixels)[OUTPUT_LOGITS])
    weights = np.zeros((1, info.num_classes, *mask.shape), np.float32)
    weights[0, cls] = mask
    out = run_bundle(path, pixels, weights)
    assert out[OUTPUT_LOGITS].shape == (1, info.num_classes, *mask.shape)
    layout = Layout.of(info.activation_layout)  # Keras bundles keep NHWC activations
    return gradcam(layout.to_nchw(out[OUTPUT_ACTIVATIONS]), layout.to_nchw(out[OUTPUT_GRADIENTS])
                   ), cls, mask


# ------------------------------------------------------------------ torchvision


@pytest.fixture(scope="module", params=list(TORCH_MODELS))
def torch_segmenter(request: pytest.FixtureRequest) -> tuple[str, Any]:
    pytest.importorskip("torchvision.models.segmentation")
    return request.param, torchvision_segmenter(request.param)


@pytest.mark.slow
# Both of torch's exporters, as users call them; export(module) is held against
# pytorch-grad-cam through the engine in tests/engine/test_segmentation_targets.py.
@pytest.mark.parametrize("how", ["dynamo", "legacy"])
def test_torchvision_segmenter_maps_match_pytorch_grad_cam(
        torch_segmenter: tuple[str, Any], how: str, tmp_path: Path) -> None:
    import torch

    name, model = torch_segmenter
    _, reference_layer, export_layer = TORCH_MODELS[name]
    bundle = export_torch(model, how, export_layer, tmp_path)
    pixels = image()
    cam, cls, mask = bundle_region_cam(bundle, pixels)
    with torch.no_grad():
        logits = model(torch_input(pixels, torch))["out"].numpy()
    assert region_of(logits)[0] == cls  # the bundle's logits are the model's
    (want,) = pytorch_grad_cam_maps(model, reference_layer(model), torch_input(pixels, torch),
                                    [(cls, mask)])
    assert want.max() > 0
    assert map_error(cam, want) <= MAP_TOLERANCE


# ------------------------------------------------------------------ Keras U-Net


@pytest.fixture(scope="module")
def unet_models() -> tuple[Any, Any]:
    """The U-Net with a softmax (what is exported) and the same one without (the
    scores the bundle explains)."""
    pytest.importorskip("tensorflow")
    return unet_pair()


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["dec1", "bottleneck"])
def test_keras_unet_maps_match_gradient_tape(unet_models: tuple[Any, Any], layer: str,
                                             tmp_path: Path) -> None:
    """dec1 feeds the 1x1 classifier; from the bottleneck the gradient crosses the
    Conv2DTranspose, the bilinear UpSampling2D and both skip Concatenates."""
    with_softmax, linear = unet_models
    result = onnxcam.export(with_softmax, tmp_path / "unet.onnx", layer=layer)
    assert result.info.removed_activation == "Softmax"
    pixels = image()[:, : SIZE // 2, : SIZE // 2]
    cam, cls, mask = bundle_region_cam(tmp_path / "unet.onnx", pixels)
    logits = linear.predict(pixels.astype(np.float32) / 255.0, verbose=0)
    assert region_of(logits.transpose(0, 3, 1, 2))[0] == cls  # NHWC came out NCHW
    want = gradcam(*tape_outputs(linear, layer, pixels, [(cls, mask)]))
    assert want.max() > 0
    assert map_error(cam, want) <= MAP_TOLERANCE


# ------------------------------------------------------------------ refusals


def test_a_segmenter_gets_no_finite_differences(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"segmenter .* needs analytic gradients"):
        onnxcam.export(tiny_segmenter(), tmp_path / "fd.onnx", layer="relu", gradient="fd")
    assert not (tmp_path / "fd.onnx").exists()


def test_a_tiny_segmenter_defaults_to_its_class_over_every_pixel(tmp_path: Path) -> None:
    """Without target_weights the seed is one class summed over the pixels: the gradient
    at the relu is that class's 1x1 weights at every pixel, by hand."""
    model = tiny_segmenter()
    result = onnxcam.export(model, tmp_path / "tiny.onnx", layer="relu")
    assert result.info.output == OUTPUT_PIXELS and result.info.num_classes == 3
    session = cpu_session((tmp_path / "tiny.onnx").read_bytes())
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
        INPUT_IMAGE: image()[:, :8, :8], INPUT_TARGET: np.array([2], np.int64)})))
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[1])[:, :, 0, 0]
    want = np.broadcast_to(w2[2][None, :, None, None], out[OUTPUT_GRADIENTS].shape)
    np.testing.assert_allclose(out[OUTPUT_GRADIENTS], want, rtol=1e-6, atol=1e-7)

