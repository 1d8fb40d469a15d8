"""Guided Grad-CAM (Selvaraju et al.): guided backprop times the Grad-CAM heatmap
(min-max scaled and upsampled to the input, as pytorch-grad-cam's ``cam_mask``),
per channel; the map is max over channels of |product|."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_CAM, OUTPUT_GUIDED_INPUT_GRADIENTS
from onnxcam.engine.maps import heatmaps
from onnxcam.engine.methods.base import GradientMethod, MethodContext


class GuidedGradCAM(GradientMethod):
    name = "guided-gradcam"
    outputs = (OUTPUT_GUIDED_INPUT_GRADIENTS, OUTPUT_CAM)

    def attribute(self, context: MethodContext) -> np.ndarray:
        guided = context.outputs[OUTPUT_GUIDED_INPUT_GRADIENTS]
        mask = heatmaps(context.outputs[OUTPUT_CAM], guided.shape[1], guided.shape[2])
        return guided * mask[..., None]
