"""Ultralytics YOLO detectors as their users export them, with random weights that detect.

Built from the package's own YAML (never a ``.pt`` download), every tensor perturbed
(``zoo.perturb``), BatchNorm calibrated on smooth images and the class biases shifted
so that a few (class, anchor) pairs of the test image score above predict's 0.25.
Exported by ultralytics' ``model.export(format="onnx")``: raw head, no NMS, output
``[1, 4 + K, A]`` (cx, cy, w, h in input pixels, then the sigmoid class scores).
ultralytics and torch are imported lazily.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zoo

# No downloads, no pip installs, no telemetry: everything here is built from YAML.
OFFLINE = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false"}
SIZE = 128  # 16x16, 8x8 and 4x4 anchors: 336 in all
CONF = 0.25  # ultralytics' predict default
# Each model's neck output at stride 8, the layer onnxcam picks by default.
STRIDE8 = {"yolov8n": "model.15", "yolo11n": "model.16"}
# The maps each level of the Detect head reads (strides 8, 16, 32): the layers onnxcam
# explains each level's detections at.
LEVELS = {"yolov8n": ("model.15", "model.18", "model.21"),
          "yolo11n": ("model.16", "model.19", "model.22")}


def _ultralytics() -> Any:
    """The package, imported offline, with Pillow's ``Image.open`` given back: importing
    it swaps in a wrapper that tries to pip-install a HEIF plugin on any file Pillow
    cannot identify, which later tests of bad image bytes in the same process hit."""
    os.environ.update(OFFLINE)
    from PIL import Image

    opened = Image.open
    import ultralytics

    Image.open = opened
    return ultralytics


def unit_input(batch: np.ndarray, dtype: Any = None) -> Any:
    """What a ``preprocess="unit"`` bundle feeds the model (x / 255), NCHW in torch."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))) / 255.0
    return x if dtype is None else x.to(dtype)


def calibrate_batchnorm(model: Any, size: int, seed: int = 1) -> None:
    """BatchNorm's running statistics from smooth images and noise, as ``zoo.calibrate``
    but read with ultralytics' own x / 255."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.eval()
    for norm in norms:
        norm.train()
    noise = np.random.default_rng(seed).integers(0, 256, (8, size, size, 3), np.uint8)
    with torch.no_grad():
        model(unit_input(np.concatenate([zoo.images(size, 8, seed=seed), noise])))
    model.eval()


def class_logits(model: Any, image: np.ndarray) -> np.ndarray:
    """The pre-sigmoid class scores [K, A] of one image (ultralytics applies the sigmoid)."""
    import torch

    with torch.no_grad():
        scores = model(unit_input(image[None]))[0][0, 4:].double().numpy()
    return np.log(scores) - np.log1p(-scores)


def calibrate_class_biases(model: Any, image: np.ndarray, per_level: int = 2) -> None:
    """Shift the class biases of each level of the Detect head so that ``per_level``
    (class, anchor) pairs of ``image`` at that level score above ``CONF``: ultralytics
    initialises them to log(5 / K / (640 / stride)^2), a prior under which nothing is
    found, and one shift for all levels would leave every finding on one of them."""
    import torch

    logits = class_logits(model, image)
    head = model.model[-1]
    start = 0
    with torch.no_grad():
        for stride, branch in zip(head.stride.tolist(), head.cv3):
            count = (image.shape[0] // int(stride)) * (image.shape[1] // int(stride))
            level = np.sort(logits[:, start:start + count].ravel())[::-1]
            start += count
            # Halfway between the last pair that should pass and the first that should not.
            edge = (level[per_level - 1] + level[per_level]) / 2
            branch[-1].bias.add_(float(np.log(CONF / (1 - CONF)) - edge))


def build(name: str, size: int = SIZE, seed: int = 0) -> tuple[Any, Any]:
    """The ``ultralytics.YOLO`` wrapper of ``<name>.yaml`` and its torch model, perturbed
    and calibrated on ``test_image(size)`` (eval mode, float32)."""
    import torch

    torch.manual_seed(seed)  # ultralytics initialises the layers from torch's global RNG
    yolo = _ultralytics().YOLO(f"{name}.yaml")
    model = yolo.model
    zoo.perturb(model, seed)
    calibrate_batchnorm(model, size)
    calibrate_class_biases(model, test_image(size))
    return yolo, model


def test_image(size: int = SIZE) -> np.ndarray:
    """The one uint8 HWC image the fidelity tests explain."""
    return zoo.images(size, 1, seed=7)[0]


def export_onnx(yolo: Any, path: Path, size: int = SIZE, dynamic: bool = False) -> Path:
    """ultralytics' own ONNX export (simplified by onnxslim, its default) to ``path``."""
    # It writes next to the working directory's <name>.onnx; contextlib.chdir is 3.11+.
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            written = yolo.export(format="onnx", imgsz=size, dynamic=dynamic, device="cpu")
        finally:
            os.chdir(here)
        shutil.move(Path(folder) / written, path)
    return path


