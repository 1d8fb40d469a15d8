"""Grad-CAM++ (Chattopadhay et al.), weights as pytorch-grad-cam computes them."""

from __future__ import annotations

import numpy as np

from onnxcam.worker.methods.base import CamMethod, LayerMaps, weighted_sum

EPSILON = 1e-6


class GradCAMPlusPlus(CamMethod):
    name = "gradcam++"

    def weigh(self, maps: LayerMaps) -> np.ndarray:
        grads, acts = maps.gradients, maps.activations
        squared = grads**2
        cubed = squared * grads
        activation_sums = acts.sum(axis=(2, 3))[:, :, None, None]
        alpha = squared / (2 * squared + activation_sums * cubed + EPSILON)
        alpha = np.where(grads != 0, alpha, 0)
        weights = (np.maximum(grads, 0) * alpha).sum(axis=(2, 3))
        return weighted_sum(weights, acts)
