"""Class scores from logits: the softmax and sigmoid that the engine, the audit and the
exporter's checks share, and ``probabilities``, which picks one by the bundle's head."""

from __future__ import annotations

import numpy as np

from onnxcam.bundle import HEAD_NONE, HEAD_SIGMOID, HEAD_SOFTMAX


def softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the maximum so it cannot overflow;
    float32 in, float32 out."""
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(values: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) elementwise, as exp(-log(1 + exp(-x))) so that neither tail
    overflows nor rounds a small probability to zero; dtype kept."""
    return np.exp(-np.logaddexp(np.zeros((), values.dtype), -values))


def probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    """Class probabilities [..., K] from ``logits`` [..., K] as the bundle's ``head``
    (``BundleInfo.head``) makes them: a softmax over the classes (they sum to 1), a
    sigmoid per class (multi-label: each class on its own), or the logits as they are.
    Every head keeps the logits' order within a row, so ranking by logits is ranking by
    probability."""
    if head == HEAD_SOFTMAX:
        return softmax(logits, axis=-1)
    if head == HEAD_SIGMOID:
        return sigmoid(logits)
    if head == HEAD_NONE:
        return np.array(logits, copy=True)
    raise ValueError(f"unknown head {head!r}")
