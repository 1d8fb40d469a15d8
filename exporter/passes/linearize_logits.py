"""Swap a terminal Softmax/Sigmoid for linear: the bundle explains scores, not probabilities."""

from __future__ import annotations

import onnx
from onnx import helper

from onnxcam.bundle import OUTPUT_LOGITS, is_activation_output
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.passes import PassResult
from onnxcam.graph import float_output, producers

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


def linearize_logits(model: onnx.ModelProto) -> tuple[PassResult, str]:
    """Make ``logits`` the classifier's pre-activation scores and the only other output.

    The classifier output is the first graph output that is not ``activations``
    (or ``activations.i``).
    Returns the result and the name of the op removed ("" if none).
    """
    graph = model.graph
    candidates = [o.name for o in graph.output if not is_activation_output(o.name)]
    if not candidates:
        raise UnsupportedModelError("the model has no output")
    scores, removed = find_pre_activation(graph, candidates[0])
    graph.node.append(helper.make_node("Identity", [scores], [OUTPUT_LOGITS],
                                       name="onnxcam/logits"))
    kept = [o for o in graph.output if is_activation_output(o.name)]
    del graph.output[:]
    graph.output.append(float_output(OUTPUT_LOGITS, 2))
    graph.output.extend(kept)
    return PassResult(model, True), removed
