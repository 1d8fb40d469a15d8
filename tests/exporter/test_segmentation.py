"""Segmenters exported to bundles: Grad-CAM for a class over a mask, from the bundle run in
plain onnxruntime with ``target_weights``, against pytorch-grad-cam's GradCAM with its
SemanticSegmentationTarget (torchvision models) and TF GradientTape (a Keras U-Net).

Maps are compared at the layer's resolution, min-max normalised, as the references
make them; never against the code under test.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

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

SIZE = 64
CLASSES = 4
MAP_TOLERANCE = 2e-3  # max |a - b| of min-max normalised maps


# ------------------------------------------------------------------ shared pieces


def image(seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)


def normalised(cam: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, np.float64)
    return (cam - cam.min()) / max(float(np.ptp(cam)), 1e-12)


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


def perturbed(model: Any, torch: Any) -> Any:
    """Random weights moved apart (no two tensors equal) and BN statistics that keep
    activations alive at random init, in eval mode."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.dtype.is_floating_point:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            spread = float(tensor.std()) if tensor.numel() > 1 else 0.0
            if name.endswith("running_var"):
                tensor.copy_(1.0 + 0.2 * noise.abs())
            else:  # zeros (BN's shifts and means) get noise of their own
                tensor.add_(0.05 * (spread or 1.0) * noise)
    return model.eval()


# name: (builder's name, the pytorch-grad-cam layer, the export layer)
TORCH_MODELS = {
    "fcn": ("fcn_resnet50", lambda m: m.backbone.layer4, "backbone.layer4"),
    # The backbone's last block ("backbone" itself returns a dict).
    "deeplabv3": ("deeplabv3_mobilenet_v3_large", lambda m: m.backbone["16"], "backbone.16"),
    # LR-ASPP's high-resolution (low-level) branch: the backbone's 'low' feature.
    "lraspp": ("lraspp_mobilenet_v3_large", lambda m: m.backbone["4"], "backbone.4"),
}


@pytest.fixture(scope="module", params=list(TORCH_MODELS))
def torch_segmenter(request: pytest.FixtureRequest) -> tuple[str, Any]:
    torch = pytest.importorskip("torch")
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    builder = getattr(segmentation, TORCH_MODELS[request.param][0])
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False)
    return request.param, perturbed(model, torch)


def torch_input(pixels: np.ndarray, torch: Any) -> Any:
    """The bundle's ``unit`` preprocessing: x / 255, NCHW."""
    return torch.tensor(pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)


def grad_cam_reference(model: Any, layer: Any, x: Any, cls: int, mask: np.ndarray
                       ) -> np.ndarray:
    """pytorch-grad-cam's GradCAM with SemanticSegmentationTarget, at the layer's size
    (its own get_cam_image on its own hooked activations and gradients), run in float64:
    at random init DeepLabV3's maps are ~1e-9, where torch's float32 rounding alone
    moves the normalised map by 3e-3."""
    import copy

    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    class Out(torch.nn.Module):  # the tutorial's wrapper: the dict's "out" alone
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: Any) -> Any:
            return self.inner(batch)["out"]

    path = next(name for name, module in model.named_modules() if module is layer)
    model = copy.deepcopy(model).double()
    layer, x = model.get_submodule(path), x.double()
    targets = [SemanticSegmentationTarget(cls, mask.astype(np.float64))]
    with GradCAM(model=Out(model), target_layers=[layer]) as cam:
        cam(input_tensor=x, targets=targets)
        store = cam.activations_and_grads
        activations = store.activations[0].cpu().numpy()
        gradients = store.gradients[0].cpu().numpy()
        layer_map = cam.get_cam_image(x, layer, targets, activations, gradients)
    return np.maximum(layer_map[0], 0)


