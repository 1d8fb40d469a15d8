"""XGrad-CAM (Fu et al.): gradients weighted by normalised activations."""

from __future__ import annotations

import numpy as np

from onnxcam.worker.methods.base import CamMethod, LayerMaps, weighted_sum

EPSILON = 1e-7


class XGradCAM(CamMethod):
    name = "xgradcam"

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        grads, acts = maps.gradients, maps.activations
        sums = acts.sum(axis=(2, 3))[:, :, None, None]
        weights = (grads * acts / (sums + EPSILON)).sum(axis=(2, 3))
        return weighted_sum(weights, acts)
