"""torchvision's detectors with random weights that still detect something, exported as
their users export them (``torch.onnx.export(model, ([image],), path, dynamo=False)``),
for the exporter's and the engine's torchvision detector tests and the bench.

Nothing is downloaded (``weights=None, weights_backbone=None``). Random weights find
nothing at the models' score thresholds, so each model is calibrated: every parameter
tensor perturbed apart, BatchNorm statistics taken from smooth images (else the
activations vanish with depth), each box regression's last layer scaled to small
deltas on the test image (``standardise``; else every box fills the image, and
pytorch-grad-cam's box target cannot tell detections apart), and the class-score
layer standardised there and its bias raised until a few detections pass
(``open_threshold``; SSDlite's softmax over 91 classes: its score threshold raised
instead). FCOS's box distances are raised by 1 (they pass a ReLU: else half the boxes
have no area), Faster R-CNN's RPN objectness is standardised and raised by 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Each family: its builder's extra arguments (small inputs: torchvision resizes inside
# the graph), the module that makes its class scores, and its default layer's module.
FAMILIES: dict[str, tuple[dict[str, Any], str, str]] = {
    # SSDlite's near-uniform softmax scores pass its threshold (0.001) by the hundred.
    "ssdlite320_mobilenet_v3_large": ({"score_thresh": 0.5}, "", "backbone.features.1"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        {"min_size": 160, "max_size": 224, "box_score_thresh": 0.5,
         "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000},
        "roi_heads.box_predictor.cls_score",
        "backbone.body.16"),
    "retinanet_resnet50_fpn": ({"min_size": 128, "max_size": 160},
                               "head.classification_head.cls_logits", "backbone.body.layer4"),
    "fcos_resnet50_fpn": ({"min_size": 128, "max_size": 160},
                          "head.classification_head.cls_logits", "backbone.body.layer4"),
}
# The last layer of each box regression (SSDlite's per level): standardised to small
# deltas, so that boxes lie near their anchors or proposals instead of all filling the
# image.
BOX_REGRESSIONS = ("bbox_pred", "bbox_reg", *(f"regression_head.module_list.{level}.1"
                                              for level in range(6)))
# The test image's size. The legacy export of torchvision's resizing differs from
# torch's own by 1e-5 (96x128 taken to RetinaNet's 128x160: its layer4 5e-5 apart,
# score gradients up to 4%), so the FPN models get an image they do not resize.
SIZES = {"ssdlite320_mobilenet_v3_large": (96, 128)}
SIZE = (128, 128)


@dataclass
class Detector:
    name: str
    model: Any  # the calibrated torch module, in eval mode
    path: Path  # its legacy ONNX export
    image: np.ndarray  # uint8 [H, W, 3], the image the export and the tests use
    layer: str  # the default layer's module path


def smooth_images(count: int, height: int, width: int, seed: int, grain: int = 16) -> Any:
    """Random images bilinearly upsampled from a grid of ``grain`` pixel cells."""
    import torch

    low = torch.rand(count, 3, height // grain, width // grain,
                     generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")


def test_image(name: str, seed: int = 1) -> np.ndarray:
    """A uint8 image for the model ``name``: the model sees x / 255, as the bundle
    feeds it. Of some texture, since a smooth one leaves the class scores of a random
    head without normalisation nearly constant over the anchors, their spread at
    rounding's level; smooth for SSDlite, whose scores are near-uniform on texture."""
    grain = 16 if name.startswith("ssdlite") else 4
    height, width = SIZES.get(name, SIZE)
    image = smooth_images(1, height, width, seed, grain)[0].permute(1, 2, 0).numpy()
    return np.round(image * 255).astype(np.uint8)


