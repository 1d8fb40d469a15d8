"""Grad-CAM channel weights by finite differences, for heads without gradient rules.

Grad-CAM's weight for channel k is the spatial mean of d score / d A[..., k], which
is the directional derivative of the score along "add 1 to every pixel of channel
k", divided by h*w. Where the head after the perturbation point is affine, the
slopes are exact from one evaluation on the unit basis. Otherwise a ``Loop`` moves one
channel of the whole batch per trip: forward differences with the perturbed tail
in float64 (``float64_tail``) where it can run so, else central differences in
float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from onnxcam.bundle import OUTPUT_ACTIVATIONS, OUTPUT_LOGITS, OUTPUT_WEIGHTS
from onnxcam.errors import ExportError
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.float64_tail import DOUBLE, FLOAT, copy_double, runs_in_double, tensor_types
from onnxcam.exporter.head import add_target_input, chosen_class
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.graph import (
    GraphBuilder,
    attrs,
    consumers,
    float_output,
    head_nodes,
    initializer_values,
    opset_version,
    reduce,
    source_of,
)
from onnxcam.layout import Layout

# Bytes of the unit basis and its scores the affine path may fold into constants.
CHUNK_BYTES = 64 * 2**20
# Steps relative to the image's mean |activation|. In float64 rounding costs
# ~1e-16/step, so a tiny forward step crosses almost no ReLU kink and curvature
# costs ~step. In float32 rounding costs ~6e-8/step and a central step's truncation
# ~step^2: 1e-3 balances them.
STEP_FLOAT64 = 1e-6
STEP_FLOAT32 = 1e-3
# An fd weight costs one evaluation of the tail per channel (two in float32). Past
# this many multiply-adds per image (~40 s in float64 on two busy cores; Swin-T's
# last block, 1e11, took 20 s) the export is refused: a ViT-B head from
# ``conv_proj`` at 64x64 needs 1.1e12 and would run for many minutes.
MAX_FD_MACS = 2e11



# --------------------------------------------------------------------------- the shortcut

# Ops proven channel-wise: a uniform shift of one channel of the input is the same
# shift of one channel of the output and touches no other channel, provided the
# checks in ``_channel_after`` hold (the reduced axes exclude batch and channel, the
# reshapes only drop or add axes of size 1). Anything else that reads channel k
# with others - LayerNormalization or Softmax over C, MatMul/Gemm over C, any
# normalisation over C - stops the shortcut, and so does any op not listed.
CHANNEL_WISE_OPS = frozenset({
    "Identity", "Dropout", "Transpose", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
    "ReduceMax", "Squeeze", "Unsqueeze", "Flatten", "Reshape",
})


def _reduced_axes(node: onnx.NodeProto, rank: int,
                  constants: Mapping[str, np.ndarray]) -> set[int] | None:
    """The axes a Reduce* node reduces (attribute or, from opset 18, input); None if
    they are not constant. No axes means all, unless noop_with_empty_axes."""
    given = attrs(node).get("axes")
    if given is None and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            return None
        given = constants[node.input[1]].tolist()
    if not given:
        return set() if attrs(node).get("noop_with_empty_axes", 0) else set(range(rank))
    return {int(a) % rank for a in given}


def _channel_after(node: onnx.NodeProto, axis: int, shapes: Mapping[str, TensorShape],
                   constants: Mapping[str, np.ndarray]) -> int | None:
    """Where the shifted channel axis lands after ``node``; None unless ``node`` is
    proven channel-wise for this axis (see ``CHANNEL_WISE_OPS``).

    Precondition: ``node.input[0]`` is the shifted tensor, channel on ``axis``.
    """
    if node.op_type not in CHANNEL_WISE_OPS or node.input[0] not in shapes:
        return None
    source, out = shapes[node.input[0]], shapes.get(node.output[0])
    if out is None or out.dims[:1] != source.dims[:1] or out.batched[:1] != (True,):
        return None  # the batch must stay the leading axis
    if node.op_type in ("Identity", "Dropout"):
        return axis
    if node.op_type == "Transpose":
        perm = list(attrs(node).get("perm", range(source.rank)[::-1]))
        return perm.index(axis) if perm[0] == 0 else None
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return axis if axis == 1 else None  # they pool every axis after the second
    if node.op_type in ("ReduceMean", "ReduceMax"):
        reduced = _reduced_axes(node, source.rank, constants)
        if reduced is None or reduced & {0, axis}:
            return None
        if attrs(node).get("keepdims", 1):
            return axis
        return axis - sum(1 for a in reduced if a < axis)
    # Squeeze, Unsqueeze, Flatten, Reshape: safe only when every axis but batch and
    # channel has size 1, so the op can only move the channel axis, not mix it.
    if any(d != 1 for i, d in enumerate(source.dims) if i not in (0, axis)):
        return None
    if node.op_type == "Flatten" and attrs(node).get("axis", 1) != 1:
        return None
    channels = source.dims[axis]
    others = [i for i, d in enumerate(out.dims) if i > 0 and d != 1]
    return others[0] if len(others) == 1 and out.dims[others[0]] == channels else None


def perturbation_point(
    graph: onnx.GraphProto, start: str, axis: int, shapes: Mapping[str, TensorShape],
) -> tuple[str, int]:
    """The furthest tensor that a channel-uniform shift of ``start`` reaches unchanged,
    and its channel axis.

    Shifting channel k of the target layer by e everywhere shifts channel k of a
    global pool's output by e (mean or max alike), so differences taken there are
    the same, and far cheaper. The walk stops at a fork and at any op not proven
    channel-wise (``_channel_after``).
    """
    readers = consumers(graph)
    constants = initializer_values(graph)
    current = start
    while True:
        head = [n for n in readers.get(current, []) if n.name != "onnxcam/activations"]
        if len(head) != 1 or head[0].input[0] != current:
            return current, axis
        moved = _channel_after(head[0], axis, shapes, constants)
        if moved is None:
            return current, axis
        current, axis = head[0].output[0], moved


# --------------------------------------------------------------------------- affine tails

# Ops affine in the inputs named by position, when every other input is constant
# in the point (a weight, a shape). None: every input may carry the point.
AFFINE_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Add": None, "Sub": None, "Concat": None, "Sum": None, "Neg": (0,), "Identity": (0,),
    "Dropout": (0,), "Flatten": (0,), "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Transpose": (0,), "Split": (0,), "Slice": (0,), "Expand": (0,), "Mul": (0, 1),
    "Div": (0,), "MatMul": (0, 1), "Gemm": (0, 1, 2), "ReduceMean": (0,), "ReduceSum": (0,),
    "BatchNormalization": (0,),
}
# Of these, the ones where two inputs carrying the point would multiply them.
PRODUCTS = {"Mul": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1)}


def affine_in(nodes: list[onnx.NodeProto], point: str) -> bool:
    """Whether ``nodes`` (a head in graph order) compute an affine function of ``point``.

    Shape and Size outputs do not depend on values. Every other node that reads a
    value computed from the point must be in ``AFFINE_INPUTS`` with the point only
    at the listed positions, and never on both factors of a product.
    """
    dependent = {point}
    for node in nodes:
        carrying = [i for i, name in enumerate(node.input) if name in dependent]
        if not carrying or node.op_type in ("Shape", "Size"):
            continue
        allowed = AFFINE_INPUTS.get(node.op_type, ())
        if allowed is not None and not set(carrying) <= set(allowed):
            return False
        factors = PRODUCTS.get(node.op_type, ())
        if sum(1 for i in carrying if i in factors) > 1:
            return False
        dependent.update(o for o in node.output if o)
    return True


def affine_tail(
    graph: onnx.GraphProto, point: str, end: str, shapes: Mapping[str, TensorShape], axis: int,
) -> bool:
    """Whether the head after ``point`` is affine in it, ``point`` is an [N, C]-sized
    vector, and the head reads nothing else per sample.

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
    if not affine_in(nodes, point):
        return False
    made = {o for n in nodes for o in n.output}
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


