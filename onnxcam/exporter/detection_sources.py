"""Which pre-suppression score each final detection of a detector's graph comes from,
found by the graph itself: its selection path run again on int64 positions.

torchvision's detectors pick their final scores from the per-(anchor, class) scores by
Split, Gather, GatherND, TopK, Concat and the NMS keep list. A twin of each of those
ops, fed the positions of the tensors the picking starts from, picks positions the
same way, so every detection's flat entry is an output of the graph (torch.onnx.export
with dynamo=False; issue 22).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcam.bundle import OUTPUT_DETECTION_SOURCE
from onnxcam.graph import GraphBuilder, producers

# Ops that move score values without computing new ones: their twin on int64
# positions moves the positions the same way.
MOVES = frozenset({"Gather", "GatherND", "GatherElements", "Reshape", "Squeeze", "Unsqueeze",
                   "Flatten", "Identity", "Slice", "Transpose", "Expand"})
DETECTION_SOURCE = OUTPUT_DETECTION_SOURCE


def trace_sources(graph: onnx.GraphProto, scores: str, output: str = DETECTION_SOURCE
                  ) -> list[str]:
    """Add the int64 output ``output`` [D]: each entry of ``scores`` (the
    final detections' scores) as its position in the tensors it is picked from, each
    flattened and all concatenated in the returned order (those tensors' names).

    Precondition: the graph is topologically sorted. A tensor reached by another op
    than the moves, Split, TopK's values and Concat is where picking starts.
    """
    made = producers(graph)
    b = GraphBuilder(graph, "onnxcam/source")
    twins: dict[str, str] = {}
    starts: list[str] = []
    offset = [b.const(np.asarray(0, np.int64), "zero")]

    def twin(name: str) -> str:
        if name in twins:
            return twins[name]
        node = made.get(name)
        op = node.op_type if node is not None else ""
        if node is not None and op == "Split":
            outs = b.op_multi("Split", [twin(node.input[0]), *node.input[1:]],
                              n_out=len(node.output), **_attributes(node))
            twins.update(zip(node.output, outs))
        elif node is not None and op == "TopK" and name == node.output[0]:
            # The values' positions: the input's, gathered by TopK's own indices.
            twins[name] = b.op("GatherElements", [twin(node.input[0]), node.output[1]],
                               axis=_attributes(node).get("axis", -1))
        elif node is not None and op in MOVES:
            twins[name] = b.op(op, [twin(node.input[0]), *node.input[1:]], **_attributes(node))
        elif node is not None and op == "Concat":
            twins[name] = b.op("Concat", [twin(i) for i in node.input], **_attributes(node))
        else:
            twins[name] = _positions(b, name, offset)
            starts.append(name)
        return twins[name]

    b.nodes.append(helper.make_node("Identity", [twin(scores)], [output],
                                    name="onnxcam/detection_source"))
    b.commit()
    graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.INT64, [None]))
    return starts


def _positions(b: GraphBuilder, name: str, offset: list[str]) -> str:
    """offset, offset + 1, ... in ``name``'s shape; the offset moves past it."""
    end = b.op("Add", [offset[0], b.op("Size", [name])])
    ids = b.op("Range", [offset[0], end, b.const(np.asarray(1, np.int64), "one")])
    offset[0] = end
    return b.op("Reshape", [ids, b.op("Shape", [name])])


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
