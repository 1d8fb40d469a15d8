"""Rules for ops that only move values around: reshapes, transposes, concat, slices."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext, string_attr
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


SliceParams = tuple[list[int], list[int], list[int], list[int]]


def _slice_params(ctx: VjpContext, node: onnx.NodeProto) -> SliceParams | None:
    """starts, ends, axes, steps; None where any of them is computed in the graph."""
    a = attrs(node)
    if "starts" in a:  # opset < 10
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        names = (list(node.input[1:]) + ["", "", ""])[:4]
        values = [ctx.const(n) if n else None for n in names]
        if any(name and value is None for name, value in zip(names, values)):
            return None
        assert values[0] is not None and values[1] is not None
        starts, ends = list(values[0]), list(values[1])
        axes = list(values[2]) if values[2] is not None else list(range(len(starts)))
        steps = list(values[3]) if values[3] is not None else [1] * len(starts)
    return [int(v) for v in starts], [int(v) for v in ends], [int(v) for v in axes], \
        [int(v) for v in steps]


def _whole_axis(start: int, end: int, step: int) -> bool:
    return start == 0 and end >= 2**30 and step == 1


@rule("Slice")
def slice_(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Unit steps and constant bounds: pad the gradient back with zeros where the slice
    dropped values. Strides or computed bounds: see ``_slice_by_scatter``."""
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    shape = ctx.shape(x)
    params = _slice_params(ctx, node)
    none = [None] * (len(node.input) - 1)
    if params is None or any(step != 1 for step in params[3]):
        return [_slice_by_scatter(ctx, node, gy, params)] + none
    starts, ends, axes, steps = params
    pads = [0] * (2 * shape.rank)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= shape.rank
        if shape.batched[axis]:
            if _whole_axis(start, end, step):
                continue
            raise NotImplementedError("Slice along the batch axis")
        size = shape.dims[axis]
        begin = min(max(start + size if start < 0 else start, 0), size)
        stop = min(max(end + size if end < 0 else end, 0), size)
        pads[axis] = begin
        pads[shape.rank + axis] = size - max(stop, begin)
    return [ctx.b.op("Pad", [gy, ctx.b.const(pads, "pads")])] + none


def _slice_by_scatter(ctx: VjpContext, node: onnx.NodeProto, gy: str,
                      params: SliceParams | None) -> str:
    """Run the same Slice (same bound tensors) on a grid of positions within one sample,
    then scatter the gradient back to the positions it picked.

    This covers strides, negative steps and bounds computed from shapes (Swin's
    patch merging and padding crops, chunks). Precondition: the batch, if any, is
    axis 0 and is not sliced.
    """
    b = ctx.b
    x = node.input[0]
    shape = ctx.shape(x)
    if any(shape.batched[1:]):
        raise NotImplementedError("Slice with the batch on another axis than 0")
    batched = shape.rank > 0 and shape.batched[0]
    if batched:
        if params is None:
            axes_name = node.input[3] if len(node.input) > 3 else ""
            axes = ctx.const(axes_name) if axes_name else None
            if axes is None or any(int(v) % shape.rank == 0 for v in axes.reshape(-1)):
                raise NotImplementedError("Slice with computed bounds that may cut the batch")
        elif any(axis % shape.rank == 0 and not _whole_axis(start, end, step)
                 for start, end, axis, step in zip(*params)):
            raise NotImplementedError("Slice along the batch axis")
    grid_dims = [1, *shape.dims[1:]] if batched else list(shape.dims)
    count = int(np.prod(grid_dims))
    positions = b.op("Range", [b.const(np.asarray(0, np.int64), "zero_i"),
                               b.const(np.asarray(count, np.int64), "count"),
                               b.const(np.asarray(1, np.int64), "one_i")])
    grid = b.op("Reshape", [positions, b.const(grid_dims, "grid")])
    picked = b.op("Slice", [grid, *node.input[1:]])
    flat = b.const([0, -1] if batched else [-1], "flat")
    indices = b.op("Reshape", [b.op("Expand", [picked, b.op("Shape", [gy])]), flat])
    zeros = b.op("Reshape", [ctx.zeros_like(x), flat])
    scattered = b.op("ScatterElements", [zeros, indices, b.op("Reshape", [gy, flat])],
                     axis=1 if batched else 0)
    return ctx.reshape_like(scattered, x)


