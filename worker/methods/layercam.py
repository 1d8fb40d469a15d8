"""LayerCAM (Jiang et al.): each position weighted by its own positive gradient."""

from __future__ import annotations

import numpy as np

from onnxcam.worker.methods.base import CamMethod, LayerMaps


class LayerCAM(CamMethod):
    name = "layercam"

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        return (np.maximum(maps.gradients, 0) * maps.activations).sum(axis=1)
