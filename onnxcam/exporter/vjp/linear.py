"""Rules for the ops that carry weights or contract: Conv, ConvTranspose, Gemm, MatMul,
Einsum, BatchNormalization.

Conv, ConvTranspose, Gemm and BatchNormalization treat their weights as constants: only the data
input gets a gradient. MatMul and Einsum differentiate both operands (attention).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.graph import attrs

Grads = list[str | None]


def explicit_pads(
    node_attrs: dict[str, Any],
    in_sizes: tuple[int, ...],
    out_sizes: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: list[int],
    dilations: list[int],
) -> list[int]:
    """Resolve ``auto_pad`` into explicit begin/end pads (ONNX order: all begins, then ends)."""
    auto_pad = node_attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        pads = node_attrs.get("pads")
        return [int(p) for p in pads] if pads else [0] * (2 * n)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for i in range(n):
        total = max((out_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                    - in_sizes[i], 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


@rule("Conv")
def conv(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """dX = ConvTranspose(dY, W): the same geometry run backwards, grouped convs included."""
    (gy,) = g
    assert gy is not None
    x, w = node.input[0], node.input[1]
    a = attrs(node)
    x_dims = ctx.shape(x).dims
    y_dims = ctx.shape(node.output[0]).dims
    kernel = ctx.shape(w).dims[2:]
    n = len(kernel)
    strides = [int(s) for s in a.get("strides", [1] * n)]
    dilations = [int(d) for d in a.get("dilations", [1] * n)]
    pads = explicit_pads(a, x_dims[2:], y_dims[2:], kernel, strides, dilations)
    covered = [
        strides[i] * (y_dims[2 + i] - 1) + (kernel[i] - 1) * dilations[i] + 1
        - pads[i] - pads[n + i]
        for i in range(n)
    ]
    output_padding = [x_dims[2 + i] - covered[i] for i in range(n)]
    if any(p < 0 for p in output_padding):
        raise NotImplementedError("Conv geometry could not be inverted")
    group = int(a.get("group", 1))
    flipped = flipped_conv(ctx, w, group, strides, dilations, pads) if ctx.whole_body else None
    if flipped is not None:
        return [flipped(gy)] + [None] * (len(node.input) - 1)
    gx = ctx.b.op(
        "ConvTranspose",
        [gy, w],
        strides=strides,
        dilations=dilations,
        pads=pads,
        group=int(a.get("group", 1)),
        output_padding=output_padding,
    )
    return [gx] + [None] * (len(node.input) - 1)


@rule("ConvTranspose")
def conv_transpose(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """dX = Conv(dY, W): the adjoint of a transposed conv is the conv of the same
    geometry (W [C_in, C_out / group, k...] reads as a conv's [M, C / group, k...]).

    Input i spreads into outputs i * stride + k * dilation - pad_begin, so the conv
    reads dY at those places: stride, dilation and the begin pads as they are; the end
    pads are what makes it return exactly the input's size. Pads derived from
    ``output_shape`` or SAME padding are refused unless the output needs none.
    """
    (gy,) = g
    assert gy is not None
    x, w = node.input[0], node.input[1]
    a = attrs(node)
    in_sizes = ctx.shape(x).dims[2:]
    out_sizes = ctx.shape(node.output[0]).dims[2:]
    kernel = ctx.shape(w).dims[2:]
    n = len(kernel)
    strides = [int(s) for s in a.get("strides", [1] * n)]
    dilations = [int(d) for d in a.get("dilations", [1] * n)]
    extra = [int(p) for p in a.get("output_padding", [0] * n)]
    reach = [(kernel[i] - 1) * dilations[i] + 1 for i in range(n)]
    full = [strides[i] * (in_sizes[i] - 1) + extra[i] + reach[i] for i in range(n)]
    pads = _transposed_pads(a, n, [full[i] - out_sizes[i] for i in range(n)])
    ends = [max(0, pads[n + i] - extra[i]) for i in range(n)]
    read = [(out_sizes[i] + pads[i] + ends[i] - reach[i]) // strides[i] + 1 for i in range(n)]
    if read != list(in_sizes):
        raise NotImplementedError("ConvTranspose geometry could not be inverted")
    gx = ctx.b.op("Conv", [gy, w], strides=strides, dilations=dilations,
                  pads=pads[:n] + ends, group=int(a.get("group", 1)))
    return [gx] + [None] * (len(node.input) - 1)


def _transposed_pads(node_attrs: dict[str, Any], n: int, total: list[int]) -> list[int]:
    """A ConvTranspose's begin and end pads; ``total`` is how much it crops in all."""
    auto_pad = node_attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("NOTSET", "") and "output_shape" not in node_attrs:
        pads = [int(p) for p in node_attrs.get("pads", [0] * (2 * n))]
    elif all(t == 0 for t in total):
        pads = [0] * (2 * n)
    else:
        # onnxruntime and the spec have split such pads differently across versions.
        raise NotImplementedError("ConvTranspose with output_shape or SAME padding")
    if [pads[i] + pads[n + i] for i in range(n)] != total:
        raise NotImplementedError("ConvTranspose pads that do not match its output size")
    return pads


def flipped_conv(
    ctx: VjpContext, w: str, group: int, strides: list[int], dilations: list[int],
    pads: list[int],
) -> Any:
    """For a stride-1 Conv with constant weights: its input gradient as a Conv of the
    output gradient with the kernel flipped in space and transposed per group, which
    onnxruntime runs faster than ConvTranspose. None where that does not apply."""
    weights = ctx.const(w)
    n = len(dilations)
    if weights is None or any(s != 1 for s in strides):
        return None
    kernel = weights.shape[2:]
    reach = [dilations[i] * (kernel[i] - 1) for i in range(n)]
    new_pads = [reach[i % n] - p for i, p in enumerate(pads)]
    if any(p < 0 for p in new_pads):
        return None
    out_channels, in_per_group = weights.shape[:2]
    grouped = weights.reshape(group, out_channels // group, in_per_group, *kernel)
    transposed = grouped.swapaxes(1, 2).reshape(group * in_per_group, out_channels // group,
                                                *kernel)
    flipped = transposed[(slice(None), slice(None), *[slice(None, None, -1)] * n)]
    name = ctx.b.const(np.ascontiguousarray(flipped), "flipped_kernel")
    return lambda gy: ctx.b.op("Conv", [gy, name], dilations=dilations, pads=new_pads,
                               group=group)


@rule("Gemm")
def gemm(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Y = alpha * A' B' + beta * C, where A' = A or A^T as transA says (likewise B)."""
    (gy,) = g
    assert gy is not None
    a = attrs(node)
    alpha = float(a.get("alpha", 1.0))
    trans_a = int(a.get("transA", 0))
    trans_b = int(a.get("transB", 0))
    in_b = node.input[1]
    if trans_a:
        # dA = (alpha * dY B'^T)^T = alpha * B' dY^T
        ga = ctx.b.op("Gemm", [in_b, gy], alpha=alpha, transA=trans_b, transB=1)
    else:
        ga = ctx.b.op("Gemm", [gy, in_b], alpha=alpha, transB=1 - trans_b)
    return [ga] + [None] * (len(node.input) - 1)


def _swap_last_two(ctx: VjpContext, name: str) -> str:
    rank = ctx.shape(name).rank
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return ctx.b.op("Transpose", [name], perm=perm)


@rule("MatMul")
def matmul(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    in_a, in_b = node.input
    y = node.output[0]
    if ctx.shape(in_a).rank < 2 or ctx.shape(in_b).rank < 2:
        raise NotImplementedError("MatMul with a vector operand")
    ga = gb = None
    if ctx.needs(in_a):
        ga = ctx.unbroadcast(ctx.b.op("MatMul", [gy, _swap_last_two(ctx, in_b)]), y, in_a)
    if ctx.needs(in_b):
        gb = ctx.unbroadcast(ctx.b.op("MatMul", [_swap_last_two(ctx, in_a), gy]), y, in_b)
    return [ga, gb]


@rule("BatchNormalization")
def batch_norm(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Inference-mode BN is a per-channel scale: dX = dY * gamma / sqrt(var + eps)."""
    (gy,) = g[:1]
    assert gy is not None
    a = attrs(node)
    if int(a.get("training_mode", 0)):
        raise NotImplementedError("BatchNormalization in training mode")
    eps = float(a.get("epsilon", 1e-5))
    x, scale, _bias, _mean, var = node.input[:5]
    trailing = [1] * (ctx.shape(x).rank - 2)
    scale_value, var_value = ctx.const(scale), ctx.const(var)
    if scale_value is not None and var_value is not None:
        factor = (scale_value / np.sqrt(var_value.astype(np.float64) + eps)).astype(np.float32)
        factor_name = ctx.b.const(factor.reshape([-1] + trailing), "bn_factor")
    else:
        std = ctx.b.op("Sqrt", [ctx.b.op("Add", [var, ctx.scalar(eps)])])
        flat = ctx.b.op("Div", [scale, std])
        factor_name = ctx.b.op("Reshape", [flat, ctx.b.const([-1] + trailing, "shape")])
    return [ctx.b.op("Mul", [gy, factor_name])] + [None] * (len(node.input) - 1)


def _einsum_terms(ctx: VjpContext, node: onnx.NodeProto) -> tuple[list[str], str]:
    """The equation's input terms and output term, with '...' spelled out as letters
    (aligned from the right, as the operands' ranks say) and an implicit output made
    explicit (letters seen once, sorted)."""
    raw = attrs(node)["equation"]
    equation = (raw.decode() if isinstance(raw, bytes) else str(raw)).replace(" ", "")
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    used = set(equation) - {".", ",", "-", ">"}
    spare = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
    widths = [ctx.shape(name).rank - len(term.replace("...", ""))
              for term, name in zip(terms, node.input)]
    ellipsis = "".join(spare[: max(widths, default=0)])
    terms = [term.replace("...", ellipsis[len(ellipsis) - width:] if width else "")
             for term, width in zip(terms, widths)]
    if arrow:
        output = right.replace("...", ellipsis)
    else:
        letters = "".join(terms)
        output = ellipsis + "".join(sorted(c for c in set(letters) - set(ellipsis)
                                           if letters.count(c) == 1))
    return terms, output


@rule("Einsum")
def einsum(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """dA = einsum('out,B->A', dY, B): each operand's gradient contracts the output
    gradient with the other operand. Letters only A has (summed away in the forward)
    come back by broadcasting. One or two operands; no diagonals ('ii')."""
    (gy,) = g
    assert gy is not None
    if len(node.input) > 2:
        raise NotImplementedError("Einsum with more than two operands")
    terms, output = _einsum_terms(ctx, node)
    sizes: dict[str, int] = {}
    for term, name in zip(terms, node.input):
        if len(set(term)) != len(term):
            raise NotImplementedError("Einsum with a repeated index (a diagonal)")
        for letter, size in zip(term, ctx.shape(name).dims):
            if sizes.setdefault(letter, size) != size:
                raise NotImplementedError("Einsum that broadcasts an index")
    grads: Grads = []
    for k, (term, name) in enumerate(zip(terms, node.input)):
        if not ctx.needs(name):
            grads.append(None)
            continue
        others = [(t, n) for j, (t, n) in enumerate(zip(terms, node.input)) if j != k]
        seen = set(output).union(*(set(t) for t, _ in others))
        kept = "".join(c for c in term if c in seen)
        equation = ",".join([output, *(t for t, _ in others)]) + "->" + kept
        grad = ctx.b.op("Einsum", [gy, *(n for _, n in others)], equation=equation)
        if kept != term:
            lost = [i for i, c in enumerate(term) if c not in seen]
            grad = ctx.b.op("Unsqueeze", [grad, ctx.b.const(lost, "axes")])
            grad = ctx.b.op("Expand", [grad, ctx.b.op("Shape", [name])])
        grads.append(grad)
    return grads
