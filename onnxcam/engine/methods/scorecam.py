"""Score-CAM (Wang et al.): weights are the softmax over channels of the target's
score when the input is masked by each upsampled, min-max scaled activation map.

The masked inputs are the model's preprocessed input times the mask, as in
pytorch-grad-cam, and run in batches through the bundle's own model; masks are made a
batch at a time, so memory does not grow with the number of channels.
"""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import OUTPUT_ACTIVATIONS
from onnxcam.engine.methods.base import ChannelWeightCam, MethodContext
from onnxcam.scores import softmax


def align_corners_matrix(size_out: int, size_in: int) -> np.ndarray:
    """Bilinear weights with align_corners=True (torch's UpsamplingBilinear2d)."""
    if size_in == 1:
        return np.ones((size_out, 1), np.float32)
    position = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
    low = np.minimum(np.floor(position).astype(int), size_in - 2)
    frac = position - low
    matrix = np.zeros((size_out, size_in), np.float32)
    matrix[np.arange(size_out), low] = 1 - frac
    matrix[np.arange(size_out), low + 1] += frac
    return matrix


class ScoreCAM(ChannelWeightCam):
    name = "scorecam"
    outputs = (OUTPUT_ACTIVATIONS,)
    reruns_model = True
    needs_gradient_map = False

    def weights(self, context: MethodContext) -> np.ndarray:
        acts = context.activations.astype(np.float32)
        rows = align_corners_matrix(context.info.height, acts.shape[2])
        cols = align_corners_matrix(context.info.width, acts.shape[3])

        def masks(n: int, start: int, stop: int) -> np.ndarray:
            upsampled = np.einsum("hi,kij,wj->khw", rows, acts[n, start:stop], cols,
                                  optimize=True)
            low = upsampled.min(axis=(1, 2), keepdims=True)
            high = upsampled.max(axis=(1, 2), keepdims=True)
            return (upsampled - low) / (high - low + 1e-8)

        scores = context.model.masked_scores(masks, acts.shape[1], context.targets,
                                             context.seeds)
        return softmax(scores.astype(np.float64), axis=1).astype(np.float32)
