"""Eigen-CAM (Muhammad & Yeasin): the first principal component of the activations.

No gradients, so the target does not change the map. Like pytorch-grad-cam, the
sign of the component is whatever the SVD returns.
"""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.engine.methods.base import CamMethod, MethodContext
from onnxcam.engine.methods.projections import first_component


class EigenCAM(CamMethod):
    name = "eigencam"
    outputs = (OUTPUT_ACTIVATIONS,)
    needs_gradient_map = False
    smoothable = False

    def cam(self, context: MethodContext) -> np.ndarray:
        return first_component(context.activations.astype(np.float64)).astype(np.float32)
