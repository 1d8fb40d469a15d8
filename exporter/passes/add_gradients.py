"""Reverse-mode differentiation of the head, built from the graph's own nodes.

The head is every node on a path from the target layer's tensor to the logits.
Seeding with one_hot(target) and running each node's VJP rule backwards yields
d logits[n, target[n]] / d activations for the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import helper

from exporter.graph import (
    GraphBuilder,
    backward_reachable,
    float_output,
    forward_reachable,
    initializer_values,
    opset_version,
    producers,
)
from exporter.passes import PassResult
from exporter.vjp import load_rules
from exporter.vjp.context import TensorShape, VjpContext
from worker.bundle import (
    INPUT_TARGET,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
)
from worker.errors import UnsupportedOpError


def source_of(graph: onnx.GraphProto, output: str) -> str:
    """The internal tensor behind a bundle output (outputs are Identity nodes)."""
    return producers(graph)[output].input[0]


def head_nodes(
    graph: onnx.GraphProto, start: str, end: str, differentiable_only: bool = True
) -> list[onnx.NodeProto]:
    """Nodes on a path from ``start`` to ``end``, in forward order.

    With ``differentiable_only`` the shape computations along the way are left out.
    """
    on_path = forward_reachable(graph, start, differentiable_only) & backward_reachable(
        graph, [end]
    )
    return [n for n in graph.node
            if any(o in on_path for o in n.output) and any(i in on_path for i in n.input)]


def head_tensors(graph: onnx.GraphProto) -> list[str]:
    """Every tensor a head node reads or writes: what the passes need shapes for."""
    start = source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    names: dict[str, None] = {start: None, end: None}
    for node in head_nodes(graph, start, end, differentiable_only=False):
        names.update((n, None) for n in list(node.input) + list(node.output) if n)
    return list(names)


def unsupported_ops(graph: onnx.GraphProto) -> list[str]:
    """Op types in the head that have no rule."""
    rules = load_rules()
    start = source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    return sorted({n.op_type for n in head_nodes(graph, start, end) if n.op_type not in rules})


def add_target_input(graph: onnx.GraphProto) -> None:
    if not any(i.name == INPUT_TARGET for i in graph.input):
        graph.input.append(helper.make_tensor_value_info(INPUT_TARGET, onnx.TensorProto.INT64,
                                                         ["N"]))


def chosen_class(b: GraphBuilder, logits: str) -> str:
    """``target``, with -1 replaced by the top-1 class."""
    top1 = b.op("ArgMax", [logits], axis=1, keepdims=0)
    negative = b.op("Less", [INPUT_TARGET, b.const(0, "zero_i")])
    return b.op("Where", [negative, top1, INPUT_TARGET])


def seed_gradient(b: GraphBuilder, logits: str) -> str:
    """one_hot(target) shaped like the logits: the gradient of logits[n, target[n]]."""
    depth = b.op("Gather", [b.op("Shape", [logits]), b.const(1, "one")], axis=0)
    values = b.const([0.0, 1.0], "onehot_values")
    return b.op("OneHot", [chosen_class(b, logits), depth, values], axis=-1)


def differentiate(
    ctx: VjpContext, nodes: list[onnx.NodeProto], end: str, seed: str, start: str
) -> str:
    """Run the rules backwards over ``nodes``; return the gradient of ``start``."""
    rules = load_rules()
    grads: dict[str, str] = {end: seed}
    for node in reversed(nodes):
        out_grads = [grads.get(o) for o in node.output]
        if all(g is None for g in out_grads):
            continue
        fn = rules.get(node.op_type)
        if fn is None:
            raise UnsupportedOpError(node.op_type, node.name)
        try:
            in_grads = fn(ctx, node, out_grads)
        except NotImplementedError as exc:
            raise UnsupportedOpError(f"{node.op_type} ({exc})", node.name) from exc
        for name, grad in zip(node.input, in_grads):
            if grad is None or not ctx.needs(name):
                continue
            grads[name] = ctx.b.op("Add", [grads[name], grad]) if name in grads else grad
    if start not in grads:
        raise UnsupportedOpError("(the logits do not depend on the target layer)")
    return grads[start]


def add_gradients(
    model: onnx.ModelProto, shapes: Mapping[str, TensorShape], guided: bool = False
) -> PassResult:
    """Add the ``target`` input and the ``gradients`` output.

    Preconditions: ``activations`` and ``logits`` outputs exist (see the expose and
    linearize passes); ``shapes`` covers ``head_tensors(graph)``; graph is sorted.
    """
    graph = model.graph
    start = source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    nodes = head_nodes(graph, start, end)
    needed = forward_reachable(graph, start) & backward_reachable(graph, [end])
    b = GraphBuilder(graph, "onnxcam/grad")
    ctx = VjpContext(b, shapes, initializer_values(graph), opset_version(model), needed, guided)
    add_target_input(graph)
    gradient = differentiate(ctx, nodes, end, seed_gradient(b, end), start)
    b.nodes.append(helper.make_node("Identity", [gradient], [OUTPUT_GRADIENTS],
                                    name="onnxcam/gradients"))
    b.commit()
    graph.output.append(float_output(OUTPUT_GRADIENTS, 4))
    return PassResult(model, True)