def export_bundle(yolo: Any, name: str, folder: Path, dynamic: bool) -> Path:
    """The detection bundle of ``yolo``: ultralytics' own ONNX export, then onnxcam's
    (``dynamic=True`` leaves height and width open too: the size is given)."""
    import onnxcam

    source = export_onnx(yolo, folder / f"{name}.onnx", dynamic=dynamic)
    bundle = folder / f"{name}.cam.onnx"
    size = {"input_size": (SIZE, SIZE)} if dynamic else {}
    onnxcam.export(source, bundle, preprocess="unit", **size)
    return bundle


def grad_cam(model: Any, layer: str, image: np.ndarray, pairs: Sequence[tuple[int, int]]
             ) -> np.ndarray:
    """Grad-CAM by hand, in float64 torch autograd: each (class, anchor) pair's score
    ``output[0, 4 + class, anchor]`` backpropagated to the module ``layer`` (its output,
    caught by a forward hook); ReLU(sum_k mean(grad_k) act_k), one map per pair."""
    import torch

    wide = copy.deepcopy(model).double().eval()
    module = dict(wide.named_modules())[layer]
    caught: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        output = wide(unit_input(image[None], torch.float64))[0]
    finally:
        handle.remove()
    activations = caught[0]
    maps = []
    for cls, anchor in pairs:
        (grad,) = torch.autograd.grad(output[0, 4 + cls, anchor], activations,
                                      retain_graph=True)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu((weights * activations).sum(dim=1))[0].detach().numpy())
    return np.stack(maps)


def level_grad_cam(model: Any, name: str, image: np.ndarray,
                   pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """``grad_cam`` of each pair at its own level's map (``LEVELS``: anchors run level
    by level, each row by row), brought to the stride-8 grid by torch's bilinear
    interpolation (half-pixel, as onnxcam resizes)."""
    import torch

    height, width = image.shape[:2]
    sizes = [(height // stride) * (width // stride) for stride in (8, 16, 32)]
    starts = np.cumsum([0, *sizes])
    maps = []
    for cls, anchor in pairs:
        level = int(np.searchsorted(starts, anchor, side="right")) - 1
        (cam,) = grad_cam(model, LEVELS[name][level], image, [(cls, anchor)])
        fine = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None],
                                               size=(height // 8, width // 8),
                                               mode="bilinear", align_corners=False)
        maps.append(fine[0, 0].numpy())
    return np.stack(maps)


def top_pairs(model: Any, image: np.ndarray, count: int = 5) -> list[tuple[int, int]]:
    """The ``count`` highest-scoring (class, anchor) pairs of ``image``."""
    logits = class_logits(model, image)
    flat = np.argsort(logits.ravel())[::-1][:count]
    return [(int(i // logits.shape[1]), int(i % logits.shape[1])) for i in flat]
