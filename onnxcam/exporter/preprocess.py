"""The preprocessing conventions a bundle can embed, as per-channel affine maps.

``caffe``, ``tf`` and ``torch`` follow ``keras.applications.imagenet_utils``:
BGR minus the ImageNet mean; [-1, 1]; RGB/255 minus mean over std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcam.bundle import PREPROCESS_MODES
from onnxcam.errors import UnsupportedModelError

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float64)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float64)


@dataclass(frozen=True)
class Affine:
    """``y = x[..., order] * scale + offset`` on NHWC floats in 0..255."""

    flip_rgb: bool
    scale: np.ndarray
    offset: np.ndarray


def affine_for(mode: str, channels: int) -> Affine:
    if mode not in PREPROCESS_MODES:
        raise UnsupportedModelError(
            f"unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESS_MODES)}"
        )
    if mode in ("caffe", "torch") and channels != 3:
        raise UnsupportedModelError(
            f"--preprocess {mode} needs 3 channels, the model has {channels}"
        )
    ones = np.ones(channels, np.float64)
    if mode == "none":
        return Affine(False, ones, 0 * ones)
    if mode == "unit":
        return Affine(False, ones / 255.0, 0 * ones)
    if mode == "tf":
        return Affine(False, ones / 127.5, -ones)
    if mode == "caffe":
        return Affine(True, ones, -CAFFE_MEAN_BGR)
    return Affine(False, 1.0 / (255.0 * TORCH_STD), -TORCH_MEAN / TORCH_STD)


def preprocess_numpy(images: np.ndarray, mode: str) -> np.ndarray:
    """What the bundle does to its uint8 NHWC input before the model sees it."""
    affine = affine_for(mode, images.shape[-1])
    x = images.astype(np.float64)
    if affine.flip_rgb:
        x = x[..., ::-1]
    return (x * affine.scale + affine.offset).astype(np.float32)
