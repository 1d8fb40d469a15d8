"""Segmenters for the tests: torchvision's FCN, DeepLabV3 and LR-ASPP at random weights,
a Keras U-Net, a tiny ONNX one, and pytorch-grad-cam's maps of a class over a mask.

One place for them: the exporter's, the engine's and the CLI's segmentation tests
build the same models.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cam_references import ref_normalize

import onnxcam

SIZE = 64
CLASSES = 4


def image(seed: int = 5, count: int = 1, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def map_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |a - b| of the two maps, each min-max normalised, as the references make them."""
    assert got.shape == want.shape, (got.shape, want.shape)
    pair = np.stack([got, want]).astype(np.float64)
    normalised = ref_normalize(pair)
    return float(np.abs(normalised[0] - normalised[1]).max())


# ------------------------------------------------------------------ torchvision

# name: (builder's name, the pytorch-grad-cam layer, the export layer)
TORCH_MODELS = {
    "fcn": ("fcn_resnet50", lambda m: m.backbone.layer4, "backbone.layer4"),
    # The backbone's last block ("backbone" itself returns a dict).
    "deeplabv3": ("deeplabv3_mobilenet_v3_large", lambda m: m.backbone["16"], "backbone.16"),
    # LR-ASPP's high-resolution (low-level) branch: the backbone's 'low' feature.
    "lraspp": ("lraspp_mobilenet_v3_large", lambda m: m.backbone["4"], "backbone.4"),
}


def torchvision_segmenter(name: str, live: bool = False) -> Any:
    """One of ``TORCH_MODELS`` at random weights, ``perturbed``; ``live``: made
    ``lively`` too."""
    import torch
    from torchvision.models import segmentation

    torch.manual_seed(0)
    model = getattr(segmentation, TORCH_MODELS[name][0])(
        weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False)
    model = perturbed(model, torch)
    return lively(model, torch) if live else model


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


def lively(model: Any, torch: Any) -> Any:
    """BN statistics measured on random images, and the class scores centred on them.

    ``perturbed`` alone leaves DeepLabV3's and LR-ASPP's scores nearly the same for
    every image (DeepLabV3's differ by 2e-7 of their size), and one class winning
    every pixel; measured statistics make the scores depend on the image, and
    centring lets every class win some pixels, so an image has several regions.
    """
    generator = torch.Generator().manual_seed(7)
    for norm in model.modules():
        if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            continue
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batches
    model.train()
    last = [m for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == CLASSES][-1]
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, SIZE, SIZE, generator=generator))
        model.eval()
        scores = model(torch.rand(4, 3, SIZE, SIZE, generator=generator))["out"]
        last.bias -= scores.mean(dim=(0, 2, 3))  # bilinear upsampling keeps a constant
    return model


def torch_input(pixels: np.ndarray, torch: Any) -> Any:
    """The bundle's ``unit`` preprocessing: x / 255, NCHW."""
    return torch.tensor(pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)


def export_torch(model: Any, how: str, layer: str | None, folder: Path) -> Path:
    """A bundle of ``model`` as a user makes one: through ``torch.onnx.export``
    (``dynamo`` or ``legacy``) and the file, or the module itself (``module``)."""
    import torch

    x = torch.rand(1, 3, SIZE, SIZE)
    out = folder / f"{how}.bundle.onnx"
    if how == "module":
        onnxcam.export(model, out, example=x, layer=layer, logits="out")
        return out
    # The file's one output is the dict's "out", under a name of the exporter's making.
    onnxcam.export(torch_onnx(model, how, folder), out, layer=layer)
    return out


def torch_onnx(model: Any, how: str, folder: Path) -> Path:
    """``torch.onnx.export`` of ``model`` at batch 1, by the dynamo or legacy exporter."""
    import torch

    source = folder / f"{how}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(source),
                          dynamo=how == "dynamo")
    return source


def pytorch_grad_cam_maps(model: Any, layer: Any, x: Any, regions: list[tuple[int, np.ndarray]],
                          method: str = "gradcam") -> np.ndarray:
    """pytorch-grad-cam's ``method`` with ``SemanticSegmentationTarget(c, mask)`` for
    each row of ``x`` and its (c, mask), at the layer's size (its own get_cam_image on
    its own hooked activations and gradients, after its ReLU), run in float64: at
    random init torch's float32 rounding alone moves a normalised map by 3e-3."""
    import torch
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    kinds = {"gradcam": GradCAM, "hirescam": HiResCAM, "xgradcam": XGradCAM,
             "layercam": LayerCAM, "gradcam++": GradCAMPlusPlus}

    class Out(torch.nn.Module):  # the tutorial's wrapper: the dict's "out" alone
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: Any) -> Any:
            return self.inner(batch)["out"]

    path = next(name for name, module in model.named_modules() if module is layer)
    model = copy.deepcopy(model).double()
    layer, x = model.get_submodule(path), x.double()
    targets = [SemanticSegmentationTarget(cls, mask.astype(np.float64)) for cls, mask in regions]
    with kinds[method](model=Out(model), target_layers=[layer]) as cam:
        cam(input_tensor=x, targets=targets)
        store = cam.activations_and_grads
        activations = store.activations[0].cpu().numpy()
        gradients = store.gradients[0].cpu().numpy()
        layer_maps = cam.get_cam_image(x, layer, targets, activations, gradients,
                                       eigen_smooth=False)
    return np.maximum(layer_maps, 0)


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


def unet_pair() -> tuple[Any, Any]:
    """The U-Net with a softmax (what is exported) and the same one without (the
    scores a bundle explains)."""
    with_softmax, linear = unet(True), unet(False)
    linear.set_weights(with_softmax.get_weights())
    return with_softmax, linear


def tape_outputs(model: Any, layer: str, pixels: np.ndarray, regions: list[tuple[int, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """NCHW float64 activations at ``layer`` and the gradients of each row's
    sum(mask * scores[..., c]) there, by TF GradientTape (``pixels``: one row each)."""
    import keras
    import tensorflow as tf

    tap = keras.Model(model.inputs, [model.output, model.get_layer(layer).output])
    x = tf.constant(pixels.astype(np.float32) / 255.0)
    masks = np.zeros((len(regions), *pixels.shape[1:3], CLASSES), np.float32)
    for row, (cls, mask) in enumerate(regions):
        masks[row, ..., cls] = mask
    with tf.GradientTape() as tape:
        scores, activations = tap(x, training=False)
        tape.watch(activations)
        score = tf.reduce_sum(scores * masks)  # rows do not mix: one sum seeds them all
    gradients = tape.gradient(score, activations).numpy()
    return (activations.numpy().transpose(0, 3, 1, 2).astype(np.float64),
            gradients.transpose(0, 3, 1, 2).astype(np.float64))


# ------------------------------------------------------------------ tiny ONNX


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
