"""Random-CAM (pytorch-grad-cam's ``RandomCAM``): channel weights drawn uniformly from
[-1, 1], a baseline that any method worth its cost must beat on a faithfulness
metric. Image i's weights come from ``default_rng([seed, i])`` (``MethodOptions.seed``),
i counted over the whole call, so a map does not change with the batching; they do
not depend on the target or the gradients."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.engine.methods.base import ChannelWeightCam, MethodContext


class RandomCAM(ChannelWeightCam):
    name = "randomcam"
    outputs = (OUTPUT_ACTIVATIONS,)
    needs_gradient_map = False

    def weights(self, context: MethodContext) -> np.ndarray:
        channels = context.activations.shape[1]
        return np.stack([
            np.random.default_rng([context.options.seed, context.image_number(row)])
            .uniform(-1.0, 1.0, channels) for row in range(len(context.targets))
        ]).astype(np.float32)
