"""Class scores from logits: the one softmax that the engine, the audit and the
exporter's checks share."""

from __future__ import annotations

import numpy as np


def softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the maximum so it cannot overflow;
    float32 in, float32 out."""
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)
