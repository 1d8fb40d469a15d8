"""HiResCAM (Draelos & Carin): the element-wise gradient x activation, summed."""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import CamMethod, MethodContext


class HiResCAM(CamMethod):
    name = "hirescam"

    def cam(self, context: MethodContext) -> np.ndarray:
        return self.terms(context).sum(axis=1)

    def terms(self, context: MethodContext) -> np.ndarray:
        return context.gradients * context.activations
