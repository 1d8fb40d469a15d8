"""Rules for ops that only move values around: reshapes, transposes, concat, slices."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.graph import attrs

Grads = list[str | None]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    return [ctx.reshape_like(gy, node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    perm = attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(ctx.shape(node.input[0]).rank)))
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.b.op("Transpose", [gy], perm=inverse)]


@rule("Expand")
def expand(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    return [ctx.unbroadcast(gy, node.output[0], node.input[0]), None]


def _static_axis_sizes(ctx: VjpContext, names: list[str], axis: int) -> list[int]:
    sizes = []
    for name in names:
        shape = ctx.shape(name)
        if shape.batched[axis]:
            raise NotImplementedError("concat or split along the batch axis")
        sizes.append(shape.dims[axis])
    return sizes


@rule("Concat")
def concat(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    rank = ctx.shape(node.output[0]).rank
    axis = int(attrs(node)["axis"]) % rank
    sizes = _static_axis_sizes(ctx, list(node.input), axis)
    parts = ctx.b.op_multi(
        "Split", [gy, ctx.b.const(sizes, "split")], n_out=len(sizes), axis=axis
    )
    return [part if ctx.needs(name) else None for part, name in zip(parts, node.input)]


@rule("Split")
def split(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    rank = ctx.shape(node.input[0]).rank
    axis = int(attrs(node).get("axis", 0)) % rank
    _static_axis_sizes(ctx, list(node.output), axis)
    pieces = [gi if gi is not None else ctx.zeros_like(out) for gi, out in zip(g, node.output)]
    return [ctx.b.op("Concat", pieces, axis=axis)] + [None] * (len(node.input) - 1)


def _slice_params(ctx: VjpContext, node: onnx.NodeProto) -> tuple[list[int], ...]:
    a = attrs(node)
    if "starts" in a:  # opset < 10
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = [ctx.const(n) if n else None for n in list(node.input[1:]) + ["", "", ""]][:4]
        if values[0] is None or values[1] is None:
            raise NotImplementedError("Slice with computed bounds")
        starts, ends = list(values[0]), list(values[1])
        axes = list(values[2]) if values[2] is not None else list(range(len(starts)))
        steps = list(values[3]) if values[3] is not None else [1] * len(starts)
    return [int(v) for v in starts], [int(v) for v in ends], [int(v) for v in axes], \
        [int(v) for v in steps]


@rule("Slice")
def slice_(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Pad the gradient back with zeros where the slice dropped values (unit steps)."""
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    shape = ctx.shape(x)
    starts, ends, axes, steps = _slice_params(ctx, node)
    pads = [0] * (2 * shape.rank)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= shape.rank
        if step != 1:
            raise NotImplementedError("Slice with a step other than 1")
        if shape.batched[axis]:
            if start == 0 and end >= 2**30:
                continue  # the whole batch axis
            raise NotImplementedError("Slice along the batch axis")
        size = shape.dims[axis]
        begin = min(max(start + size if start < 0 else start, 0), size)
        stop = min(max(end + size if end < 0 else end, 0), size)
        pads[axis] = begin
        pads[shape.rank + axis] = size - max(stop, begin)
    return [ctx.b.op("Pad", [gy, ctx.b.const(pads, "pads")])] + [None] * (len(node.input) - 1)


@rule("Pad")
def pad(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Crop the padded border off the gradient (constant mode, non-negative pads)."""
    (gy,) = g
    assert gy is not None
    a = attrs(node)
    mode = a.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise NotImplementedError(f"Pad mode {mode!r}")
    if "pads" in a:
        pads = [int(p) for p in a["pads"]]
        axes = None
    else:
        value = ctx.const(node.input[1])
        if value is None:
            raise NotImplementedError("Pad with computed pads")
        pads = [int(p) for p in value.reshape(-1)]
        axes_value = ctx.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axes = None if axes_value is None else [int(v) for v in axes_value.reshape(-1)]
    shape = ctx.shape(node.input[0])
    rank = shape.rank
    axes = [v % rank for v in axes] if axes is not None else list(range(rank))
    if any(p < 0 for p in pads):
        raise NotImplementedError("Pad with negative pads")
    count = len(axes)
    starts, ends, cropped = [], [], []
    for i, axis in enumerate(axes):
        if not (pads[i] or pads[count + i]):
            continue
        if shape.batched[axis]:
            raise NotImplementedError("Pad along the batch axis")
        starts.append(pads[i])
        ends.append(pads[i] + shape.dims[axis])
        cropped.append(axis)
    if not cropped:
        return [gy] + [None] * (len(node.input) - 1)
    gx = ctx.b.op(
        "Slice", [gy, ctx.b.const(starts, "starts"), ctx.b.const(ends, "ends"),
                  ctx.b.const(cropped, "axes")],
    )
    return [gx] + [None] * (len(node.input) - 1)