@rule("Pad")
def pad(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Crop the padded border off the gradient (constant mode, non-negative pads)."""
    (gy,) = g
    assert gy is not None
    a = attrs(node)
    mode = string_attr(node, "mode", "constant")
    if mode != "constant":
        raise NotImplementedError(f"Pad mode {mode!r}")
    if "pads" in a:
        pads = [int(p) for p in a["pads"]]
        axes = None
    else:
        value = ctx.const(node.input[1])
        if value is None:
            return [_unpad_computed(ctx, node, gy)] + [None] * (len(node.input) - 1)
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


def _unpad_computed(ctx: VjpContext, node: onnx.NodeProto, gy: str) -> str:
    """Undo pads computed in the graph (Swin pads to a multiple of its window): crop
    what the positive pads added, then pad zeros back where negative pads cropped."""
    b = ctx.b
    pads = node.input[1]
    axes_name = node.input[3] if len(node.input) > 3 else ""
    zero = b.const(np.asarray(0, np.int64), "zero_i")
    added = b.op("Max", [pads, zero])
    removed = b.op("Max", [b.op("Neg", [pads]), zero])
    count = ctx.shape(pads).dims[0] // 2
    begins = b.op("Slice", [added, b.const([0], "starts"), b.const([count], "ends")])
    end_pads = b.op("Slice", [added, b.const([count], "starts"), b.const([2 * count], "ends")])
    sizes = b.op("Shape", [gy])
    if axes_name:
        sizes = b.op("Gather", [sizes, axes_name], axis=0)
    axes = [axes_name] if axes_name else []
    cropped = b.op("Slice", [gy, begins, b.op("Sub", [sizes, end_pads]), *axes])
    return b.op("Pad", [cropped, removed, *([""] + axes if axes else [])])


@rule("Gather")
def gather(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """A constant scalar index (ViT's class token, q/k/v): pad the gradient around the
    picked slot. Other indices: scatter-add it into zeros at the gathered positions."""
    (gy,) = g
    assert gy is not None
    data, indices = node.input
    shape = ctx.shape(data)
    axis = int(attrs(node).get("axis", 0)) % shape.rank
    if shape.batched[axis]:
        raise NotImplementedError("Gather along the batch axis")
    size = shape.dims[axis]
    value = ctx.const(indices)
    if value is not None and value.ndim == 0:
        kept = ctx.b.op("Unsqueeze", [gy, ctx.b.const([axis], "axes")])
        pads = [0] * (2 * shape.rank)
        pads[axis] = int(value) % size
        pads[shape.rank + axis] = size - 1 - pads[axis]
        return [ctx.b.op("Pad", [kept, ctx.b.const(pads, "pads")]), None]
    return [_gather_by_scatter(ctx, node, gy, axis, value), None]


def _gather_by_scatter(ctx: VjpContext, node: onnx.NodeProto, gy: str, axis: int,
                       value: np.ndarray | None) -> str:
    b = ctx.b
    data, indices = node.input
    shape, index_shape = ctx.shape(data), ctx.shape(indices)
    if any(index_shape.batched):
        raise NotImplementedError("Gather with per-sample indices")
    count = int(np.prod(index_shape.dims))
    # gy is data[:axis] + indices' shape + data[axis+1:]: flatten the index axes into one.
    trailing = [-1 if grows else size
                for size, grows in zip(shape.dims[axis + 1:], shape.batched[axis + 1:])]
    if trailing.count(-1) > 1:
        raise NotImplementedError("Gather with several batched axes")
    flat_grad = b.op("Reshape", [gy, b.const([0] * axis + [count] + trailing, "shape")])
    repeated = True
    if value is not None:
        flat_index = value.reshape(-1).astype(np.int64) % shape.dims[axis]
        repeated = len(np.unique(flat_index)) < count
        index = b.const(flat_index, "gather_indices")
    else:
        index = b.op("Reshape", [indices, b.const([-1], "flat")])
    if repeated and ctx.opset < 16:
        raise NotImplementedError("Gather with repeated indices before opset 16")
    column = [1] * shape.rank
    column[axis] = count
    index = b.op("Expand", [b.op("Reshape", [index, b.const(column, "shape")]),
                            b.op("Shape", [flat_grad])])
    inputs = [ctx.zeros_like(data), index, flat_grad]
    if repeated:
        return b.op("ScatterElements", inputs, axis=axis, reduction="add")
    return b.op("ScatterElements", inputs, axis=axis)


@rule("GatherND")
def gather_nd(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Scatter-add the gradient back with the same indices (ScatterND, opset 16)."""
    (gy,) = g
    assert gy is not None
    data, indices = node.input
    shape = ctx.shape(data)
    depth = ctx.shape(indices).dims[-1]
    if int(attrs(node).get("batch_dims", 0)):
        raise NotImplementedError("GatherND with batch_dims")
    if any(shape.batched[:depth]) or any(ctx.shape(indices).batched):
        raise NotImplementedError("GatherND that indexes the batch axis")
    if ctx.opset < 16:
        raise NotImplementedError("GatherND before opset 16 (no ScatterND reduction)")
    return [ctx.b.op("ScatterND", [ctx.zeros_like(data), indices, gy], reduction="add"), None]
