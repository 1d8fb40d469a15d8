"""HiResCAM (Draelos & Carin): the element-wise gradient x activation, summed."""

from __future__ import annotations

import numpy as np

from onnxcam.worker.methods.base import CamMethod, LayerMaps


class HiResCAM(CamMethod):
    name = "hirescam"

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        return (maps.gradients * maps.activations).sum(axis=1)
