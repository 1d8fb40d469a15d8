"""Where the channels sit in a 4-D image tensor: NHWC (Keras) or NCHW (torch), and
how a transformer's token tensor [N, T, C] lies on its grid (``TokenGrid``).

One small type instead of bare strings, so the axes are worked out in one place.
``Layout`` is a ``str``, so metadata, JSON and comparisons with ``"nhwc"`` read as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np


class Layout(str, Enum):
    NHWC = "nhwc"
    NCHW = "nchw"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def of(cls, value: Any) -> Layout:
        """``value`` ("nhwc", "nchw" or a Layout) as a Layout; anything else: ValueError."""
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown layout {value!r}; expected nhwc or nchw") from None

    @property
    def channel_axis(self) -> int:
        return 3 if self is Layout.NHWC else 1

    @property
    def spatial_axes(self) -> tuple[int, int]:
        return (1, 2) if self is Layout.NHWC else (2, 3)

    def channels(self, shape: tuple[int, ...] | list[int]) -> int:
        return int(shape[self.channel_axis])

    def spatial(self, shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
        return int(shape[self.spatial_axes[0]]), int(shape[self.spatial_axes[1]])

    @property
    def channel_view(self) -> list[int]:
        """The shape that broadcasts a per-image channel vector [N, C] over this layout."""
        return [0, 1, 1, -1] if self is Layout.NHWC else [0, -1, 1, 1]

    def to_nchw(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 3, 1, 2) if self is Layout.NHWC else array

    def to_nhwc(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 2, 3, 1) if self is Layout.NCHW else array

    def from_nhwc(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 3, 1, 2) if self is Layout.NCHW else array


@dataclass(frozen=True)
class TokenGrid:
    """A token tensor [N, T, C] explained on its grid (vision transformers).

    The first ``leading`` tokens (a class token, a distillation token) are not on
    the grid; the other ``height * width`` tokens are its cells, row by row. Like
    ``Layout``, it turns the layer's activations and gradients into NCHW maps.
    """

    leading: int
    height: int
    width: int

    value: ClassVar[str] = "ntc"  # the ``activation_layout`` a token layer is stored with
    channel_axis: ClassVar[int] = 2

    def __str__(self) -> str:
        return self.value

    @property
    def tokens(self) -> int:
        """T: how many tokens the layer has."""
        return self.leading + self.height * self.width

    def grid_tokens(self, array: np.ndarray) -> np.ndarray:
        """The grid's tokens [N, h*w, C], the leading ones dropped."""
        return array[:, self.leading :, :]

    def to_nhwc(self, array: np.ndarray) -> np.ndarray:
        """[N, T, C] -> the grid [N, h, w, C]."""
        grid = self.grid_tokens(array)
        return grid.reshape(grid.shape[0], self.height, self.width, grid.shape[2])

    def to_nchw(self, array: np.ndarray) -> np.ndarray:
        """[N, T, C] -> the grid [N, C, h, w]."""
        return self.to_nhwc(array).transpose(0, 3, 1, 2)


# What an exported layer's activations are stored in.
ActivationLayout = Layout | TokenGrid
