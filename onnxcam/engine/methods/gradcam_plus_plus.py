"""Grad-CAM++ (Chattopadhay et al.), weights as pytorch-grad-cam computes them."""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import ChannelWeightCam, MethodContext

EPSILON = 1e-6


class GradCAMPlusPlus(ChannelWeightCam):
    name = "gradcam++"

    def weights(self, context: MethodContext) -> np.ndarray:
        grads, acts = context.gradients, context.activations
        squared = grads**2
        cubed = squared * grads
        activation_sums = acts.sum(axis=(2, 3))[:, :, None, None]
        alpha = squared / (2 * squared + activation_sums * cubed + EPSILON)
        alpha = np.where(grads != 0, alpha, 0)
        return (np.maximum(grads, 0) * alpha).sum(axis=(2, 3))
