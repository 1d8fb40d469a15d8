"""Guided backpropagation (Springenberg et al.): the input gradient where every ReLU
passes back only positive gradients, and only where its input was positive. The
map is keras-vis' saliency of it (``backprop_modifier='guided'``)."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_GUIDED_INPUT_GRADIENTS
from onnxcam.engine.methods.base import GradientMethod, MethodContext


class GuidedBackprop(GradientMethod):
    name = "guided-backprop"
    outputs = (OUTPUT_GUIDED_INPUT_GRADIENTS,)

    def attribute(self, context: MethodContext) -> np.ndarray:
        return context.outputs[OUTPUT_GUIDED_INPUT_GRADIENTS]
