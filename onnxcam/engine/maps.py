"""Heatmap arithmetic shared by every method: normalise, resize, colour."""

from __future__ import annotations

from collections.abc import Callable

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


def bilinear_taps(size_out: int, size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, frac) per output position of half-pixel bilinear interpolation
    (OpenCV's INTER_LINEAR when enlarging, and when shrinking without its area
    averaging), edges clamped: out[i] = in[low] * (1 - frac) + in[high] * frac."""
    centers = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    centers = np.clip(centers, 0, size_in - 1)
    low = np.floor(centers).astype(int)
    return low, np.minimum(low + 1, size_in - 1), centers - low


def interpolation_matrix(size_out: int, size_in: int) -> np.ndarray:
    """[out, in] weights of ``bilinear_taps``."""
    low, high, frac = bilinear_taps(size_out, size_in)
    matrix = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [N, h, w] maps (``bilinear_taps``), one axis at a time.

    Each output cell reads two taps per axis, gathered: a detector's twenty maps
    at 640x640 cost a few dozen million operations this way, where a product with
    the dense interpolation matrices costs over 600 million (and BLAS, which would
    speed that up, leaves worker threads spinning on the cores onnxruntime's next
    batch needs: a 20% loss on 2 cores).
    """
    if maps.shape[-2:] == (height, width):
        return maps.astype(np.float32, copy=False)
    maps = maps.astype(np.float32, copy=False)
    # Columns first, on the small maps; then whole rows, gathered as contiguous runs.
    low, high, frac = bilinear_taps(width, maps.shape[-1])
    share = frac.astype(np.float32)
    wide = maps[:, :, low] * (1 - share) + maps[:, :, high] * share
    low, high, frac = bilinear_taps(height, maps.shape[-2])
    share = frac.astype(np.float32)[:, None]
    out = wide[:, low]
    out *= 1 - share
    upper = wide[:, high]
    upper *= share
    out += upper
    return out


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


def _through(*stops: tuple[int, int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """A colour map running linearly through evenly spaced RGB ``stops``."""
    table = np.asarray(stops, np.float64)
    positions = np.linspace(0.0, 1.0, len(stops))

    def colour(values: np.ndarray) -> np.ndarray:
        v = np.clip(values, 0.0, 1.0)
        channels = [np.interp(v, positions, table[:, c]) for c in range(3)]
        return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)

    return colour


COLORMAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jet": jet,  # pytorch-grad-cam's default (cv2.COLORMAP_JET)
    # perceptually even, and readable in grey print and by most colour-blind readers:
    # viridis through 17 of its colours (these three within 8 levels of matplotlib's)
    "viridis": _through((68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134),
                        (59, 82, 139), (51, 99, 141), (44, 114, 142), (38, 130, 142),
                        (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115),
                        (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25),
                        (253, 231, 37)),
    # turbo (Google's improved jet) and inferno, each through 17 of its colours
    "turbo": _through((48, 18, 59), (64, 64, 162), (70, 107, 227), (66, 148, 255),
                      (40, 188, 235), (24, 221, 194), (50, 242, 152), (109, 254, 98),
                      (164, 252, 60), (205, 236, 52), (238, 207, 58), (253, 172, 52),
                      (251, 126, 33), (235, 80, 14), (208, 47, 5), (169, 22, 1), (122, 4, 3)),
    "inferno": _through((0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110),
                        (113, 25, 110), (138, 34, 106), (163, 44, 97), (188, 55, 84),
                        (210, 70, 68), (228, 90, 49), (241, 115, 29), (249, 142, 9),
                        (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164)),
    "hot": _through((0, 0, 0), (255, 0, 0), (255, 255, 0), (255, 255, 255)),
    "gray": _through((0, 0, 0), (255, 255, 255)),
}


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5,
            colormap: str = "jet") -> np.ndarray:
    """The coloured heatmap blended over an RGB or grey uint8 image of the same size:
    ``(1 - alpha) * image + alpha * colour`` (pytorch-grad-cam's ``show_cam_on_image``
    calls 1 - alpha its ``image_weight``). ``colormap`` is one of ``COLORMAPS``."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose from {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    colour = COLORMAPS[colormap](heatmap).astype(np.float32)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
