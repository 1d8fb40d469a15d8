"""The RoiAlign rule (Faster R-CNN's box head): the gradient w.r.t. the feature map.

RoiAlign is linear in its features: each output bin is a weighted sum of feature
pixels, with bilinear weights that depend on the boxes only. The rule builds
that weight matrix per image, [R * PH * PW, B * H * W], from the boxes and
multiplies the gradient by it. The boxes and batch indices carry no gradient
(torchvision detaches its proposals).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext, string_attr
from onnxcam.graph import attrs

Grads = list[str | None]


@rule("RoiAlign")
def roi_align(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Mode avg with a fixed ``sampling_ratio`` (> 0), as torchvision's MultiScaleRoIAlign."""
    (gy,) = g
    assert gy is not None
    a = attrs(node)
    if string_attr(node, "mode", "avg") != "avg":
        raise NotImplementedError("RoiAlign mode max")
    samples = int(a.get("sampling_ratio", 0))
    if samples <= 0:
        raise NotImplementedError("RoiAlign with an adaptive sampling_ratio (0)")
    x, rois, batch_indices = node.input
    shape = ctx.shape(x)
    if any(shape.batched[1:]):
        raise NotImplementedError("RoiAlign with the batch on another axis than 0")
    channels, height, width = shape.dims[1:]
    out_h, out_w = int(a.get("output_height", 1)), int(a.get("output_width", 1))
    weights, columns = _bilinear_matrix_entries(ctx, node, height, width, out_h, out_w, samples)
    b = ctx.b
    pixels = b.op("Mul", [b.op("Slice", [b.op("Shape", [x]), b.const([0], "starts"),
                                         b.const([1], "ends")]),
                          b.const([height * width], "plane")])
    rows = b.op("Mul", [b.op("Slice", [b.op("Shape", [rois]), b.const([0], "starts"),
                                       b.const([1], "ends")]),
                        b.const([out_h * out_w], "bins")])
    zeros = b.op("ConstantOfShape", [b.op("Concat", [rows, pixels], axis=0)])
    offsets = b.op("Mul", [b.op("Cast", [batch_indices], to=onnx.TensorProto.INT64),
                           b.const(np.asarray(height * width, np.int64), "plane")])
    columns = b.op("Add", [columns, b.op("Reshape", [offsets, b.const([-1, 1, 1, 1, 1], "col")])])
    flat = b.const([-1, 4 * samples * samples], "flat")
    matrix = b.op("ScatterElements", [zeros, b.op("Reshape", [columns, flat]),
                                      b.op("Reshape", [weights, flat])],
                  axis=1, reduction="add")
    per_channel = b.op("Reshape", [b.op("Transpose", [gy], perm=[1, 0, 2, 3]),
                                   b.const([channels, -1], "rows")])
    planes = b.op("Reshape", [b.op("MatMul", [per_channel, matrix]),
                              b.const([channels, -1, height, width], "planes")])
    return [b.op("Transpose", [planes], perm=[1, 0, 2, 3]), None, None]


def _bilinear_matrix_entries(ctx: VjpContext, node: onnx.NodeProto, height: int, width: int,
                             out_h: int, out_w: int, samples: int) -> tuple[str, str]:
    """Weights and pixel columns, each [R, PH, PW, 2S, 2S]: per bin, per sampling
    point and corner along y and along x, as onnxruntime's RoiAlign samples."""
    b = ctx.b
    a = attrs(node)
    default_mode = "half_pixel" if ctx.opset >= 16 else "output_half_pixel"
    half_pixel = string_attr(node, "coordinate_transformation_mode", default_mode) == "half_pixel"
    scale = float(a.get("spatial_scale", 1.0))
    corners = b.op("Sub", [b.op("Mul", [node.input[1], b.scalar(scale)]),
                           b.scalar(0.5 if half_pixel else 0.0)])
    x0, y0, x1, y1 = b.op_multi("Split", [corners, b.const([1, 1, 1, 1], "split")],
                                n_out=4, axis=1)
    wy, iy = _axis_corners(ctx, y0, y1, height, out_h, samples, half_pixel)
    wx, ix = _axis_corners(ctx, x0, x1, width, out_w, samples, half_pixel)
    along_y = [-1, out_h, 1, 2 * samples, 1]
    along_x = [-1, 1, out_w, 1, 2 * samples]
    weights = b.op("Mul", [b.op("Reshape", [wy, b.const(along_y, "shape")]),
                           b.op("Reshape", [wx, b.const(along_x, "shape")])])
    weights = b.op("Mul", [weights, b.scalar(1.0 / (samples * samples))])
    rows = b.op("Mul", [b.op("Reshape", [iy, b.const(along_y, "shape")]),
                        b.const(np.asarray(width, np.int64), "width")])
    columns = b.op("Add", [rows, b.op("Reshape", [ix, b.const(along_x, "shape")])])
    return weights, columns


def _axis_corners(ctx: VjpContext, start: str, end: str, size: int, bins: int, samples: int,
                  half_pixel: bool) -> tuple[str, str]:
    """Along one axis: [R, bins * samples, 2] weights (zero outside [-1, size]) and
    int64 positions of the low and high neighbour of every sampling point."""
    b = ctx.b
    extent = b.op("Sub", [end, start])
    if not half_pixel:  # the legacy mode makes every box at least one pixel wide
        extent = b.op("Max", [extent, b.scalar(1.0)])
    steps = (np.arange(bins)[:, None] + (np.arange(samples)[None, :] + 0.5) / samples)
    fractions = b.const(steps.reshape(1, -1).astype(np.float32), "fractions")
    point = b.op("Add", [start, b.op("Mul", [fractions, b.op("Div", [extent,
                                                                     b.scalar(float(bins))])])])
    inside = b.op("And", [b.op("GreaterOrEqual", [point, b.scalar(-1.0)]),
                          b.op("LessOrEqual", [point, b.scalar(float(size))])])
    point = b.op("Max", [point, b.scalar(0.0)])
    low = b.op("Floor", [point])
    last = b.scalar(float(size - 1))
    at_edge = b.op("GreaterOrEqual", [low, last])
    low = b.op("Where", [at_edge, last, low])
    high = b.op("Where", [at_edge, last, b.op("Add", [low, b.scalar(1.0)])])
    point = b.op("Where", [at_edge, low, point])
    frac_high = b.op("Sub", [point, low])
    frac_low = b.op("Sub", [b.scalar(1.0), frac_high])
    keep = b.op("Cast", [inside], to=onnx.TensorProto.FLOAT)
    weights = b.op("Mul", [b.op("Concat", [b.op("Unsqueeze", [frac_low, b.const([2], "axes")]),
                                           b.op("Unsqueeze", [frac_high, b.const([2], "axes")])],
                                axis=2),
                           b.op("Unsqueeze", [keep, b.const([2], "axes")])])
    positions = b.op("Concat", [b.op("Unsqueeze", [low, b.const([2], "axes")]),
                                b.op("Unsqueeze", [high, b.const([2], "axes")])], axis=2)
    return weights, b.op("Cast", [positions], to=onnx.TensorProto.INT64)
