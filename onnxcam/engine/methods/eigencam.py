"""Eigen-CAM (Muhammad & Yeasin): the first principal component of the activations.

No gradients, so the target does not change the map. Like pytorch-grad-cam, the
sign of the component is whatever the SVD returns.
"""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.engine.methods.base import CamMethod, MethodContext


def first_component(activations: np.ndarray) -> np.ndarray:
    """Project each image's [C, h, w] activations on their first principal axis."""
    n, c, h, w = activations.shape
    samples = activations.reshape(n, c, h * w).transpose(0, 2, 1)
    centred = samples - samples.mean(axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    return np.einsum("npc,nc->np", centred, vt[:, 0, :]).reshape(n, h, w)


class EigenCAM(CamMethod):
    name = "eigencam"
    outputs = (OUTPUT_ACTIVATIONS,)
    needs_gradient_map = False

    def cam(self, context: MethodContext) -> np.ndarray:
        return first_component(context.activations.astype(np.float64)).astype(np.float32)
