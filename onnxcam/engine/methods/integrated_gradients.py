"""Integrated gradients (Sundararajan et al.) from a black baseline.

The baseline is zero in the preprocessed model input (what the model reads, so
"black" only for ``unit`` and ``none`` preprocessing). The path integral is the
midpoint rule over ``steps`` points, run in batches; the signed image is the
attribution (x - baseline) * mean gradient, whose sum approximates
logit(x) - logit(baseline), and the map is max over channels of its absolute value.
"""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_INPUT_GRADIENTS
from onnxcam.engine.methods.base import GradientMethod, MethodContext
from onnxcam.errors import BadMethodError


def path_points(steps: int) -> np.ndarray:
    """Midpoints of ``steps`` equal intervals of [0, 1]."""
    return ((np.arange(steps) + 0.5) / steps).astype(np.float32)


class IntegratedGradients(GradientMethod):
    name = "integrated-gradients"
    outputs = ()
    split_outputs = (OUTPUT_INPUT_GRADIENTS,)

    def attribute(self, context: MethodContext) -> np.ndarray:
        if context.options.steps < 1:
            raise BadMethodError("integrated-gradients needs at least one step")
        alphas = path_points(context.options.steps)
        model = context.model
        mean_gradients = []
        for n, image in enumerate(model.model_input):
            scaled = alphas.reshape(-1, *[1] * image.ndim) * image[None]
            gradients = model.gradients_at(scaled, context.targets[n], context.seed(n))
            mean_gradients.append(gradients.mean(axis=0))
        return model.model_input_nhwc() * np.stack(mean_gradients)
