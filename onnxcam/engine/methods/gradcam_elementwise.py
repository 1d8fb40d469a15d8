"""Grad-CAM element-wise (pytorch-grad-cam's ``GradCAMElementWise``): each activation
times its own gradient, negative products dropped before the sum over channels."""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import CamMethod, MethodContext


class GradCAMElementWise(CamMethod):
    name = "gradcam-elementwise"

    def cam(self, context: MethodContext) -> np.ndarray:
        return self.terms(context).sum(axis=1)

    def terms(self, context: MethodContext) -> np.ndarray:
        return np.maximum(context.gradients * context.activations, 0)
