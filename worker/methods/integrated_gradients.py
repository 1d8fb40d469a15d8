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
from onnxcam.errors import BadMethodError
from onnxcam.worker.methods.base import InputMethod, LayerMaps, saliency_map


def path_points(steps: int) -> np.ndarray:
    """Midpoints of ``steps`` equal intervals of [0, 1]."""
    return ((np.arange(steps) + 0.5) / steps).astype(np.float32)


class IntegratedGradients(InputMethod):
    name = "integrated-gradients"
    outputs = ()
    split_outputs = (OUTPUT_INPUT_GRADIENTS,)

    def attribute(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        if maps.model_input is None or maps.gradients_at is None:
            raise BadMethodError("integrated-gradients needs a bundle that records its "
                                 "model input")
        if maps.options.steps < 1:
            raise BadMethodError("integrated-gradients needs at least one step")
        alphas = path_points(maps.options.steps)
        model_input = maps.model_input_nhwc()
        mean_gradients = []
        for n, image in enumerate(maps.model_input):
            scaled = alphas.reshape(-1, *[1] * image.ndim) * image[None]
            targets = np.full(len(alphas), maps.targets[n], np.int64)
            mean_gradients.append(maps.gradients_at(scaled, targets).mean(axis=0))
        attribution = model_input * np.stack(mean_gradients)
        return attribution, saliency_map(attribution)
