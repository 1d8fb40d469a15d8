"""Object outlines as data sets give them (boxes, polygons, run-length masks), and the
pixels they cover. Pure numpy; no pycocotools.

A pixel (x, y) belongs to a box or polygon when its centre (x + 0.5, y + 0.5) is
inside, as in ``metrics.box_region``. Several shapes make one region, their union.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxcam.audit.metrics import mask_region
from onnxcam.errors import BadRowError


@dataclass(frozen=True)
class Box:
    """``x0 y0 x1 y1`` in image pixels, x0 < x1 and y0 < y1."""

    x0: float
    y0: float
    x1: float
    y1: float

    def region(self, height: int, width: int) -> np.ndarray:
        columns, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
        inside_x = (columns >= self.x0) & (columns < self.x1)
        inside_y = (rows >= self.y0) & (rows < self.y1)
        return inside_y[:, None] & inside_x[None, :]


@dataclass(frozen=True)
class Polygon:
    """A closed polygon ``x0 y0 x1 y1 ...`` in image pixels; inside by the even-odd rule."""

    points: tuple[float, ...]

    def region(self, height: int, width: int) -> np.ndarray:
        xs, ys = np.asarray(self.points[0::2]), np.asarray(self.points[1::2])
        centre_x = np.arange(width)[None, :] + 0.5
        centre_y = np.arange(height)[:, None] + 0.5
        inside = np.zeros((height, width), bool)
        for i in range(len(xs)):
            ax, ay, bx, by = xs[i], ys[i], xs[i - 1], ys[i - 1]
            if ay == by:  # a horizontal edge crosses no horizontal ray
                continue
            crosses = (ay > centre_y) != (by > centre_y)
            x_at = ax + (centre_y - ay) * (bx - ax) / (by - ay)
            inside ^= crosses & (centre_x < x_at)
        return inside


@dataclass(frozen=True)
class Rle:
    """COCO's run-length mask: alternating runs of 0s and 1s, starting with 0s, over
    the pixels in column-major order of a ``height`` x ``width`` image."""

    counts: tuple[int, ...]
    height: int
    width: int

    def decode(self) -> np.ndarray:
        ones = np.arange(len(self.counts)) % 2 == 1
        values = np.repeat(ones, self.counts)
        return values.reshape(self.width, self.height).T

    def region(self, height: int, width: int) -> np.ndarray:
        mask = self.decode()
        if mask.shape == (height, width) or not mask.any():
            return mask if mask.shape == (height, width) else np.zeros((height, width), bool)
        return mask_region(mask, height, width)  # annotated at another size: nearest


Shape = Box | Polygon | Rle


def union_region(shapes: Sequence[Shape], height: int, width: int) -> np.ndarray:
    """bool [height, width]: the pixels of any of ``shapes``."""
    region = np.zeros((height, width), bool)
    for shape in shapes:
        region |= shape.region(height, width)
    if not region.any():
        raise BadRowError(f"the annotated objects cover no pixel of the {width}x{height} image")
    return region


# -- checked constructors: a data set's values as written -> a shape, or BadRowError --


def _numbers(values: object, what: str) -> tuple[float, ...]:
    if not isinstance(values, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise BadRowError(f"{what} must be a list of numbers, got {values!r}")
    numbers = tuple(float(v) for v in values)
    if not all(np.isfinite(numbers)):
        raise BadRowError(f"{what} holds a non-finite number: {values!r}")
    return numbers


def coco_box(bbox: object) -> Box:
    """COCO's ``[x, y, width, height]``."""
    numbers = _numbers(bbox, "bbox")
    if len(numbers) != 4 or numbers[2] <= 0 or numbers[3] <= 0:
        raise BadRowError(f"bbox must be [x, y, width, height] with width and height > 0, "
                          f"got {bbox!r}")
    x, y, w, h = numbers
    return Box(x, y, x + w, y + h)


def polygon(points: object) -> Polygon:
    numbers = _numbers(points, "a polygon")
    if len(numbers) < 6 or len(numbers) % 2:
        raise BadRowError(f"a polygon needs at least three x, y pairs, got {len(numbers)} "
                          "number(s)")
    return Polygon(numbers)


def rle(segmentation: dict[str, object]) -> Rle:
    """A COCO RLE, compressed (``counts`` a string) or not (a list of ints)."""
    size = segmentation.get("size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise BadRowError(f"RLE size must be [height, width] of positive ints, got {size!r}")
    height, width = size
    raw = segmentation.get("counts")
    if isinstance(raw, str):
        counts = rle_counts_from_string(raw)
    elif isinstance(raw, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in raw):
        counts = tuple(raw)
    else:
        raise BadRowError(f"RLE counts must be a string or a list of ints, got {raw!r:.60}")
    if any(count < 0 for count in counts):
        raise BadRowError("RLE counts hold a negative run")
    if sum(counts) != height * width:
        raise BadRowError(f"RLE counts cover {sum(counts)} pixels, not {height}x{width} = "
                          f"{height * width}")
    return Rle(counts, height, width)


def rle_counts_from_string(text: str) -> tuple[int, ...]:
    """Decode COCO's compressed counts (pycocotools' ``rleFrString``): each count in
    5-bit groups, least significant first, as characters from '0' (48); 0x20 marks
    "more groups follow", 0x10 in the last group a negative number; from the fourth
    count on, each is stored as its difference to the count two places before."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            if position >= len(text):
                raise BadRowError("RLE counts string ends inside a number")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise BadRowError(f"RLE counts string holds {text[position]!r}, not a "
                                  "character from '0' to 'o'")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return tuple(counts)
