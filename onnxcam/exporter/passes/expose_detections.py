"""A detector's ``logits``: its class scores per anchor [N, K, A], before suppression; and
``boxes`` [N, A, 4] beside them, x0, y0, x1, y1 in input pixels; or, for a detector
that decodes its own, its final detections beside them (``bundle.DECODED_OUTPUTS``)."""

from __future__ import annotations

import dataclasses

from onnx import TensorProto, helper

from onnxcam.bundle import DECODED_OUTPUTS, HEAD_NONE, OUTPUT_BOXES, OUTPUT_LOGITS
from onnxcam.errors import ExportError
from onnxcam.exporter.detectors import BOX_ROWS
from onnxcam.exporter.draft import Draft
from onnxcam.graph import GraphBuilder, float_output, producers

ANCHORS_AT_1 = [0, 2, 1]  # [N, 4, A] -> [N, A, 4]


def expose_detections(draft: Draft) -> bool:
    """Feed ``logits`` from the detector's class scores, and add ``boxes``; record head
    ``none``, and the model's class names as the labels where none were given. False
    for any other model.

    ultralytics applies the sigmoid inside its head, before the scores and boxes are
    concatenated: the scores are kept as the model outputs them (probabilities), and
    the head says so; a Grad-CAM map normalised per target is the same for the score
    as for its logit, whose gradient differs by the one positive factor s (1 - s).
    Precondition: ``expose_logits`` has run (an Identity node makes ``logits``).
    """
    detection = draft.detection
    if detection is None:
        return False
    if draft.options.head not in (None, HEAD_NONE):
        raise ExportError(f"the detector's scores are the probabilities its head outputs; "
                          f"head {draft.options.head!r} does not apply (leave it out)")
    graph = draft.graph
    exposed = producers(graph)[OUTPUT_LOGITS]
    b = GraphBuilder(graph, "onnxcam/detections")
    scores, boxes = detection.scores, detection.boxes
    if detection.decoded:  # logits made by the frontend; the detections are the model's
        add_decoded(b, detection.decoded)
    else:
        if not scores:  # the model's output itself, sliced on axis 1
            scores = rows(b, detection.output, BOX_ROWS, 2**62)
        if not boxes:
            boxes = rows(b, detection.output, 0, BOX_ROWS)
        add_boxes(b, boxes)
    exposed.input[0] = scores
    b.commit()
    logits = next(o for o in graph.output if o.name == OUTPUT_LOGITS)
    logits.CopyFrom(float_output(OUTPUT_LOGITS, 3))
    draft.removed_activation, draft.head = "", HEAD_NONE
    if not draft.options.labels:
        draft.options = dataclasses.replace(draft.options, labels=detection.labels)
    return True


def add_decoded(b: GraphBuilder, tensors: tuple[str, ...]) -> None:
    """The outputs ``DECODED_OUTPUTS``, copies of ``tensors`` in that order: boxes
    float [N, D, 4], scores float [N, D], labels and sources int64 [N, D]."""
    kinds = (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT64)
    for tensor, name, kind in zip(tensors, DECODED_OUTPUTS, kinds, strict=True):
        b.nodes.append(helper.make_node("Identity", [tensor], [name],
                                        name=f"onnxcam/decoded/{name}"))
        dims: list[str | int] = ["N", "D", 4] if name == DECODED_OUTPUTS[0] else ["N", "D"]
        b.graph.output.append(helper.make_tensor_value_info(name, kind, dims))


def rows(b: GraphBuilder, tensor: str, start: int, end: int) -> str:
    """``tensor[:, start:end]``."""
    return b.op("Slice", [tensor, b.const([start], f"start{start}"), b.const([end], f"end{end}"),
                          b.const([1], "axis1")])


def add_boxes(b: GraphBuilder, cxcywh: str) -> None:
    """The output ``boxes`` [N, A, 4], corners from centres and sizes [N, 4, A]."""
    centres, sizes = rows(b, cxcywh, 0, 2), rows(b, cxcywh, 2, 4)
    half = b.op("Mul", [sizes, b.const([0.5], "half")])
    corners = b.op("Concat", [b.op("Sub", [centres, half]), b.op("Add", [centres, half])],
                   axis=1)
    b.nodes.append(helper.make_node("Transpose", [corners], [OUTPUT_BOXES],
                                    name="onnxcam/boxes", perm=ANCHORS_AT_1))
    b.graph.output.append(float_output(OUTPUT_BOXES, 3))
