"""Grad-CAM channel weights by finite differences, for heads without gradient rules.

Grad-CAM's weight for channel k is the spatial mean of d score / d A[..., k], which
is the directional derivative of the score along "add 1 to every pixel of channel
k", divided by h*w. One forward difference per channel gives it, exactly so for
piecewise-linear heads when the step crosses no kink. The head is copied into a
``Loop`` that perturbs a chunk of channels per iteration, so memory stays bounded
however many channels there are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from onnxcam.bundle import OUTPUT_ACTIVATIONS, OUTPUT_LOGITS, OUTPUT_WEIGHTS
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.head import add_target_input, chosen_class
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.graph import (
    GraphBuilder,
    attrs,
    consumers,
    float_output,
    head_nodes,
    opset_version,
    reduce,
    source_of,
)
from onnxcam.layout import Layout

# Perturbed activation copies held at once, in bytes.
CHUNK_BYTES = 64 * 2**20
# Step relative to the mean |activation|: smaller crosses fewer ReLU kinks, larger
# loses less to float32 rounding; 1e-3 balances the two on the test models.
RELATIVE_STEP = 1e-3
# When every op after the perturbation point is linear there is no kink to cross,
# so a large step is exact and leaves rounding far behind.
LINEAR_STEP = 1e-1
LINEAR_OPS = frozenset({"Gemm", "MatMul", "Add", "Sub", "Flatten", "Reshape", "Squeeze",
                        "Unsqueeze", "Transpose", "Identity", "Dropout", "Concat", "Split",
                        "Slice", "Neg"})


# Ops through which a channel-uniform shift of the input is the same shift of one
# channel of the output, so the perturbation can start after them.
UNIFORM_SHIFT_OPS = frozenset({
    "Identity", "Dropout", "Transpose", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
    "ReduceMax", "Squeeze", "Flatten", "Reshape",
})


def _channel_after(node: onnx.NodeProto, axis: int, shapes: Mapping[str, TensorShape],
                   channels: int) -> int | None:
    """Where the perturbed channel axis lands after ``node``, or None if it is mixed."""
    out = shapes.get(node.output[0])
    if out is None:
        return None
    if node.op_type == "Transpose":
        perm = attrs(node).get("perm")
        return None if perm is None else list(perm).index(axis)
    # Every other op must leave one non-batch axis of size C and only 1s beside it
    # (global pooling), or keep the shape (Identity, Dropout).
    if node.op_type in ("Identity", "Dropout"):
        return axis
    in_shape = shapes[node.input[0]]
    if node.op_type not in ("GlobalAveragePool", "GlobalMaxPool"):
        others = [d for i, d in enumerate(in_shape.dims) if i not in (0, axis)]
        if node.op_type in ("Squeeze", "Flatten", "Reshape") and any(d != 1 for d in others):
            return None
        if node.op_type in ("ReduceMean", "ReduceMax"):
            kept = out.dims[1:]
            if sorted(kept) != sorted([channels] + [1] * (len(kept) - 1)):
                return None
    matches = [i for i, d in enumerate(out.dims) if i > 0 and d == channels]
    return matches[0] if len(matches) == 1 else None


def perturbation_point(
    graph: onnx.GraphProto, start: str, axis: int, channels: int,
    shapes: Mapping[str, TensorShape],
) -> tuple[str, int]:
    """The furthest tensor that a channel-uniform shift of ``start`` reaches unchanged.

    Shifting channel k of the target layer by e everywhere shifts channel k of a
    global pool's output by e (mean or max alike), so differences taken there are
    the same, and far cheaper: the Loop then perturbs a [N, C] vector, not a map.
    """
    readers = consumers(graph)
    current = start
    while True:
        following = readers.get(current, [])
        head = [n for n in following if n.name != "onnxcam/activations"]
        if len(head) != 1 or head[0].op_type not in UNIFORM_SHIFT_OPS:
            return current, axis
        node = head[0]
        moved = _channel_after(node, axis, shapes, channels)
        if moved is None or node.output[0] not in shapes:
            return current, axis
        current, axis = node.output[0], moved


def chunk_samples(activation: TensorShape) -> int:
    """How many perturbed samples (batch x channels) one Loop iteration may hold."""
    per_sample = 4 * int(np.prod(activation.dims[1:]))
    return max(1, CHUNK_BYTES // per_sample)


def _perturbed(
    b: GraphBuilder, point: str, step: str, chunk: str, index: str, shape: TensorShape,
    axis: int,
) -> str:
    """[N*B, ...]: ``point`` with channel index*B+j raised by ``step``, for j < B."""
    channels = shape.dims[axis]
    rng = b.op("Range", [b.const(0, "zero_i"), chunk, b.const(1, "one_i")])
    first = b.op("Mul", [index, chunk])
    picked = b.op("Min", [b.op("Add", [rng, first]), b.const(channels - 1, "last")])
    directions = b.op("OneHot", [picked, b.const(channels, "depth"), b.const([0.0, 1.0], "v")],
                      axis=-1)
    tail = list(shape.dims[1:])
    direction_shape = [1, -1] + [channels if i == axis else 1 for i in range(1, shape.rank)]
    d = b.op("Reshape", [directions, b.const(direction_shape, "shape")])
    widened = b.op("Unsqueeze", [point, b.const([1], "axes")])
    s = b.op("Reshape", [step, b.const([-1] + [1] * shape.rank, "shape")])
    moved = b.op("Add", [widened, b.op("Mul", [s, d])])
    return b.op("Reshape", [moved, b.const([-1, *tail], "shape")])


def _repeat_per_chunk(b: GraphBuilder, name: str, chunk: str) -> str:
    """[N, ...] -> [N*B, ...], each sample repeated B times in a row."""
    shape = b.op("Shape", [name])
    batch = b.op("Slice", [shape, b.const([0], "s"), b.const([1], "e")])
    rest = b.op("Slice", [shape, b.const([1], "s"), b.const([2**62], "e")])
    chunk_1d = b.op("Reshape", [chunk, b.const([1], "shape")])
    expanded = b.op(
        "Expand",
        [b.op("Unsqueeze", [name, b.const([1], "axes")]),
         b.op("Concat", [batch, chunk_1d, rest], axis=0)],
    )
    return b.op("Reshape", [expanded, b.op("Concat", [b.const([-1], "m1"), rest], axis=0)])


def copy_nodes(
    b: GraphBuilder, nodes: list[onnx.NodeProto], renamed: dict[str, str]
) -> None:
    """Append copies of ``nodes`` reading ``renamed`` inputs; record their new outputs."""
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = b.fresh("head")
        for i, name in enumerate(copy.input):
            copy.input[i] = renamed.get(name, name)
        for i, name in enumerate(copy.output):
            if name:
                renamed[name] = copy.output[i] = b.fresh("head_out")
        b.nodes.append(copy)


def affine_tail(
    graph: onnx.GraphProto, point: str, end: str, shapes: Mapping[str, TensorShape], axis: int,
) -> bool:
    """Whether the head after ``point`` is affine in it and reads nothing else per sample.

    Then slope k is f(e_k) - f(0) for every image alike, computable once from
    constants (onnxruntime folds it at load), and exact.
    """
    shape = shapes[point]
    channels = shape.dims[axis]
    if int(np.prod(shape.dims[1:])) != channels:
        return False
    classes = int(np.prod(shapes[end].dims[1:]))
    if 4 * channels * (channels + classes) > 4 * CHUNK_BYTES:
        return False
    nodes = head_nodes(graph, point, end, differentiable_only=False)
    made = {o for n in nodes for o in n.output}
    differentiable = head_nodes(graph, point, end, differentiable_only=True)
    if any(n.op_type not in LINEAR_OPS for n in differentiable):
        return False
    outside = {i for n in nodes for i in n.input if i and i not in made and i != point}
    return not any(shapes[name].batched[:1] == (True,) for name in outside if name in shapes)


def _affine_slopes(
    graph: onnx.GraphProto, b: GraphBuilder, point: str, end: str, target: str,
    shape: TensorShape, axis: int,
) -> str:
    """[N, C]: d score / d point_k from the tail evaluated on the unit basis and 0."""
    channels = shape.dims[axis]
    per_sample = [channels if i == axis else 1 for i in range(1, shape.rank)]
    basis = np.concatenate([np.eye(channels, dtype=np.float32),
                            np.zeros((1, channels), np.float32)])
    renamed = {point: b.const(basis.reshape([channels + 1, *per_sample]), "basis")}
    copy_nodes(b, head_nodes(graph, point, end, differentiable_only=False), renamed)
    scores = renamed[end]
    units = b.op("Slice", [scores, b.const([0], "s"), b.const([channels], "e")])
    origin = b.op("Slice", [scores, b.const([channels], "s"), b.const([channels + 1], "e")])
    slopes = b.op("Sub", [units, origin])  # [C, K]
    return b.op("Transpose", [b.op("Gather", [slopes, target], axis=1)], perm=[1, 0])


def _loop_slopes(
    graph: onnx.GraphProto, outer: GraphBuilder, point: str, end: str, target: str,
    step: str, shapes: Mapping[str, TensorShape], axis: int, samples: int,
) -> str:
    """[N, C]: forward differences of the score along each channel, in a Loop over
    chunks of channels, at most ``samples`` perturbed samples per iteration."""
    channels = shapes[point].dims[axis]
    target_col = outer.op("Unsqueeze", [target, outer.const([1], "axes")])
    base = outer.op("GatherElements", [end, target_col], axis=1)
    batch = outer.op("Gather", [outer.op("Shape", [point]), outer.const(0, "zero")], axis=0)
    chunk = outer.op("Max", [outer.op("Div", [outer.const(samples, "samples"), batch]),
                             outer.const(1, "one")])
    trips = outer.op("Div", [outer.op("Add", [outer.const(channels, "c"),
                                              outer.op("Sub", [chunk, outer.const(1, "one")])]),
                             chunk])
    body = helper.make_graph([], "fd_body", [], [])
    inner = outer.child(body, "onnxcam/fd_body")
    index = inner.fresh("iter")
    cond_in, cond_out = inner.fresh("cond_in"), inner.fresh("cond_out")
    renamed = {point: _perturbed(inner, point, step, chunk, index, shapes[point], axis)}
    nodes = head_nodes(graph, point, end, differentiable_only=False)
    for node in nodes:
        for name in node.input:
            batched = name in shapes and shapes[name].batched[:1] == (True,)
            if name and name not in renamed and batched:
                renamed[name] = _repeat_per_chunk(inner, name, chunk)
        copy_nodes(inner, [node], renamed)
    chunk_1d = inner.op("Reshape", [chunk, inner.const([1], "shape")])
    classes = inner.op("Slice", [inner.op("Shape", [end]), inner.const([1], "s"),
                                 inner.const([2], "e")])
    scores = inner.op("Reshape", [renamed[end], inner.op(
        "Concat", [inner.const([-1], "m1"), chunk_1d, classes], axis=0)])
    index_3d = inner.op("Expand", [
        inner.op("Unsqueeze", [target, inner.const([1, 2], "axes")]),
        inner.op("Concat", [inner.op("Shape", [target]), chunk_1d, inner.const([1], "one_1d")],
                 axis=0),
    ])
    moved_scores = inner.op("Squeeze", [inner.op("GatherElements", [scores, index_3d], axis=2),
                                        inner.const([2], "axes")])
    slopes = inner.op("Div", [inner.op("Sub", [moved_scores, base]),
                              inner.op("Unsqueeze", [step, inner.const([1], "axes")])])
    inner.nodes.append(helper.make_node("Identity", [cond_in], [cond_out], name=inner.fresh("c")))
    inner.commit()
    body.input.extend([helper.make_tensor_value_info(index, onnx.TensorProto.INT64, []),
                       helper.make_tensor_value_info(cond_in, onnx.TensorProto.BOOL, [])])
    body.output.extend([helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, []),
                        float_output(slopes, 2)])
    stacked = outer.fresh("fd_scan")
    outer.nodes.append(helper.make_node("Loop", [trips, ""], [stacked],
                                        name=outer.fresh("Loop"), body=body))
    # [trips, N, B] -> [N, trips*B] -> the first C channels.
    per_sample = outer.op("Reshape", [outer.op("Transpose", [stacked], perm=[1, 0, 2]),
                                      outer.const([0, -1], "shape")])
    return outer.op("Slice", [per_sample, outer.const([0], "s"), outer.const([channels], "e"),
                              outer.const([1], "axes")])


def add_fd_weights(draft: Draft) -> bool:
    """Add the ``target`` input and a ``weights`` output [N, C] by finite differences,
    for the primary layer; record ``draft.gradient = "fd"``, the step (relative to
    the mean |activation|; 1.0 marks the exact affine-tail case) and the perturbed
    samples per Loop iteration (0 when no Loop is needed).

    Preconditions: ``activations`` (a 4-D map in ``draft.taps[0].layout``) and
    ``logits`` are outputs; ``draft.shapes`` covers the head; graph is sorted.
    False when ``weights`` is an output already.
    """
    graph = draft.graph
    if OUTPUT_WEIGHTS in {o.name for o in graph.output}:
        return False
    start = source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    shapes, layout = draft.shapes, Layout.of(draft.taps[0].layout)
    act = shapes[start]
    if act.rank != 4:
        raise ValueError("the target layer must be a 4-D map")
    channels = layout.channels(act.dims)
    height, width = layout.spatial(act.dims)
    point, axis = perturbation_point(graph, start, layout.channel_axis, channels, shapes)
    add_target_input(graph)
    b = GraphBuilder(graph, "onnxcam/fd")
    target = chosen_class(b, end)
    if affine_tail(graph, point, end, shapes, axis):
        slopes = _affine_slopes(graph, b, point, end, target, shapes[point], axis)
        relative_step, samples = 1.0, 0
    else:
        samples = chunk_samples(shapes[point])
        rest = head_nodes(graph, point, end, differentiable_only=True)
        linear = all(n.op_type in LINEAR_OPS for n in rest)
        relative_step = LINEAR_STEP if linear else RELATIVE_STEP
        magnitude = reduce(b, "ReduceMean", b.op("Abs", [start]), [1, 2, 3], False,
                           opset_version(draft.model))
        step = b.op("Add", [b.op("Mul", [magnitude, b.scalar(relative_step)]), b.scalar(1e-6)])
        slopes = _loop_slopes(graph, b, point, end, target, step, shapes, axis, samples)
    b.nodes.append(helper.make_node(
        "Mul", [slopes, b.scalar(1.0 / (height * width))], [OUTPUT_WEIGHTS],
        name="onnxcam/weights"))
    b.commit()
    graph.output.append(float_output(OUTPUT_WEIGHTS, 2))
    draft.gradient, draft.fd_step, draft.fd_chunk = "fd", relative_step, samples
    return True
