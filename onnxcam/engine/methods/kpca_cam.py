"""KPCA-CAM (Karmani et al.; pytorch-grad-cam's ``KPCA_CAM`` with its defaults): the
first kernel principal component of the activations, each position a sample of C
features, centred. The kernel is scikit-learn's sigmoid, tanh(<x, y> / C + 1); the
kernel matrix is centred in feature space; the projection is the top eigenvector
times the root of its eigenvalue, signed so that its largest entry is positive, as
scikit-learn's ``KernelPCA`` signs it. No gradients, so the target does not change
the map."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.engine.methods.base import CamMethod, MethodContext


def kernel_component(activations: np.ndarray) -> np.ndarray:
    """Each image's [C, h, w] activations projected on their first kernel principal
    component, [N, h, w]."""
    n, c, h, w = activations.shape
    maps = np.empty((n, h * w), np.float64)
    for index, image in enumerate(activations.astype(np.float64)):
        samples = image.reshape(c, h * w).T
        samples = samples - samples.mean(axis=0)
        kernel = np.tanh(samples @ samples.T / c + 1.0)
        column_means = kernel.mean(axis=0)
        centred = kernel - column_means - kernel.mean(axis=1)[:, None] + column_means.mean()
        values, vectors = np.linalg.eigh(centred)
        top = vectors[:, -1] * np.sign(vectors[np.argmax(np.abs(vectors[:, -1])), -1])
        maps[index] = top * np.sqrt(max(values[-1], 0.0))
    return maps.reshape(n, h, w)


class KPCACAM(CamMethod):
    name = "kpca-cam"
    outputs = (OUTPUT_ACTIVATIONS,)
    needs_gradient_map = False
    smoothable = False

    def cam(self, context: MethodContext) -> np.ndarray:
        return kernel_component(context.activations).astype(np.float32)
