"""Swap a terminal Softmax/Sigmoid for linear: the bundle explains scores, not probabilities."""

from __future__ import annotations

import onnx

from onnxcam.bundle import OUTPUT_LOGITS
from onnxcam.exporter.draft import Draft
from onnxcam.graph import producers

SQUASHING = ("Softmax", "Sigmoid", "LogSoftmax")
PASS_THROUGH = ("Identity",)


def find_pre_activation(graph: onnx.GraphProto, output: str) -> tuple[str, str]:
    """Walk back from ``output`` over Identity nodes to a squashing op.

    Returns the pre-activation tensor and the op removed ("" if there was none).
    """
    made_by = producers(graph)
    current = output
    while current in made_by and made_by[current].op_type in PASS_THROUGH:
        current = made_by[current].input[0]
    node = made_by.get(current)
    if node is not None and node.op_type in SQUASHING:
        return node.input[0], node.op_type
    return output, ""


def linearize_logits(draft: Draft) -> bool:
    """Feed ``logits`` from before a terminal Softmax, Sigmoid or LogSoftmax; record
    the op in ``draft.removed_activation``. False when the classifier ends in none.

    Precondition: ``expose_logits`` has run (an Identity node makes ``logits``).
    """
    graph = draft.graph
    scores, removed = find_pre_activation(graph, OUTPUT_LOGITS)
    if not removed:
        return False
    producers(graph)[OUTPUT_LOGITS].input[0] = scores
    draft.removed_activation = removed
    return True
