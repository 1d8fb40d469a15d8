"""RISE's deletion and insertion AUCs: how much the explained class's probability
depends on the pixels a heatmap ranks first.

It needs only something with the engine's ``predict`` (an ``Explainer``), so the
audit and a worker's job both call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from onnxcam.bundle import HEAD_SOFTMAX
from onnxcam.scores import probabilities

DEFAULT_STEPS = 16
# RISE blurs 224-pixel images with sigma 5; other sizes scale with their longer side.
BLUR_SIGMA_AT_224 = 5.0


class Predictor(Protocol):
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] at the bundle's size -> logits [N, K]."""
        ...


def blur(images: np.ndarray) -> np.ndarray:
    """Gaussian blur of uint8 [N, H, W, C] images (edges replicated), RISE's insertion
    start: sigma 5 on 224-pixel images, scaled with the longer side."""
    height, width = images.shape[1:3]
    sigma = BLUR_SIGMA_AT_224 * max(height, width) / 224
    radius = max(1, math.ceil(2 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = images.astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        size = out.shape[axis]
        out = sum(tap * np.take(padded, np.arange(k, k + size), axis=axis)
                  for k, tap in enumerate(taps))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def trapezoid_auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves sampled at evenly spaced fractions 0..1 (last axis)."""
    steps = curve.shape[-1] - 1
    return (curve.sum(axis=-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


def deletion_insertion_auc(
    explainer: Predictor,
    images: np.ndarray,
    heatmaps: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    steps: int = DEFAULT_STEPS,
    head: str = HEAD_SOFTMAX,
) -> tuple[np.ndarray, np.ndarray]:
    """RISE's deletion and insertion AUCs, one per image.

    ``images`` is uint8 [N, H, W, C] and ``heatmaps`` [N, H, W], both at the bundle's
    size. Pixels are ranked most salient first (ties in row-major order). At each of
    ``steps + 1`` fractions 0, 1/steps, ..., 1 of the pixels, deletion sets the
    top-ranked pixels to black (zero), and insertion copies them into a blurred copy
    of the image (see ``blur``). The curve is the probability of the target class
    by the bundle's ``head`` (``scores.probabilities``: softmax, or a sigmoid head's
    own probability of that class); its AUC is by the trapezoid rule over the
    fraction. Good maps give low deletion and high insertion AUCs. Each image's
    2 * (steps + 1) perturbed copies go through the engine as one batch.
    """
    count, height, width = images.shape[:3]
    pixels = height * width
    sizes = np.rint(np.linspace(0, pixels, steps + 1)).astype(np.int64)
    starts = blur(images)
    deletion = np.zeros(count, np.float32)
    insertion = np.zeros(count, np.float32)
    for n in range(count):
        order = np.argsort(-heatmaps[n].reshape(-1), kind="stable")
        rank = np.empty(pixels, np.int64)
        rank[order] = np.arange(pixels)
        chosen = (rank[None, :] < sizes[:, None]).reshape(steps + 1, height, width, 1)
        deleted = np.where(chosen, np.uint8(0), images[n])
        inserted = np.where(chosen, images[n], starts[n])
        logits = explainer.predict(np.concatenate([deleted, inserted]))
        curves = probabilities(logits, head)[:, int(targets[n])].reshape(2, steps + 1)
        deletion[n], insertion[n] = trapezoid_auc(curves)
    return deletion, insertion
