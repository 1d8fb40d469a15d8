"""XGrad-CAM (Fu et al.): gradients weighted by normalised activations."""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import ChannelWeightCam, MethodContext

EPSILON = 1e-7


class XGradCAM(ChannelWeightCam):
    name = "xgradcam"

    def weights(self, context: MethodContext) -> np.ndarray:
        grads, acts = context.gradients, context.activations
        sums = acts.sum(axis=(2, 3))[:, :, None, None]
        return (grads * acts / (sums + EPSILON)).sum(axis=(2, 3))
