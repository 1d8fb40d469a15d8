"""Rules for ops that pick values by computed indices: TopK, GatherElements,
ScatterElements. Their index inputs and outputs carry no gradient."""

from __future__ import annotations

import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext, string_attr
from onnxcam.graph import attrs

Grads = list[str | None]


def _axis(ctx: VjpContext, node: onnx.NodeProto, default: int) -> int:
    """The op's axis, refused where it is the batch axis (that would mix samples)."""
    shape = ctx.shape(node.input[0])
    axis = int(attrs(node).get("axis", default)) % shape.rank
    if shape.holds_samples(axis):
        raise NotImplementedError(f"{node.op_type} along the batch axis")
    return axis


def _scatter_add(ctx: VjpContext, like: str, indices: str, grad: str, axis: int) -> str:
    if ctx.opset < 16:
        raise NotImplementedError("scatter-add before opset 16 (no ScatterElements reduction)")
    return ctx.b.op("ScatterElements", [ctx.zeros_like(like), indices, grad], axis=axis,
                    reduction="add")


@rule("TopK")
def top_k(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """The values' gradient goes back to the positions they were taken from; the
    indices are distinct along the axis, so a plain scatter suffices."""
    g_values = g[0]
    if g_values is None:  # only the indices lead on: they carry no gradient
        return [None] * len(node.input)
    axis = _axis(ctx, node, -1)
    indices = node.output[1]
    if not indices:
        raise NotImplementedError("TopK without its indices output")
    scattered = ctx.b.op("ScatterElements", [ctx.zeros_like(node.input[0]), indices, g_values],
                         axis=axis)
    return [scattered, None]


@rule("GatherElements")
def gather_elements(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Scatter-add the gradient back (indices may repeat)."""
    (gy,) = g
    assert gy is not None
    data, indices = node.input
    return [_scatter_add(ctx, data, indices, gy, _axis(ctx, node, 0)), None]


@rule("ScatterElements")
def scatter_elements(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Updates get the gradient at their targets; data keeps it where nothing was
    written (reduction none) or everywhere (add).

    Precondition for reduction none: indices are distinct, as where torch's
    ``index_put`` and torchvision's MultiScaleRoIAlign write each row once.
    """
    (gy,) = g
    assert gy is not None
    data, indices, updates = node.input
    reduction = string_attr(node, "reduction", "none")
    if reduction not in ("none", "add"):
        raise NotImplementedError(f"ScatterElements reduction {reduction!r}")
    axis = _axis(ctx, node, 0)
    g_updates = ctx.b.op("GatherElements", [gy, indices], axis=axis) \
        if ctx.needs(updates) else None
    g_data = None
    if ctx.needs(data):
        g_data = gy if reduction == "add" else ctx.b.op(
            "ScatterElements", [gy, indices, ctx.zeros_like(updates)], axis=axis)
    return [g_data, None, g_updates]
