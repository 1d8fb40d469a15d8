"""SmoothGrad (Smilkov et al.): the mean saliency over noisy copies of the input.

Noise is Gaussian in the preprocessed model input, with std ``noise`` times that
image's (max - min) there, as in the paper. Image i of a call draws its noise from
``numpy.random.default_rng([seed, i])``, so batching does not change the maps.
The signed image is the mean gradient over the copies.
"""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_INPUT_GRADIENTS
from onnxcam.errors import BadMethodError
from onnxcam.worker.methods.base import InputMethod, LayerMaps, saliency_map


def noisy_copies(image: np.ndarray, samples: int, noise: float, seed: int,
                 index: int) -> np.ndarray:
    """``samples`` copies of one model input plus its Gaussian noise."""
    sigma = noise * float(image.max() - image.min())
    rng = np.random.default_rng([seed, index])
    draws = rng.standard_normal((samples, *image.shape), dtype=np.float32)
    return image[None] + np.float32(sigma) * draws


class SmoothGrad(InputMethod):
    name = "smoothgrad"
    outputs = ()
    split_outputs = (OUTPUT_INPUT_GRADIENTS,)

    def attribute(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        if maps.model_input is None or maps.gradients_at is None:
            raise BadMethodError("smoothgrad needs a bundle that records its model input")
        options = maps.options
        if options.samples < 1:
            raise BadMethodError("smoothgrad needs at least one sample")
        images, saliency = [], []
        for n, image in enumerate(maps.model_input):
            copies = noisy_copies(image, options.samples, options.noise, options.seed,
                                  maps.first_index + n)
            targets = np.full(len(copies), maps.targets[n], np.int64)
            gradients = maps.gradients_at(copies, targets)
            images.append(gradients.mean(axis=0))
            saliency.append(saliency_map(gradients).mean(axis=0))
        return np.stack(images), np.stack(saliency)