def export_torch(model: Any, how: str, layer: str, folder: Path) -> Path:
    import torch

    x = torch.rand(1, 3, SIZE, SIZE)
    out = folder / f"{how}.bundle.onnx"
    if how == "module":
        onnxcam.export(model, out, example=x, layer=layer, logits="out")
        return out
    source = folder / f"{how}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(source), dynamo=how == "dynamo")
    # The file's one output is the dict's "out", under a name of the exporter's making.
    onnxcam.export(source, out, layer=layer)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dynamo", "legacy", "module"])
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
    want = grad_cam_reference(model, reference_layer(model), torch_input(pixels, torch), cls,
                              mask)
    assert cam.shape == want.shape and want.max() > 0
    assert np.abs(normalised(cam) - normalised(want)).max() <= MAP_TOLERANCE


# ------------------------------------------------------------------ Keras U-Net


def unet(softmax: bool) -> Any:
    """Two downsamplings; a Conv2DTranspose and a bilinear UpSampling2D back up, each
    with its skip Concatenate; a 1x1 conv to the classes. NHWC out: [N, H, W, K]."""
    import keras
    from keras import layers

    x = inputs = keras.Input((SIZE // 2, SIZE // 2, 3))
    enc1 = layers.Conv2D(8, 3, padding="same", activation="relu", name="enc1")(x)
    enc2 = layers.Conv2D(12, 3, padding="same", activation="relu", name="enc2")(
        layers.MaxPooling2D(2)(enc1))
    bottom = layers.Conv2D(16, 3, padding="same", activation="relu", name="bottleneck")(
        layers.MaxPooling2D(2)(enc2))
    up2 = layers.Conv2DTranspose(12, 2, strides=2, padding="same", name="up2")(bottom)
    dec2 = layers.Conv2D(12, 3, padding="same", activation="relu", name="dec2")(
        layers.Concatenate()([up2, enc2]))
    up1 = layers.UpSampling2D(2, interpolation="bilinear", name="up1")(dec2)
    dec1 = layers.Conv2D(8, 3, padding="same", activation="relu", name="dec1")(
        layers.Concatenate()([up1, enc1]))
    scores = layers.Conv2D(CLASSES, 1, activation="softmax" if softmax else None,
                           name="classes")(dec1)
    model = keras.Model(inputs, scores)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def unet_models() -> tuple[Any, Any]:
    """The U-Net with a softmax (what is exported) and the same one without (the
    scores the bundle explains)."""
    pytest.importorskip("tensorflow")
    with_softmax, linear = unet(True), unet(False)
    linear.set_weights(with_softmax.get_weights())
    return with_softmax, linear


def tape_cam(model: Any, layer: str, pixels: np.ndarray, cls: int, mask: np.ndarray
             ) -> np.ndarray:
    """Grad-CAM of sum(mask * scores[..., cls]) at ``layer``, by TF GradientTape."""
    import keras
    import tensorflow as tf

    tap = keras.Model(model.inputs, [model.output, model.get_layer(layer).output])
    x = tf.constant(pixels.astype(np.float32) / 255.0)
    with tf.GradientTape() as tape:
        scores, activations = tap(x, training=False)
        tape.watch(activations)
        score = tf.reduce_sum(scores[..., cls] * mask.astype(np.float32))
    gradients = tape.gradient(score, activations).numpy()
    return gradcam(activations.numpy().transpose(0, 3, 1, 2), gradients.transpose(0, 3, 1, 2))


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
    want = tape_cam(linear, layer, pixels, cls, mask)
    assert cam.shape == want.shape and want.max() > 0
    assert np.abs(normalised(cam) - normalised(want)).max() <= MAP_TOLERANCE


# ------------------------------------------------------------------ refusals


def tiny_segmenter() -> onnx.ModelProto:
    """conv -> relu -> 1x1 conv to 3 classes per pixel, NCHW [N, 3, 8, 8]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), n)
             for n, s in (("w1", (4, 3, 3, 3)), ("w2", (3, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["conv"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Conv", ["relu", "w2"], ["scores"], name="classes")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


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

