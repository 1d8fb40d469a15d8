"""Heatmap arithmetic shared by every method: normalise, resize, colour."""

from __future__ import annotations

import numpy as np

# A map whose range is under this share of its largest magnitude is flat: what
# varies is float32 rounding (a few ulps, summed over channels), not the model.
FLAT_RANGE = 1e-5


def flat(maps: np.ndarray) -> np.ndarray:
    """bool [N]: maps that are constant, up to rounding, and so show nothing."""
    wide = maps.astype(np.float64)
    spread = wide.max(axis=(-2, -1)) - wide.min(axis=(-2, -1))
    magnitude = np.abs(wide).max(axis=(-2, -1))
    return spread <= FLAT_RANGE * magnitude


def normalize(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max scaling to [0, 1], as pytorch-grad-cam's scale_cam_image does,
    but with no fixed epsilon: a map of 1e-11 still spans [0, 1]. A flat map becomes
    zeros rather than magnified rounding noise."""
    wide = maps.astype(np.float64)
    low = wide.min(axis=(-2, -1), keepdims=True)
    spread = wide.max(axis=(-2, -1), keepdims=True) - low
    keep = ~flat(maps)[..., None, None]
    scaled = (wide - low) / np.where(keep, spread, 1.0)
    return np.where(keep, scaled, 0.0).astype(np.float32)


def interpolation_matrix(size_out: int, size_in: int) -> np.ndarray:
    """[out, in] weights of half-pixel bilinear interpolation (OpenCV's INTER_LINEAR
    when enlarging), edges clamped."""
    centers = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    centers = np.clip(centers, 0, size_in - 1)
    low = np.floor(centers).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centers - low
    matrix = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [N, h, w] maps, batched as two contractions.

    Plain einsum loops, not BLAS, on purpose: BLAS worker threads keep spinning
    after a call and take the cores onnxruntime's next batch needs (a 20% loss
    on 2 cores), while these arrays are small enough for the C loops.
    """
    if maps.shape[-2:] == (height, width):
        return maps.astype(np.float32, copy=False)
    rows = interpolation_matrix(height, maps.shape[-2])
    cols = interpolation_matrix(width, maps.shape[-1])
    tall = np.einsum("hi,nij->nhj", rows, maps.astype(np.float32))
    return np.einsum("nhj,wj->nhw", tall, cols)


def heatmaps(raw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Raw maps at layer resolution -> [N, H, W] in [0, 1] at input resolution."""
    return np.clip(resize_maps(normalize(raw.astype(np.float32)), height, width), 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (as OpenCV's COLORMAP_JET, in RGB) on values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the jet-coloured heatmap over an RGB or grey uint8 image of the same size."""
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    colour = jet(heatmap).astype(np.float32)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
