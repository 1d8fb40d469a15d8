"""The head of a bundle's graph: every node from the exposed layers to ``logits``, and
the class (``target``, or the top-1) its gradients and fd weights are taken for.

Shared by the gradient passes and verification; they find the layers and the
logits through the bundle's output names, so these queries hold once
``expose_activation`` and ``expose_logits`` have run.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxcam.bundle import INPUT_TARGET, OUTPUT_LOGITS, is_activation_output
from onnxcam.exporter.vjp import load_rules
from onnxcam.graph import GraphBuilder, head_nodes, source_of


def layer_tensors(graph: onnx.GraphProto) -> list[str]:
    """The tensors behind ``activations``, ``activations.1``, ... in output-index order."""
    names = sorted((o.name for o in graph.output if is_activation_output(o.name)),
                   key=lambda name: int(name.partition(".")[2] or 0))
    return [source_of(graph, name) for name in names]


def head_starts(graph: onnx.GraphProto, model_input: str = "") -> list[str]:
    """Where the head begins: every exposed layer, and ``model_input`` when given."""
    return layer_tensors(graph) + ([model_input] if model_input else [])


def head_tensors(graph: onnx.GraphProto, model_input: str = "") -> list[str]:
    """Every tensor a head node reads or writes: what the passes need shapes for.

    With ``model_input`` the head is the whole body, from the model input on.
    Graph must be sorted.
    """
    starts = head_starts(graph, model_input)
    end = source_of(graph, OUTPUT_LOGITS)
    names: dict[str, None] = dict.fromkeys([*starts, end])
    for node in head_nodes(graph, starts, end, differentiable_only=False):
        names.update((n, None) for n in list(node.input) + list(node.output) if n)
    return list(names)


def unsupported_ops(graph: onnx.GraphProto, model_input: str = "") -> list[str]:
    """Op types in the head (the whole body, with ``model_input``) that have no VJP rule."""
    rules = load_rules()
    end = source_of(graph, OUTPUT_LOGITS)
    return sorted({n.op_type for n in head_nodes(graph, head_starts(graph, model_input), end)
                   if n.op_type not in rules})


def add_target_input(graph: onnx.GraphProto) -> None:
    """Add the bundle's ``target`` input (int64 [N]) unless an earlier pass did."""
    if not any(i.name == INPUT_TARGET for i in graph.input):
        graph.input.append(helper.make_tensor_value_info(INPUT_TARGET, onnx.TensorProto.INT64,
                                                         ["N"]))


def chosen_class(b: GraphBuilder, logits: str) -> str:
    """``target``, with -1 replaced by the top-1 class."""
    top1 = b.op("ArgMax", [logits], axis=1, keepdims=0)
    negative = b.op("Less", [INPUT_TARGET, b.const(0, "zero_i")])
    return b.op("Where", [negative, top1, INPUT_TARGET])
