"""Rules for pooling and reductions."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.exporter.vjp.linear import explicit_pads
from onnxcam.graph import attrs

Grads = list[str | None]


def _spatial_axes(ctx: VjpContext, x: str) -> list[int]:
    return list(range(2, ctx.shape(x).rank))


@rule("GlobalAveragePool")
def global_average_pool(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    count = int(np.prod(ctx.shape(x).dims[2:]))
    scaled = ctx.b.op("Mul", [gy, ctx.scalar(1.0 / count)])
    return [ctx.b.op("Expand", [scaled, ctx.b.op("Shape", [x])])]


def _max_grad(ctx: VjpContext, x: str, y_kept: str, g_kept: str, axes: list[int]) -> str:
    """Share the gradient equally among the tied maxima, as TF's reduce_max does."""
    picked = ctx.b.op("Cast", [ctx.b.op("Equal", [x, y_kept])], to=onnx.TensorProto.FLOAT)
    count = ctx.reduce("ReduceSum", picked, axes, keepdims=True)
    return ctx.b.op("Mul", [picked, ctx.b.op("Div", [g_kept, count])])


@rule("GlobalMaxPool")
def global_max_pool(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    return [_max_grad(ctx, x, node.output[0], gy, _spatial_axes(ctx, x))]


def _reduce_axes(ctx: VjpContext, node: onnx.NodeProto) -> list[int]:
    a = attrs(node)
    rank = ctx.shape(node.input[0]).rank
    axes: list[int] | None = None
    if "axes" in a:
        axes = [int(v) for v in a["axes"]]
    elif len(node.input) > 1 and node.input[1]:
        value = ctx.const(node.input[1])
        if value is None:
            raise NotImplementedError(f"{node.op_type} with computed axes")
        axes = [int(v) for v in value.reshape(-1)]
    if not axes:
        if int(a.get("noop_with_empty_axes", 0)):
            return []
        axes = list(range(rank))
    return sorted(v % rank for v in axes)


def _kept(ctx: VjpContext, node: onnx.NodeProto, name: str, axes: list[int]) -> str:
    """View a reduction's output (or its gradient) with the reduced axes kept as size 1."""
    if int(attrs(node).get("keepdims", 1)) or not axes:
        return name
    return ctx.b.op("Unsqueeze", [name, ctx.b.const(axes, "axes")])


def _reduced_count(ctx: VjpContext, x: str, axes: list[int]) -> int:
    shape = ctx.shape(x)
    if any(shape.batched[a] for a in axes):
        raise NotImplementedError("reduction over the batch axis")
    return int(np.prod([shape.dims[a] for a in axes]))


@rule("ReduceSum", "ReduceMean")
def reduce_sum_mean(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g[:1]
    assert gy is not None
    x = node.input[0]
    axes = _reduce_axes(ctx, node)
    grad = _kept(ctx, node, gy, axes)
    if node.op_type == "ReduceMean" and axes:
        grad = ctx.b.op("Mul", [grad, ctx.scalar(1.0 / _reduced_count(ctx, x, axes))])
    return [ctx.b.op("Expand", [grad, ctx.b.op("Shape", [x])])] + [None] * (len(node.input) - 1)


@rule("ReduceL2", "ReduceSumSquare")
def reduce_l2(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """||x||: x / ||x|| (0 where the norm is 0, as F.normalize's clamp makes it moot);
    sum of squares: 2x."""
    (gy,) = g[:1]
    assert gy is not None
    x = node.input[0]
    axes = _reduce_axes(ctx, node)
    _reduced_count(ctx, x, axes)
    grad = _kept(ctx, node, gy, axes)
    if node.op_type == "ReduceSumSquare":
        slope = ctx.b.op("Mul", [x, ctx.scalar(2.0)])
    else:
        norm = _kept(ctx, node, node.output[0], axes)
        grad = ctx.b.op("Where", [ctx.b.op("Greater", [norm, ctx.zero()]),
                                  ctx.b.op("Div", [grad, norm]), ctx.zero()])
        slope = x
    return [ctx.b.op("Mul", [grad, slope])] + [None] * (len(node.input) - 1)


@rule("ReduceMax")
def reduce_max(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g[:1]
    assert gy is not None
    x = node.input[0]
    axes = _reduce_axes(ctx, node)
    _reduced_count(ctx, x, axes)
    y_kept = _kept(ctx, node, node.output[0], axes)
    grad = _max_grad(ctx, x, y_kept, _kept(ctx, node, gy, axes), axes)
    return [grad] + [None] * (len(node.input) - 1)


def _window(ctx: VjpContext, node: onnx.NodeProto) -> tuple[list[int], list[int], list[int]]:
    a = attrs(node)
    kernel = [int(k) for k in a["kernel_shape"]]
    n = len(kernel)
    strides = [int(s) for s in a.get("strides", [1] * n)]
    dilations = [int(d) for d in a.get("dilations", [1] * n)]
    x_dims = ctx.shape(node.input[0]).dims
    y_dims = ctx.shape(node.output[0]).dims
    pads = explicit_pads(a, x_dims[2:], y_dims[2:], tuple(kernel), strides, dilations)
    return kernel, strides, pads


def _valid_counts(size: int, out: int, k: int, s: int, pad_begin: int) -> np.ndarray:
    """How many real (non-padding) inputs each window covers along one axis."""
    starts = np.arange(out) * s - pad_begin
    return (np.minimum(starts + k, size) - np.maximum(starts, 0)).astype(np.float32)


@rule("AveragePool")
def average_pool(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Spread each window's gradient evenly over it: a depthwise ConvTranspose of ones."""
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    a = attrs(node)
    kernel, strides, pads = _window(ctx, node)
    n = len(kernel)
    x_dims, y_dims = ctx.shape(x).dims, ctx.shape(node.output[0]).dims
    covered = [strides[i] * (y_dims[2 + i] - 1) + kernel[i] - pads[i] - pads[n + i]
               for i in range(n)]
    output_padding = [x_dims[2 + i] - covered[i] for i in range(n)]
    if any(p < 0 for p in output_padding) or any(
        int(d) != 1 for d in a.get("dilations", [1] * n)
    ):
        raise NotImplementedError("AveragePool windows that overhang the input (ceil_mode)")
    if int(a.get("count_include_pad", 0)):
        divisor = np.full(y_dims[2:], float(np.prod(kernel)), np.float32)
    else:
        per_axis = [
            _valid_counts(x_dims[2 + i], y_dims[2 + i], kernel[i], strides[i], pads[i])
            for i in range(n)
        ]
        divisor = per_axis[0]
        for counts in per_axis[1:]:
            divisor = np.multiply.outer(divisor, counts)
    scaled = ctx.b.op("Mul", [gy, ctx.b.const((1.0 / divisor)[None, None], "pool_scale")])
    channels = x_dims[1]
    ones = ctx.b.const(np.ones([channels, 1, *kernel], np.float32), "pool_ones")
    gx = ctx.b.op(
        "ConvTranspose", [scaled, ones], strides=strides, pads=pads, group=channels,
        output_padding=output_padding,
    )
    return [gx]


@rule("MaxPool")
def max_pool(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Route each window's gradient to its argmax via MaxPool's Indices and a scatter-add.

    This enables the forward node's optional Indices output, the one change a rule
    makes to the forward graph.
    """
    gy = g[0]
    assert gy is not None
    x = node.input[0]
    if int(attrs(node).get("storage_order", 0)):
        raise NotImplementedError("MaxPool with column-major indices")
    if len(node.output) < 2 or not node.output[1]:
        del node.output[1:]
        node.output.append(ctx.b.fresh("maxpool_indices"))
    indices = node.output[1]
    flat = ctx.b.const([-1], "flat")
    zeros = ctx.b.op("Reshape", [ctx.zeros_like(x), flat])
    scattered = ctx.b.op(
        "ScatterElements",
        [zeros, ctx.b.op("Reshape", [indices, flat]), ctx.b.op("Reshape", [gy, flat])],
        axis=0,
        reduction="add",
    )
    return [ctx.reshape_like(scattered, x)]
