"""Rules for the normalisations that use the sample's own statistics: Layer-,
Instance- and GroupNormalization (gradient w.r.t. X; scale and bias are parameters).

All three normalise x over some axes, x_hat = (x - mean) * r with r = 1/sqrt(var + eps),
then scale and shift. With g = dY * scale, the input gradient is
    dX = r * (g - mean(g) - x_hat * mean(g * x_hat)),
the means taken over the normalised axes. The statistics are recomputed from x in
the backward graph (not read from the optional Mean/InvStdDev outputs), so the
forward node is left exactly as exported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.graph import attrs

Grads = list[str | None]


def normalized_vjp(ctx: VjpContext, x: str, scaled_grad: str, axes: Sequence[int],
                   epsilon: float) -> str:
    """dX for x_hat = (x - mean) / sqrt(var + eps) over ``axes``, given dL/dx_hat."""
    b = ctx.b
    mean = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    centered = b.op("Sub", [x, mean])
    variance = ctx.reduce("ReduceMean", b.op("Mul", [centered, centered]), axes, keepdims=True)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [variance, ctx.scalar(epsilon)])])])
    x_hat = b.op("Mul", [centered, inv_std])
    mean_grad = ctx.reduce("ReduceMean", scaled_grad, axes, keepdims=True)
    mean_projection = ctx.reduce("ReduceMean", b.op("Mul", [scaled_grad, x_hat]), axes,
                                 keepdims=True)
    inner = b.op("Sub", [b.op("Sub", [scaled_grad, mean_grad]),
                         b.op("Mul", [x_hat, mean_projection])])
    return b.op("Mul", [inner, inv_std])


def _refuse_parameter_gradients(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> None:
    if any(ctx.needs(name) for name in node.input[1:]):
        raise NotImplementedError(f"{node.op_type} with computed scale or bias")
    if any(gi is not None for gi in g[1:]):
        raise NotImplementedError(f"{node.op_type} whose mean or deviation is used")


def _check_not_batched(ctx: VjpContext, x: str, axes: Sequence[int]) -> None:
    if any(ctx.shape(x).batched[a] for a in axes):
        raise NotImplementedError("normalisation over the batch axis")


def _channel_column(ctx: VjpContext, name: str, rank: int) -> str:
    """A per-channel vector [C] viewed as [C, 1, ..., 1], to broadcast over NC... tensors."""
    trailing = [1] * (rank - 2)
    value = ctx.const(name)
    if value is not None:
        return ctx.b.const(value.reshape([-1, *trailing]), "channel_scale")
    return ctx.b.op("Reshape", [name, ctx.b.const([-1, *trailing], "shape")])


@rule("LayerNormalization")
def layer_norm(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Normalises over axes [axis, rank); the scale broadcasts over those axes."""
    gy = g[0]
    assert gy is not None
    _refuse_parameter_gradients(ctx, node, g)
    a = attrs(node)
    x, scale = node.input[0], node.input[1]
    rank = ctx.shape(x).rank
    axes = list(range(int(a.get("axis", -1)) % rank, rank))
    _check_not_batched(ctx, x, axes)
    scaled = ctx.b.op("Mul", [gy, scale])
    gx = normalized_vjp(ctx, x, scaled, axes, float(a.get("epsilon", 1e-5)))
    return [gx] + [None] * (len(node.input) - 1)


@rule("InstanceNormalization")
def instance_norm(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Normalises each sample's channel over its spatial axes (N, C, D1, ...)."""
    (gy,) = g
    assert gy is not None
    _refuse_parameter_gradients(ctx, node, g)
    x, scale = node.input[0], node.input[1]
    rank = ctx.shape(x).rank
    axes = list(range(2, rank))
    _check_not_batched(ctx, x, axes)
    scaled = ctx.b.op("Mul", [gy, _channel_column(ctx, scale, rank)])
    gx = normalized_vjp(ctx, x, scaled, axes, float(attrs(node).get("epsilon", 1e-5)))
    return [gx] + [None] * (len(node.input) - 1)


@rule("GroupNormalization")
def group_norm(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Normalises groups of channels (N, C, D1, ...) seen as [N, G, C/G * D1 ...].

    Opset 21 and later (18's form, scaled per group, is deprecated and fails onnx's
    checker). Precondition: the batch, if any, is axis 0.
    """
    (gy,) = g
    assert gy is not None
    if ctx.opset < 21:
        raise NotImplementedError("GroupNormalization before opset 21")
    _refuse_parameter_gradients(ctx, node, g)
    a = attrs(node)
    x, scale = node.input[0], node.input[1]
    shape = ctx.shape(x)
    if any(shape.batched[1:]):
        raise NotImplementedError("GroupNormalization with the batch on another axis than 0")
    grouped_shape = ctx.b.const(np.asarray([0, int(a["num_groups"]), -1], np.int64), "grouped")
    scaled = ctx.b.op("Mul", [gy, _channel_column(ctx, scale, shape.rank)])
    scaled = ctx.b.op("Reshape", [scaled, grouped_shape])
    grouped_x = ctx.b.op("Reshape", [x, grouped_shape])
    gx = normalized_vjp(ctx, grouped_x, scaled, [2], float(a.get("epsilon", 1e-5)))
    return [ctx.reshape_like(gx, x)] + [None] * (len(node.input) - 1)
