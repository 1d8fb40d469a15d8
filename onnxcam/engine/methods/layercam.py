"""LayerCAM (Jiang et al.): each position weighted by its own positive gradient."""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import CamMethod, MethodContext


class LayerCAM(CamMethod):
    name = "layercam"

    def cam(self, context: MethodContext) -> np.ndarray:
        return self.terms(context).sum(axis=1)

    def terms(self, context: MethodContext) -> np.ndarray:
        return np.maximum(context.gradients, 0) * context.activations
