"""FEM, the feature explanation method (Fuad et al.; pytorch-grad-cam's ``FEM``): each
channel weighted by the share of its map above its own mean plus ``K`` standard
deviations. No gradients, so the target does not change the map."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.engine.methods.base import ChannelWeightCam, MethodContext

K = 2.0  # pytorch-grad-cam's default k: the mean plus two standard deviations


class FEM(ChannelWeightCam):
    name = "fem"
    outputs = (OUTPUT_ACTIVATIONS,)
    needs_gradient_map = False
    smoothable = False  # pytorch-grad-cam's FEM ignores eigen_smooth

    def weights(self, context: MethodContext) -> np.ndarray:
        acts = context.activations
        cutoff = acts.mean(axis=(2, 3)) + K * acts.std(axis=(2, 3))
        return (acts > cutoff[:, :, None, None]).mean(axis=(2, 3))
