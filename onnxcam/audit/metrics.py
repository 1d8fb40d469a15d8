"""How well a heatmap sits on the object: energy-in-box and the pointing game.

Pure numpy on arrays. Regions are boolean [H, W] arrays at the heatmap's
resolution. RISE's deletion and insertion AUCs live in the engine
(``onnxcam.engine.faithfulness``), since a worker's job computes them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from onnxcam.errors import BadRowError


def box_region(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """The pixels of an ``x0 y0 x1 y1`` box: x0 <= x < x1 and y0 <= y < y1 for integer
    coordinates. In general a pixel is inside when its centre (x + 0.5, y + 0.5) is
    inside [x0, x1) x [y0, y1). Parts outside the image are cut off."""
    x0, y0, x1, y1 = bbox
    columns = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    inside_x = (columns >= x0) & (columns < x1)
    inside_y = (rows >= y0) & (rows < y1)
    region = inside_y[:, None] & inside_x[None, :]
    if not region.any():
        raise BadRowError(f"bbox {' '.join(f'{v:g}' for v in bbox)} covers no pixel of the "
                          f"{width}x{height} image")
    return region


def mask_region(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The nonzero pixels of a mask image ([h, w] or [h, w, C]), resized with nearest
    neighbours to [height, width] when its size differs."""
    values = np.asarray(mask)
    binary = np.asarray(values.any(axis=-1) if values.ndim == 3 else values != 0)
    if binary.shape != (height, width):
        picture = Image.fromarray(binary.astype(np.uint8) * 255)
        resized = picture.resize((width, height), Image.Resampling.NEAREST)
        binary = np.asarray(resized) != 0
    if not binary.any():
        raise BadRowError(f"the mask has no nonzero pixel at {width}x{height}")
    return binary


def energy_in_box(heatmap: np.ndarray, region: np.ndarray) -> float:
    """The share of the heatmap's mass inside ``region`` (energy-based pointing game,
    Score-CAM). An all-zero heatmap has energy 0."""
    total = float(heatmap.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    return float(heatmap[region].sum(dtype=np.float64)) / total


def pointing_hit(heatmap: np.ndarray, region: np.ndarray) -> bool:
    """Whether the heatmap's maximum (the first in row-major order, on ties) is inside
    ``region``. An all-zero heatmap points nowhere: a miss."""
    if float(heatmap.max()) <= 0:
        return False
    return bool(region.flat[int(np.argmax(heatmap))])


