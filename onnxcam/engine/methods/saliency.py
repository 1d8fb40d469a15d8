"""Saliency (Simonyan et al.), as keras-vis' ``visualize_saliency`` computes it: the
gradient of the class score with respect to the model input, max over channels of
its absolute value (the base makes that map)."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_INPUT_GRADIENTS
from onnxcam.engine.methods.base import GradientMethod, MethodContext


class Saliency(GradientMethod):
    name = "saliency"

    def attribute(self, context: MethodContext) -> np.ndarray:
        return context.outputs[OUTPUT_INPUT_GRADIENTS]