# --------------------------------------------------------------------------- the Loop


def _shifted(b: GraphBuilder, point: str, step: str, index: str, shape: TensorShape,
             axis: int, dtype: int, central: bool) -> str:
    """``point`` with one channel moved by ``step``: channel ``index`` upwards (trip C,
    past the last channel, moves nothing); with ``central``, channel index // 2,
    upwards on even trips and downwards on odd ones."""
    channels = shape.dims[axis]
    channel, signed = index, step
    if central:
        two = b.const(2, "two")
        channel = b.op("Div", [index, two])
        sign = b.op("Sub", [b.const(1, "one"), b.op("Mul", [two, b.op("Mod", [index, two])])])
        signed = b.op("Mul", [step, b.op("Cast", [sign], to=dtype)])
    picked = b.op("Equal", [b.const(np.arange(channels, dtype=np.int64), "channels"), channel])
    broadcast = [channels if i == axis else 1 for i in range(shape.rank)]
    direction = b.op("Reshape", [b.op("Cast", [picked], to=dtype), b.const(broadcast, "shape")])
    return b.op("Add", [point, b.op("Mul", [signed, direction])])


def _loop_slopes(
    outer: GraphBuilder, nodes: list[onnx.NodeProto], point: str, end: str, target: str,
    step: str, shapes: Mapping[str, TensorShape], axis: int, types: Mapping[str, int] | None,
    opset: int,
) -> str:
    """[N, C]: differences of the score along each channel of ``point``.

    Each Loop trip moves one channel of the whole batch by ``step`` [N]: the batch
    keeps its size, so shapes the head computed from it (a transformer's Reshape to
    [N, T, C]) still hold, and memory is that of one evaluation of the tail. With
    ``types`` the tail runs in float64 and forward differences (C + 1 trips) lose
    only ~step to curvature; in float32, central ones (2C trips) lose ~step^2.
    """
    shape = shapes[point]
    channels = shape.dims[axis]
    dtype = FLOAT if types is None else DOUBLE
    base = point
    if dtype == DOUBLE:
        base, step = (outer.op("Cast", [name], to=DOUBLE) for name in (point, step))
    step = outer.op("Reshape", [step, outer.const([-1] + [1] * (shape.rank - 1), "shape")])
    body = helper.make_graph([], "fd_body", [], [])
    inner = outer.child(body, "onnxcam/fd_body")
    index, cond_in, cond_out = inner.fresh("iter"), inner.fresh("cond_in"), inner.fresh("cond")
    central = dtype == FLOAT
    renamed = {point: _shifted(inner, base, step, index, shape, axis, dtype, central)}
    if types is None:
        copy_nodes(inner, nodes, renamed)
    else:
        copy_double(outer, inner, nodes, renamed, types, opset, shapes)
    column = inner.op("Unsqueeze", [target, inner.const([1], "axes")])
    score = inner.op("Squeeze", [inner.op("GatherElements", [renamed[end], column], axis=1),
                                 inner.const([1], "axes")])
    inner.nodes.append(helper.make_node("Identity", [cond_in], [cond_out], name=inner.fresh("c")))
    inner.commit()
    body.input.extend([helper.make_tensor_value_info(index, onnx.TensorProto.INT64, []),
                       helper.make_tensor_value_info(cond_in, onnx.TensorProto.BOOL, [])])
    body.output.extend([helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, []),
                        helper.make_tensor_value_info(score, dtype, ["N"])])
    stacked = outer.fresh("fd_scores")  # [trips, N]
    trips = 2 * channels if central else channels + 1
    outer.nodes.append(helper.make_node("Loop", [outer.const(trips, "trips"), ""],
                                        [stacked], name=outer.fresh("Loop"), body=body))
    row = outer.op("Reshape", [step, outer.const([1, -1], "shape")])
    if central:
        pairs = outer.op("Reshape", [stacked, outer.const([channels, 2, -1], "shape")])
        up, down = (outer.op("Gather", [pairs, outer.const(i, "sign")], axis=1) for i in (0, 1))
        slopes = outer.op("Div", [outer.op("Sub", [up, down]), outer.op("Add", [row, row])])
    else:
        moved = outer.op("Slice", [stacked, outer.const([0], "s"), outer.const([channels], "e")])
        unmoved = outer.op("Slice", [stacked, outer.const([channels], "s"),
                                     outer.const([channels + 1], "e")])
        slopes = outer.op("Div", [outer.op("Sub", [moved, unmoved]), row])
    return outer.op("Cast", [outer.op("Transpose", [slopes], perm=[1, 0])], to=FLOAT)