def as_tensor(image: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def calibrated(name: str, image: np.ndarray, seed: int = 0,
               detections: tuple[int, int] = (2, 40)) -> Any:
    import torch
    from torchvision.models import detection

    kwargs, scores, _ = FAMILIES[name]
    # SSDlite's extra blocks pass gradients back to its default layer's anchors only
    # with a common offset on every weight (as the prototype had); the heads
    # without normalisation of the others saturate with it.
    offset = 0.01 if not scores else 0.0
    torch.manual_seed(seed)
    model = getattr(detection, name)(weights=None, weights_backbone=None, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            # Noise in proportion to each tensor's spread (zero biases: 1e-3), so that
            # no two are equal and no convolution gains a large constant term.
            spread = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn_like(p) * 0.05 * (spread if spread > 0 else 0.02) + offset)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # a plain mean over the calibration batches
        model.train()
        batch, _ = model.transform(list(smooth_images(4, 160, 160, seed + 100)))
        features = model.backbone(batch.tensors)
        if hasattr(model, "head"):  # SSDlite's head has BatchNorm too
            model.head(list(features.values()) if isinstance(features, dict) else features)
    model.eval()
    for path, module in model.named_modules():
        if path.endswith(BOX_REGRESSIONS):
            standardise(model, module, image, 0.1)
    if type(model).__name__ == "FCOS":  # its distances pass a ReLU: keep boxes open
        with torch.no_grad():
            model.head.regression_head.bbox_reg.bias.add_(1.0)
    if hasattr(model, "rpn"):  # proposals over the RPN's score threshold (0.05)
        standardise(model, model.rpn.head.cls_logits, image)
        with torch.no_grad():
            model.rpn.head.cls_logits.bias.add_(2.0)
    if scores:
        standardise(model, model.get_submodule(scores), image)
        open_threshold(model, model.get_submodule(scores).bias, image, detections)
    return model


def standardise(model: Any, layer: Any, image: np.ndarray, std_wanted: float = 1.0) -> None:
    """Scale a head's last layer so that its outputs on ``image`` have mean 0 and
    standard deviation ``std_wanted`` (a perturbed head without normalisation
    saturates them)."""
    import torch

    seen: list[Any] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.flatten()))
    with torch.no_grad():
        model([as_tensor(image)])
        hook.remove()
        out = torch.cat(seen)
        mean, std = out.mean(), out.std()
        layer.weight.mul_(std_wanted / std)
        layer.bias.sub_(mean).mul_(std_wanted / std)


def open_threshold(model: Any, bias: Any, image: np.ndarray,
                   detections: tuple[int, int] = (2, 40)) -> None:
    """Raise the class scores' bias (a sigmoid head's every class; a softmax head's,
    Faster R-CNN's, classes 1 to 5 over the background and the rest) by the shift,
    found by bisection, that gives the image ``detections`` (2 to 40) detections."""
    import torch

    base = bias.detach().clone()
    step = torch.ones_like(base)
    if type(model).__name__ == "FasterRCNN":
        step = torch.zeros_like(base)
        step[1:6] = 1.0
    low, high = -16.0, 16.0
    with torch.no_grad():
        for _ in range(24):
            shift = (low + high) / 2
            bias.copy_(base + shift * step)
            (found,) = model([as_tensor(image)])
            if detections[0] <= len(found["scores"]) <= detections[1]:
                return
            low, high = (shift, high) if len(found["scores"]) < detections[0] else (low, shift)
    raise AssertionError(f"{type(model).__name__}: no bias gives {detections} detections")


def build(name: str, folder: Path, calibrate: bool = True,
          detections: tuple[int, int] = (2, 40)) -> Detector:
    """The calibrated model (or only built, random), exported by the user's own call."""
    import torch
    from torchvision.models import detection

    image = test_image(name)
    if calibrate:
        model = calibrated(name, image, detections=detections)
    else:
        model = getattr(detection, name)(weights=None, weights_backbone=None,
                                         **FAMILIES[name][0]).eval()
    path = folder / f"{name}.onnx"
    torch.onnx.export(model, ([as_tensor(image)],), str(path), dynamo=False, opset_version=17)
    return Detector(name, model, path, image, FAMILIES[name][2])
