"""Crops of a detector level's map around anchors' cells, for its local head
(``BundleInfo.levels``), and their gradients put back in the map. Shared by the
exporter, which checks the local heads, and the engine, which runs them."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import Level


def crops(maps: np.ndarray, images: np.ndarray, cells: list[int], level: Level
          ) -> tuple[np.ndarray, np.ndarray]:
    """Row r's square of ``level.side`` cells around ``cells[r]`` (row-major in the
    level's grid) from its image's map ``maps[images[r]]`` ([N, C, h, w]), zero
    beyond the map, and its mask [R, 1, side, side]: 1 on the map, 0 beyond it."""
    r, side = level.radius, level.side
    channels = maps.shape[1]
    crop = np.zeros((len(cells), channels, side, side), np.float32)
    mask = np.zeros((len(cells), 1, side, side), np.float32)
    for row, (image, cell) in enumerate(zip(images, cells)):
        y, x = divmod(cell, level.width)
        top, bottom = max(y - r, 0), min(y + r + 1, level.height)
        left, right = max(x - r, 0), min(x + r + 1, level.width)
        inside = (slice(top - y + r, bottom - y + r), slice(left - x + r, right - x + r))
        crop[row][(slice(None), *inside)] = maps[image, :, top:bottom, left:right]
        mask[row, 0][inside] = 1.0
    return crop, mask


def crop_sums(gradients: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[R, C]: each crop's gradients summed over the map (``placed``'s sum over space)."""
    return np.einsum("rchw,rxhw->rc", gradients, masks)


def placed(gradients: np.ndarray, cells: list[int], level: Level) -> np.ndarray:
    """Crops' gradients [R, C, side, side] as gradients of the whole map [R, C, h, w]:
    zero outside each crop, and beyond the map's edge dropped."""
    r, side = level.radius, level.side
    rows, channels = gradients.shape[:2]
    padded = np.zeros((rows, channels, level.height + 2 * r, level.width + 2 * r), np.float32)
    for row, cell in enumerate(cells):
        y, x = divmod(cell, level.width)
        padded[row, :, y:y + side, x:x + side] = gradients[row]
    return padded[:, :, r:r + level.height, r:r + level.width]