def tail_macs(nodes: list[onnx.NodeProto], shapes: Mapping[str, TensorShape]) -> int:
    """Multiply-adds of one evaluation of ``nodes`` per image, roughly: each output
    element costs one, times the reduced length for MatMul, Gemm and Conv."""
    total = 0
    for node in nodes:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        size = int(np.prod(out.dims))
        operand = shapes.get(node.input[0 if node.op_type != "Conv" else 1])
        if node.op_type in ("MatMul", "Gemm") and operand is not None:
            transposed = node.op_type == "Gemm" and attrs(node).get("transA", 0)
            size *= operand.dims[0 if transposed else -1]
        elif node.op_type == "Conv" and operand is not None:
            size *= int(np.prod(operand.dims[1:]))
        total += size
    return total


def add_fd_weights(draft: Draft) -> bool:
    """Add the ``target`` input and a ``weights`` output [N, C] by finite differences,
    for the primary layer; record ``draft.gradient = "fd"``, the step (relative to
    the mean |activation|; 1.0 marks the exact affine-tail case) and the channels
    moved per Loop trip (0 when no Loop is needed).

    Preconditions: ``activations`` (a 4-D map in ``draft.taps[0].layout``) and
    ``logits`` are outputs; ``draft.shapes`` covers the head; graph is sorted.
    False when ``weights`` is an output already. Raises ExportError when the
    differences would cost more than ``MAX_FD_MACS`` per image.
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
    height, width = layout.spatial(act.dims)
    point, axis = perturbation_point(graph, start, layout.channel_axis, shapes)
    add_target_input(graph)
    b = GraphBuilder(graph, "onnxcam/fd")
    target = chosen_class(b, end)
    if affine_tail(graph, point, end, shapes, axis):
        slopes = _affine_slopes(graph, b, point, end, target, shapes[point], axis)
        relative_step, per_trip = 1.0, 0
    else:
        nodes = head_nodes(graph, point, end, differentiable_only=False)
        opset = opset_version(draft.model)
        types = tensor_types(draft.model)
        in_double = runs_in_double(nodes, types, shapes)
        channels = shapes[point].dims[axis]
        check_cost(nodes, shapes, channels + 1 if in_double else 2 * channels)
        relative_step, per_trip = (STEP_FLOAT64 if in_double else STEP_FLOAT32), 1
        magnitude = reduce(b, "ReduceMean", b.op("Abs", [start]), [1, 2, 3], False, opset)
        # The floor keeps an all-zero map's step off zero.
        step = b.op("Add", [b.op("Mul", [magnitude, b.scalar(relative_step)]),
                            b.scalar(relative_step * 1e-3)])
        slopes = _loop_slopes(b, nodes, point, end, target, step, shapes, axis,
                              types if in_double else None, opset)
    b.nodes.append(helper.make_node(
        "Mul", [slopes, b.scalar(1.0 / (height * width))], [OUTPUT_WEIGHTS],
        name="onnxcam/weights"))
    b.commit()
    graph.output.append(float_output(OUTPUT_WEIGHTS, 2))
    draft.gradient, draft.fd_step, draft.fd_chunk = "fd", relative_step, per_trip
    return True


def check_cost(nodes: list[onnx.NodeProto], shapes: Mapping[str, TensorShape],
               evaluations: int) -> None:
    """Refuse differences that would take minutes (see ``MAX_FD_MACS``)."""
    macs = evaluations * tail_macs(nodes, shapes)
    if macs > MAX_FD_MACS:
        raise ExportError(
            f"finite differences would need {evaluations} evaluations of the head "
            f"({macs:.1e} multiply-adds per image, over the limit of {MAX_FD_MACS:.0e}); "
            "choose a later --layer, or analytic gradients where every head op has a rule")
