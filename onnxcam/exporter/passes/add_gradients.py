"""Reverse-mode differentiation of the head, built from the graph's own nodes.

The head is every node on a path from the target layer's tensor to the logits.
Seeding with ``target_weights`` (else one_hot(target)) and running each node's VJP
rule backwards yields d sum(weights * logits[n]) / d activations for the whole batch
at once. With several
layers, or the model input as well, one backward pass over the union of their
heads yields every gradient: the later layers' are by-products of the earlier's.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from onnxcam.bundle import (
    OUTPUT_GRADIENTS,
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
    layer_output,
)
from onnxcam.errors import UnsupportedOpError
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.head import head_starts, layer_tensors, target_seed
from onnxcam.exporter.vjp import load_rules
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.graph import (
    GraphBuilder,
    float_output,
    head_nodes,
    initializer_values,
    on_path,
    opset_version,
    source_of,
)
from onnxcam.layout import Layout, TokenGrid


def backpropagate(
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


def add_gradients(draft: Draft) -> bool:
    """Add the ``target`` and ``target_weights`` inputs and each layer's ``gradients`` output; with
    ``options.input_gradients``, also ``input_gradients`` (NHWC, whatever the
    model's layout). Records ``draft.gradient = "analytic"``.

    Preconditions: ``activations`` (and ``activations.i``) and ``logits`` are
    outputs; ``draft.shapes`` covers the head (``probe_head``); graph is sorted.
    False when ``gradients`` is an output already.
    """
    graph = draft.graph
    if OUTPUT_GRADIENTS in {o.name for o in graph.output}:
        return False
    model_input = draft.model_input if draft.options.input_gradients else ""
    starts = head_starts(graph, model_input)
    end = source_of(graph, OUTPUT_LOGITS)
    b = GraphBuilder(graph, "onnxcam/grad")
    ctx = VjpContext(b, draft.shapes, initializer_values(graph), opset_version(draft.model),
                     on_path(graph, starts, end), whole_body=bool(model_input))
    seed = target_seed(b, end, draft.shapes[end].dims, ctx.opset, draft.shapes[end].by_data)
    gradients = backpropagate(ctx, head_nodes(graph, starts, end), end, seed, starts)
    for index, gradient in enumerate(gradients[: len(layer_tensors(graph))]):
        name = layer_output(OUTPUT_GRADIENTS, index)
        b.nodes.append(helper.make_node("Identity", [gradient], [name],
                                        name=f"onnxcam/{name}"))
        tokens = isinstance(draft.taps[index].layout, TokenGrid)  # [N, T, C]
        graph.output.append(float_output(name, 3 if tokens else 4))
    if model_input:
        add_input_gradient(b, gradients[-1], OUTPUT_INPUT_GRADIENTS, draft.layout)
    b.commit()
    draft.gradient = "analytic"
    return True


def add_guided_gradients(draft: Draft) -> bool:
    """Add ``guided_input_gradients``: a second backward pass where ReLU passes only
    positive gradients, and only where its input was positive (guided backprop).

    Same preconditions as ``add_gradients``, which must have run first (its seed is
    shared; so are MaxPool's indices), and ``draft.shapes`` must cover the
    whole body. False when the output exists already.
    """
    graph = draft.graph
    if OUTPUT_GUIDED_INPUT_GRADIENTS in {o.name for o in graph.output}:
        return False
    model_input = draft.model_input
    end = source_of(graph, OUTPUT_LOGITS)
    b = GraphBuilder(graph, "onnxcam/guided")
    ctx = VjpContext(b, draft.shapes, initializer_values(graph), opset_version(draft.model),
                     on_path(graph, [model_input], end), guided=True, whole_body=True)
    seed = target_seed(b, end, draft.shapes[end].dims, ctx.opset, draft.shapes[end].by_data)
    (gradient,) = backpropagate(ctx, head_nodes(graph, model_input, end), end, seed,
                                [model_input])
    add_input_gradient(b, gradient, OUTPUT_GUIDED_INPUT_GRADIENTS, draft.layout)
    b.commit()
    return True


def add_input_gradient(b: GraphBuilder, gradient: str, name: str, layout: Layout) -> None:
    """Expose a model-input gradient as ``name``, NHWC whatever the model's layout."""
    if layout is Layout.NCHW:
        b.nodes.append(helper.make_node("Transpose", [gradient], [name], name=f"onnxcam/{name}",
                                        perm=[0, 2, 3, 1]))
    else:
        b.nodes.append(helper.make_node("Identity", [gradient], [name], name=f"onnxcam/{name}"))
    b.graph.output.append(float_output(name, 4))
