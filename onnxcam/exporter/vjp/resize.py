"""The Resize rule: the transposed interpolation, one small matrix per resized axis.

Nearest, linear and cubic resizing are separable: along each axis, output o is a
fixed weighted sum of inputs, y = M x with M of shape [out, in]. The gradient is
M^T dY. Rather than re-deriving M for every mode, coordinate transform and rounding
rule, the rule lets the same Resize (same attributes) act on an identity matrix,
which yields M^T exactly as the forward computes it; onnxruntime folds that
constant when the session starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext, string_attr
from onnxcam.graph import attrs

Grads = list[str | None]

SEPARABLE_MODES = ("nearest", "linear", "cubic")


def _resize_inputs(ctx: VjpContext, node: onnx.NodeProto) -> tuple[np.ndarray | None, bool]:
    """The per-axis scales (full rank) if given as a constant, and whether sizes drive it."""
    names = list(node.input) + ["", "", ""]
    scales_name = names[1] if ctx.opset < 11 else names[2]
    sizes_name = "" if ctx.opset < 11 else names[3]
    if sizes_name:
        return None, True
    scales = ctx.const(scales_name) if scales_name else None
    if scales is None or scales.size == 0:
        raise NotImplementedError("Resize with computed scales")
    values = scales.astype(np.float32).reshape(-1)
    rank = ctx.shape(node.input[0]).rank
    axes = attrs(node).get("axes")
    if axes is None:
        return values, False
    full = np.ones(rank, np.float32)
    for axis, value in zip(axes, values):
        full[int(axis) % rank] = value
    return full, False


@rule("Resize")
def resize(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """dX = M^T dY along each resized axis (see the module docstring).

    Preconditions: constant scales, or sizes (computed or not: the probed output
    shape stands for them); a separable mode; no tf_crop_and_resize (its roi);
    keep_aspect_ratio_policy stretch; the batch axis is not resized.
    """
    (gy,) = g
    assert gy is not None
    a = attrs(node)
    mode = string_attr(node, "mode", "nearest")
    if mode not in SEPARABLE_MODES:
        raise NotImplementedError(f"Resize mode {mode!r}")
    if string_attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise NotImplementedError("Resize with tf_crop_and_resize")
    if string_attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize that keeps the aspect ratio")
    x, y = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    scales, by_sizes = _resize_inputs(ctx, node)
    axis_attrs = {k: v for k, v in a.items() if k not in ("axes", "keep_aspect_ratio_policy")}
    grad = gy
    for axis in range(in_shape.rank):
        n_in, n_out = in_shape.dims[axis], out_shape.dims[axis]
        resized = n_in != n_out if by_sizes else scales is not None and scales[axis] != 1.0
        if not resized:
            continue
        if in_shape.batched[axis]:
            raise NotImplementedError("Resize along the batch axis")
        scale = None if scales is None else float(scales[axis])
        transposed = _transposed_matrix(ctx, n_in, n_out, scale, axis_attrs)
        grad = _contract(ctx, grad, transposed, axis, in_shape.rank)
    return [grad] + [None] * (len(node.input) - 1)


def _transposed_matrix(ctx: VjpContext, n_in: int, n_out: int, scale: float | None,
                       node_attrs: dict[str, Any]) -> str:
    """M^T [n_in, n_out]: row i holds the weights input i has in each output."""
    b = ctx.b
    identity = b.const(np.eye(n_in, dtype=np.float32), "resize_identity")
    if ctx.opset < 11:
        assert scale is not None  # opset 10 has no sizes
        return b.op("Resize", [identity, b.const(np.asarray([1.0, scale], np.float32), "scales")],
                    **node_attrs)
    roi = b.const(np.zeros(0, np.float32), "roi")
    if scale is not None:
        inputs = [identity, roi, b.const(np.asarray([1.0, scale], np.float32), "scales")]
    else:
        inputs = [identity, roi, b.const(np.zeros(0, np.float32), "scales"),
                  b.const([n_in, n_out], "sizes")]
    return b.op("Resize", inputs, **node_attrs)


def _contract(ctx: VjpContext, grad: str, transposed: str, axis: int, rank: int) -> str:
    """sum_o M^T[i, o] grad[..., o, ...] along ``axis``, by MatMul."""
    b = ctx.b
    if axis == rank - 2:
        return b.op("MatMul", [transposed, grad])
    perm = list(range(rank))
    if axis != rank - 1:
        perm[axis], perm[-1] = perm[-1], perm[axis]
        grad = b.op("Transpose", [grad], perm=perm)
    out = b.op("MatMul", [grad, b.op("Transpose", [transposed], perm=[1, 0])])
    return out if axis == rank - 1 else b.op("Transpose", [out], perm=perm)
