"""Swap a terminal Softmax/Sigmoid for linear: the bundle explains scores, not
probabilities, and its head says how to make the probabilities again."""

from __future__ import annotations

import onnx

from onnxcam.bundle import HEAD_SIGMOID, HEAD_SOFTMAX, OUTPUT_LOGITS
from onnxcam.errors import ExportError
from onnxcam.exporter.draft import Draft
from onnxcam.graph import producers

SQUASHING = ("Softmax", "Sigmoid", "LogSoftmax")
# The head each removed op stands for (LogSoftmax ranks as Softmax does).
HEAD_OF = {"Softmax": HEAD_SOFTMAX, "LogSoftmax": HEAD_SOFTMAX, "Sigmoid": HEAD_SIGMOID}
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


def head_kind(removed: str, asked: str | None) -> str:
    """The bundle's head: ``asked`` if given, else the one the removed op stands for
    (softmax when none was removed, as bundles always read). An ``asked`` head that
    contradicts the removed op is refused: the graph says otherwise."""
    found = HEAD_OF.get(removed)
    if asked is None:
        return found or HEAD_SOFTMAX
    if found is not None and asked != found:
        raise ExportError(f"the model ends in {removed}, a {found} head; head {asked!r} "
                          "contradicts it (leave the head to the graph)")
    return asked


def linearize_logits(draft: Draft) -> bool:
    """Feed ``logits`` from before a terminal Softmax, Sigmoid or LogSoftmax; record
    the op in ``draft.removed_activation`` and the head it stands for (or the one asked
    for in the options) in ``draft.head``. False when the classifier ends in none.

    Precondition: ``expose_logits`` has run (an Identity node makes ``logits``); a
    frontend that dropped the activation itself has set ``removed_activation``.
    """
    graph = draft.graph
    scores, removed = find_pre_activation(graph, OUTPUT_LOGITS)
    if removed:
        producers(graph)[OUTPUT_LOGITS].input[0] = scores
        draft.removed_activation = removed
    draft.head = head_kind(draft.removed_activation, draft.options.head)
    return bool(removed)
