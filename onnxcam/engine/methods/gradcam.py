"""Grad-CAM (Selvaraju et al.): channel weights are the spatial mean of the gradients.

The bundle computes exactly this in its graph (``cam``), so only that small map
leaves the session; it works for analytic and finite-difference bundles alike.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS, OUTPUT_CAM, OUTPUT_WEIGHTS
from onnxcam.engine.methods.base import CamMethod, MethodContext


class GradCAM(CamMethod):
    name = "gradcam"
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_CAM,)
    needs_gradient_map = False

    def cam(self, context: MethodContext) -> np.ndarray:
        return context.outputs[OUTPUT_CAM]

    def terms(self, context: MethodContext) -> np.ndarray:
        weights = context.outputs[OUTPUT_WEIGHTS]
        return weights[:, :, None, None] * context.activations


class EigenSmoothedGradCAM(GradCAM):
    """Grad-CAM as ``eigen_smooth`` needs it: its weights and the activations leave the
    session instead of the in-graph cam (``methods.method_for``)."""

    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_WEIGHTS, OUTPUT_ACTIVATIONS)
