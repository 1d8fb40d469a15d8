"""Reverse-mode differentiation of the head, built from the graph's own nodes.

The head is every node on a path from the target layer's tensor to the logits.
Seeding with one_hot(target) and running each node's VJP rule backwards yields
d logits[n, target[n]] / d activations for the whole batch at once. With several
layers, or the model input as well, one backward pass over the union of their
heads yields every gradient: the later layers' are by-products of the earlier's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import helper

from onnxcam.bundle import (
    INPUT_TARGET,
    OUTPUT_GRADIENTS,
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
    is_activation_output,
    layer_output,
)
from onnxcam.errors import UnsupportedOpError
from onnxcam.exporter.passes import PassResult
from onnxcam.exporter.vjp import load_rules
from onnxcam.exporter.vjp.context import TensorShape, VjpContext
from onnxcam.graph import (
    GraphBuilder,
    backward_reachable,
    float_output,
    forward_reachable,
    initializer_values,
    opset_version,
    producers,
)


def source_of(graph: onnx.GraphProto, output: str) -> str:
    """The internal tensor behind a bundle output (outputs are Identity nodes)."""
    return producers(graph)[output].input[0]


def on_path(
    graph: onnx.GraphProto, starts: Sequence[str], end: str, differentiable_only: bool = True
) -> set[str]:
    """Tensors on a path from any of ``starts`` to ``end``."""
    reached: set[str] = set()
    for start in starts:
        reached |= forward_reachable(graph, start, differentiable_only)
    return reached & backward_reachable(graph, [end])


def head_nodes(
    graph: onnx.GraphProto, start: str | Sequence[str], end: str,
    differentiable_only: bool = True,
) -> list[onnx.NodeProto]:
    """Nodes on a path from ``start`` (or any of several) to ``end``, in forward order.

    With ``differentiable_only`` the shape computations along the way are left out.
    """
    starts = [start] if isinstance(start, str) else list(start)
    tensors = on_path(graph, starts, end, differentiable_only)
    return [n for n in graph.node
            if any(o in tensors for o in n.output) and any(i in tensors for i in n.input)]


def layer_tensors(graph: onnx.GraphProto) -> list[str]:
    """The tensors behind ``activations``, ``activations.1``, ... in output-index order."""
    names = sorted((o.name for o in graph.output if is_activation_output(o.name)),
                   key=lambda name: int(name.partition(".")[2] or 0))
    return [source_of(graph, name) for name in names]


def head_tensors(graph: onnx.GraphProto, model_input: str = "") -> list[str]:
    """Every tensor a head node reads or writes: what the passes need shapes for.

    With ``model_input`` the head is the whole body, from the model input on.
    """
    starts = layer_tensors(graph) + ([model_input] if model_input else [])
    end = source_of(graph, OUTPUT_LOGITS)
    names: dict[str, None] = dict.fromkeys([*starts, end])
    for node in head_nodes(graph, starts, end, differentiable_only=False):
        names.update((n, None) for n in list(node.input) + list(node.output) if n)
    return list(names)


def unsupported_ops(graph: onnx.GraphProto, model_input: str = "") -> list[str]:
    """Op types in the head (the whole body, with ``model_input``) that have no rule."""
    rules = load_rules()
    starts = layer_tensors(graph) + ([model_input] if model_input else [])
    end = source_of(graph, OUTPUT_LOGITS)
    return sorted({n.op_type for n in head_nodes(graph, starts, end) if n.op_type not in rules})


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
    ctx: VjpContext, nodes: list[onnx.NodeProto], end: str, seed: str, starts: Sequence[str]
) -> list[str]:
    """Run the rules backwards over ``nodes``; return the gradients of ``starts``."""
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
    missing = [start for start in starts if start not in grads]
    if missing:
        raise UnsupportedOpError(f"(the logits do not depend on {missing[0]!r})")
    return [grads[start] for start in starts]


def add_gradients(
    model: onnx.ModelProto, shapes: Mapping[str, TensorShape], model_input: str = "",
    layout: str = "nhwc",
) -> PassResult:
    """Add the ``target`` input and each layer's ``gradients`` output; with
    ``model_input``, also ``input_gradients`` (NHWC; the model input is in ``layout``).

    Preconditions: ``activations`` (and ``activations.i``) and ``logits`` outputs
    exist (see the expose and linearize passes); ``shapes`` covers
    ``head_tensors(graph, model_input)``; graph is sorted.
    """
    graph = model.graph
    starts = layer_tensors(graph) + ([model_input] if model_input else [])
    end = source_of(graph, OUTPUT_LOGITS)
    b = GraphBuilder(graph, "onnxcam/grad")
    ctx = VjpContext(b, shapes, initializer_values(graph), opset_version(model),
                     on_path(graph, starts, end), whole_body=bool(model_input))
    add_target_input(graph)
    gradients = differentiate(ctx, head_nodes(graph, starts, end), end, seed_gradient(b, end),
                              starts)
    for index, gradient in enumerate(gradients[: len(layer_tensors(graph))]):
        name = layer_output(OUTPUT_GRADIENTS, index)
        b.nodes.append(helper.make_node("Identity", [gradient], [name],
                                        name=f"onnxcam/{name}"))
        graph.output.append(float_output(name, 4))
    if model_input:
        add_input_gradient(b, gradients[-1], OUTPUT_INPUT_GRADIENTS, layout)
    b.commit()
    return PassResult(model, True)


def add_guided_gradients(
    model: onnx.ModelProto, shapes: Mapping[str, TensorShape], model_input: str,
    layout: str = "nhwc",
) -> PassResult:
    """Add ``guided_input_gradients``: a second backward pass where ReLU passes only
    positive gradients, and only where its input was positive (guided backprop).

    Same preconditions as ``add_gradients``, which must have run first (it adds
    ``target``; MaxPool's indices are shared).
    """
    graph = model.graph
    end = source_of(graph, OUTPUT_LOGITS)
    b = GraphBuilder(graph, "onnxcam/guided")
    ctx = VjpContext(b, shapes, initializer_values(graph), opset_version(model),
                     on_path(graph, [model_input], end), guided=True, whole_body=True)
    (gradient,) = differentiate(ctx, head_nodes(graph, model_input, end), end,
                                seed_gradient(b, end), [model_input])
    add_input_gradient(b, gradient, OUTPUT_GUIDED_INPUT_GRADIENTS, layout)
    b.commit()
    return PassResult(model, True)


def add_input_gradient(b: GraphBuilder, gradient: str, name: str, layout: str) -> None:
    """Expose a model-input gradient as ``name``, NHWC whatever the model's layout."""
    if layout == "nchw":
        b.nodes.append(helper.make_node("Transpose", [gradient], [name], name=f"onnxcam/{name}",
                                        perm=[0, 2, 3, 1]))
    else:
        b.nodes.append(helper.make_node("Identity", [gradient], [name], name=f"onnxcam/{name}"))
    b.graph.output.append(float_output(name, 4))
