"""The layers strip (``explain --layers-strip``): labels one can read, and a colour bar
that says what the overlays' colours mean."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from onnxcam.engine.outputs import OverlayStyle, render_strip

# The colormaps' ends, by hand: jet as OpenCV's COLORMAP_JET (0 -> half blue, 1 -> half
# red), viridis's first and last colours as matplotlib lists them.
ENDS = {"jet": ((0, 0, 127), (127, 0, 0)), "viridis": ((68, 1, 84), (253, 231, 37))}
OLD_LABEL_BAND = 14  # rows above the panels with Pillow's small bitmap-sized font


def strip_of(colormap: str) -> np.ndarray:
    black = np.zeros((48, 64, 3), np.uint8)  # the input panel: black from its first row
    rng = np.random.default_rng(5)
    maps = {"relu1": rng.random((8, 8)), "last_relu": rng.random((4, 4))}
    png = render_strip(black, maps, OverlayStyle(alpha=0.5, colormap=colormap))
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def label_band(pixels: np.ndarray) -> int:
    """Rows above the (black) input panel, found from the pixels alone."""
    column = pixels[:, 20]
    return int(np.flatnonzero((column == 0).all(axis=1))[0])


@pytest.mark.parametrize("colormap", ["jet", "viridis"])
def test_labels_are_larger_and_a_colour_bar_spans_the_colormap(colormap: str) -> None:
    pixels = strip_of(colormap)
    band = label_band(pixels)
    assert band > OLD_LABEL_BAND + 6
    text_rows = np.flatnonzero((pixels[:band, :60] < 100).all(axis=-1).any(axis=1))
    assert text_rows.size and text_rows[-1] - text_rows[0] + 1 >= 12  # "input", 16 px font
    panel_end = band + np.flatnonzero(~(pixels[band:, 20] == 0).all(axis=1))[0]
    below = pixels[panel_end:]
    first, last = ENDS[colormap]
    bar_rows = []
    for index, row in enumerate(below):
        coloured = np.flatnonzero((row != 255).any(axis=-1))
        if coloured.size > pixels.shape[1] // 2 and tuple(row[coloured[0]]) == first \
                and tuple(row[coloured[-1]]) == last:
            bar_rows.append(panel_end + index)
    assert len(bar_rows) >= 10, "no colour bar from the colormap's 0 to its 1 colour"
    ticks = pixels[bar_rows[-1] + 1:]  # their marks and labels: dark pixels under the bar
    assert (ticks < 80).all(axis=-1).sum() > 30
