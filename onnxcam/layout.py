"""Where the channels sit in a 4-D image tensor: NHWC (Keras) or NCHW (torch).

One small type instead of bare strings, so the axes are worked out in one place.
It is a ``str``, so metadata, JSON and comparisons with ``"nhwc"`` read as before.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

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
