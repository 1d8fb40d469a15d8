"""The head of a bundle's graph: every node from the exposed layers to ``logits``, and
what its gradients are taken of: a weighting of the logits (``target_weights``), else
the class ``target`` (or the top-1), which the fd weights also use.

Shared by the gradient passes and verification; they find the layers and the
logits through the bundle's output names, so these queries hold once
``expose_activation`` and ``expose_logits`` have run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.bundle import (
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_LOGITS,
    SEED,
    is_activation_output,
)
from onnxcam.exporter.vjp import load_rules
from onnxcam.graph import GraphBuilder, head_nodes, reduce, source_of


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


def add_weights_input(graph: onnx.GraphProto, dims: Sequence[int],
                      by_data: Sequence[bool] = ()) -> None:
    """Add ``target_weights``: float32 with the logits' non-batch ``dims`` (an axis
    sized ``by_data``, a detector's proposals, named ``R`` and 0 in the default), and
    an initializer of batch 0 as its default, so that feeds without it still run."""
    if any(i.name == INPUT_TARGET_WEIGHTS for i in graph.input):
        return
    free = list(by_data) or [False] * len(dims)
    rest = [int(d) for d in dims[1:]]
    graph.input.append(helper.make_tensor_value_info(
        INPUT_TARGET_WEIGHTS, onnx.TensorProto.FLOAT,
        ["M", *("R" if sized else d for d, sized in zip(rest, free[1:]))]))
    graph.initializer.append(numpy_helper.from_array(
        np.zeros([0, *(0 if sized else d for d, sized in zip(rest, free[1:]))], np.float32),
        INPUT_TARGET_WEIGHTS))


def target_seed(b: GraphBuilder, logits: str, dims: Sequence[int], opset: int,
                by_data: Sequence[bool] = ()) -> str:
    """``SEED``, the backward pass's cotangent of ``logits`` (shaped ``dims`` at batch 1,
    the axes ``by_data`` sized at run time):
    ``target_weights`` when fed, else one_hot(target) over the class axis, the same at
    every pixel of a per-pixel output; -1 picks the class with the highest score (per
    pixel outputs: summed over the pixels). Made once; later calls return it.

    Needs no If: the weights (batch N, or 0 when not fed) are stacked on the one-hot
    rows and the first N rows taken, which are the weights exactly when they are fed.
    """
    if any(SEED in node.output for node in [*b.graph.node, *b.nodes]):
        return SEED
    add_target_input(b.graph)
    add_weights_input(b.graph, dims, by_data)
    rank = len(dims)
    scores = logits if rank == 2 else reduce(b, "ReduceSum", logits, range(2, rank), False,
                                             opset)
    depth = b.op("Gather", [b.op("Shape", [logits]), b.const(1, "one")], axis=0)
    values = b.const([0.0, 1.0], "onehot_values")
    rows = b.op("OneHot", [chosen_class(b, scores), depth, values], axis=-1)
    if rank > 2:
        pixels = b.op("Unsqueeze", [rows, b.const(list(range(2, rank)), "pixel_axes")])
        rows = b.op("Expand", [pixels, b.op("Shape", [logits])])
    if any(by_data):
        flat = b.const([-1], "flat")
        stacked = b.op("Concat", [b.op("Reshape", [INPUT_TARGET_WEIGHTS, flat]),
                                  b.op("Reshape", [rows, flat])], axis=0)
        count = b.op("ReduceProd", [b.op("Shape", [rows])], keepdims=1)
        seed = helper.make_node("Reshape", [
            b.op("Slice", [stacked, b.const([0], "zero"), count, b.const([0], "axis0")]),
            b.op("Shape", [rows])], [SEED], name=SEED)
        if opset >= 14:  # an image without proposals has logits [1, K, 0]
            seed.attribute.append(helper.make_attribute("allowzero", 1))
        b.nodes.append(seed)
        return SEED
    stacked = b.op("Concat", [INPUT_TARGET_WEIGHTS, rows], axis=0)
    batch = b.op("Slice", [b.op("Shape", [logits]), b.const([0], "zero"), b.const([1], "one")])
    b.nodes.append(helper.make_node("Slice", [stacked, b.const([0], "zero"), batch,
                                              b.const([0], "axis0")], [SEED], name=SEED))
    return SEED
