"""Grad-CAM (Selvaraju et al.): channel weights are the spatial mean of the gradients.

The bundle computes exactly this in its graph (``cam``), so only that small map
leaves the session; it works for analytic and finite-difference bundles alike.
"""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_CAM
from onnxcam.engine.methods.base import CamMethod, MethodContext


class GradCAM(CamMethod):
    name = "gradcam"
    outputs = (OUTPUT_CAM,)
    needs_gradient_map = False

    def cam(self, context: MethodContext) -> np.ndarray:
        return context.outputs[OUTPUT_CAM]
