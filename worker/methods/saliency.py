"""Saliency (Simonyan et al.), as keras-vis' ``visualize_saliency`` computes it: the
gradient of the class score with respect to the model input, max over channels of
its absolute value."""

from __future__ import annotations

import numpy as np

from onnxcam.worker.methods.base import InputMethod, LayerMaps, saliency_map


class Saliency(InputMethod):
    name = "saliency"

    def attribute(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        gradients = maps.input_gradients
        return gradients, saliency_map(gradients)
