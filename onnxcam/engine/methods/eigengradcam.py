"""Eigen-Grad-CAM (pytorch-grad-cam's ``EigenGradCAM``): the first principal component
of the activations times their gradients, so that, unlike Eigen-CAM, the target
changes the map. The sign of the component is whatever the SVD returns, as there."""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import CamMethod, MethodContext
from onnxcam.engine.methods.projections import first_component


class EigenGradCAM(CamMethod):
    name = "eigengradcam"
    smoothable = False

    def cam(self, context: MethodContext) -> np.ndarray:
        product = context.gradients.astype(np.float64) * context.activations
        return first_component(product).astype(np.float32)
