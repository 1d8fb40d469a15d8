"""SmoothGrad (Smilkov et al.): the mean saliency over noisy copies of the input.

Noise is Gaussian in the preprocessed model input, with std ``noise`` times that
image's (max - min) there, as in the paper. Image i of a call draws its noise from
``numpy.random.default_rng([seed, i])``, so batching does not change the maps.
The signed image is the mean gradient over the copies.
"""

from __future__ import annotations

import numpy as np

from onnxcam.engine.methods.base import MethodContext, SampledGradientMethod
from onnxcam.errors import BadMethodError


def noisy_copies(image: np.ndarray, samples: int, noise: float, seed: int,
                 index: int) -> np.ndarray:
    """``samples`` copies of one model input plus its Gaussian noise."""
    sigma = noise * float(image.max() - image.min())
    rng = np.random.default_rng([seed, index])
    draws = rng.standard_normal((samples, *image.shape), dtype=np.float32)
    return image[None] + np.float32(sigma) * draws


class SmoothGrad(SampledGradientMethod):
    name = "smoothgrad"

    def copies(self, context: MethodContext, index: int) -> np.ndarray:
        options = context.options
        if options.samples < 1:
            raise BadMethodError("smoothgrad needs at least one sample")
        return noisy_copies(context.model.model_input[index], options.samples, options.noise,
                            options.seed, context.image_number(index))
