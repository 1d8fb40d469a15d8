"""Swap a terminal Softmax/Sigmoid for linear: the bundle explains scores, not
probabilities, and its head says how to make the probabilities again."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from onnxcam.bundle import HEAD_SIGMOID, HEAD_SOFTMAX, OUTPUT_LOGITS
from onnxcam.errors import ExportError
from onnxcam.exporter.draft import Draft
from onnxcam.graph import attrs, producers

log = logging.getLogger(__name__)

SQUASHING = ("Softmax", "Sigmoid", "LogSoftmax")
# The head each removed op stands for (LogSoftmax ranks as Softmax does).
HEAD_OF = {"Softmax": HEAD_SOFTMAX, "LogSoftmax": HEAD_SOFTMAX, "Sigmoid": HEAD_SIGMOID}
# Ops walked over between the squashing op and ``logits``; Transpose is how an NHWC
# segmenter's scores reach class axis 1 (``expose_logits``).
PASS_THROUGH = ("Identity", "Transpose")
CLASS_AXIS = 1  # of ``logits``


@dataclass(frozen=True)
class Squashing:
    """A terminal squashing op: what it squashed, and the node reading its output on
    the way to ``logits``, whose first input takes the scores in its place."""

    scores: str
    op_type: str
    reader: onnx.NodeProto


def find_pre_activation(graph: onnx.GraphProto, output: str, rank: int = 2
                        ) -> Squashing | None:
    """Walk back from ``output`` (of ``rank``, class axis 1) over Identity and Transpose
    nodes to a squashing op over the class axis; None when there is none.

    A Softmax over another axis (a segmenter's over the pixels) is no class head.
    """
    made_by = producers(graph)
    reader, axis = made_by.get(output), CLASS_AXIS
    while reader is not None:
        if reader.op_type == "Transpose":
            axis = _source_axis(reader, axis, rank)
        node = made_by.get(reader.input[0])
        if node is None or node.op_type not in PASS_THROUGH:
            break
        reader = node
    else:
        return None
    if node is None or node.op_type not in SQUASHING:
        return None
    if node.op_type != "Sigmoid" and int(attrs(node).get("axis", -1)) % rank != axis:
        log.warning("the model ends in a %s over axis %s, not over its classes; kept",
                    node.op_type, attrs(node).get("axis", -1))
        return None
    return Squashing(node.input[0], node.op_type, reader)


def _source_axis(transpose: onnx.NodeProto, axis: int, rank: int) -> int:
    """Where output axis ``axis`` of ``transpose`` comes from in its input."""
    perm = attrs(transpose).get("perm") or list(reversed(range(rank)))
    return int(perm[axis])


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
    """Feed ``logits`` from before a terminal Softmax, Sigmoid or LogSoftmax over the
    classes (a segmenter's too, before ``expose_logits``'s transpose); record
    the op in ``draft.removed_activation`` and the head it stands for (or the one asked
    for in the options) in ``draft.head``. False when the classifier ends in none.

    Precondition: ``expose_logits`` has run (an Identity node makes ``logits``); a
    frontend that dropped the activation itself has set ``removed_activation``.
    """
    rank = 2 if draft.pixels_layout is None else 4
    found = find_pre_activation(draft.graph, OUTPUT_LOGITS, rank)
    if found is not None:
        found.reader.input[0] = found.scores
        draft.removed_activation = found.op_type
    draft.head = head_kind(draft.removed_activation, draft.options.head)
    return found is not None
