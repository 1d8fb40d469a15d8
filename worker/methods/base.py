"""The shared base of every CAM method.

A method turns what the bundle returned into one map per image at layer resolution
(``weigh``); the base applies the ReLU. Normalising and resizing belong to the
engine. Activations and gradients reach methods as NCHW, whatever the bundle's
layout, so formulas read as in pytorch-grad-cam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from worker.bundle import OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS, BundleInfo


@dataclass
class LayerMaps:
    """One batch of bundle outputs, with the pieces methods read."""

    outputs: dict[str, np.ndarray]
    info: BundleInfo
    targets: np.ndarray
    # For methods that run more forward passes (Score-CAM): masks [N, C, H, W] in
    # [0, 1] at input resolution -> target scores [N, C].
    score_masked: Callable[[np.ndarray], np.ndarray] | None = None

    def _nchw(self, name: str) -> np.ndarray:
        value = self.outputs[name]
        return value.transpose(0, 3, 1, 2) if self.info.activation_layout == "nhwc" else value

    @property
    def activations(self) -> np.ndarray:
        return self._nchw(OUTPUT_ACTIVATIONS)

    @property
    def gradients(self) -> np.ndarray:
        return self._nchw(OUTPUT_GRADIENTS)


class CamMethod:
    """Base class: subclasses set ``name`` and ``outputs`` and override ``weigh``."""

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS)
    # Whether it needs the full gradient map, which fd bundles do not have.
    needs_gradient_map: ClassVar[bool] = True

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        """[N, h, w] before the ReLU."""
        raise NotImplementedError

    def __call__(self, maps: LayerMaps) -> np.ndarray:
        return np.maximum(self.weigh(maps), 0).astype(np.float32)


def weighted_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """sum_k weights[n, k] * activations[n, k]: the CAM of per-channel weights.

    Plain einsum loops, not BLAS (see ``worker.maps.resize_maps``)."""
    return np.einsum("nk,nkhw->nhw", weights, activations)
