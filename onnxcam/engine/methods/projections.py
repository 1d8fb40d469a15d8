"""Principal-component projections of a layer's per-channel maps."""

from __future__ import annotations

import numpy as np


def first_component(maps: np.ndarray) -> np.ndarray:
    """Project each image's [C, h, w] maps on their first principal axis: the positions
    are the samples, centred, and the sign is whatever the SVD returns (as
    pytorch-grad-cam's ``get_2d_projection``)."""
    n, c, h, w = maps.shape
    samples = maps.reshape(n, c, h * w).transpose(0, 2, 1)
    centred = samples - samples.mean(axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=True)
    return np.einsum("npc,nc->np", centred, vt[:, 0, :]).reshape(n, h, w)
