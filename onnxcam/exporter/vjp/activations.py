"""Rules for smooth and piecewise activations: Erf, Gelu, Softplus, Elu, Selu, PRelu.

Each slope is written in terms of the forward node's own input (or output, where
that is cheaper and exact), so the backward pass needs no extra forward ops.
"""

from __future__ import annotations

import math

import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext, string_attr
from onnxcam.graph import attrs

Grads = list[str | None]

# Selu's defaults, as the ONNX spec writes them (float32 values).
SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875
# Gelu's tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
GELU_TANH_CUBIC = 0.044715


def _scaled(ctx: VjpContext, gy: str | None, slope: str) -> Grads:
    assert gy is not None
    return [ctx.b.op("Mul", [gy, slope])]


def _gaussian(ctx: VjpContext, x: str, factor: float, spread: float) -> str:
    """factor * exp(-spread * x^2)."""
    square = ctx.b.op("Mul", [x, x])
    bell = ctx.b.op("Exp", [ctx.b.op("Mul", [square, ctx.scalar(-spread)])])
    return ctx.b.op("Mul", [bell, ctx.scalar(factor)])


@rule("Erf")
def erf(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    # d erf(x)/dx = 2/sqrt(pi) exp(-x^2)
    return _scaled(ctx, g[0], _gaussian(ctx, node.input[0], 2.0 / math.sqrt(math.pi), 1.0))


@rule("Gelu")
def gelu(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Opset 20's Gelu, exact (Phi(x) + x phi(x)) or its tanh approximation."""
    x = node.input[0]
    b = ctx.b
    approximate = string_attr(node, "approximate", "none")
    if approximate == "none":
        cdf = b.op("Erf", [b.op("Mul", [x, ctx.scalar(1.0 / math.sqrt(2.0))])])
        cdf = b.op("Mul", [b.op("Add", [cdf, ctx.scalar(1.0)]), ctx.scalar(0.5)])
        pdf = _gaussian(ctx, x, 1.0 / math.sqrt(2.0 * math.pi), 0.5)
        return _scaled(ctx, g[0], b.op("Add", [cdf, b.op("Mul", [x, pdf])]))
    if approximate != "tanh":
        raise NotImplementedError(f"Gelu approximate={approximate!r}")
    c = math.sqrt(2.0 / math.pi)
    square = b.op("Mul", [x, x])
    inner = b.op("Mul", [x, b.op("Add", [ctx.scalar(c), b.op("Mul", [square, ctx.scalar(
        c * GELU_TANH_CUBIC)])])])
    t = b.op("Tanh", [inner])
    # d inner/dx = c (1 + 3 * 0.044715 x^2)
    inner_slope = b.op("Add", [ctx.scalar(c), b.op("Mul", [square, ctx.scalar(
        3.0 * c * GELU_TANH_CUBIC)])])
    tanh_slope = b.op("Sub", [ctx.scalar(1.0), b.op("Mul", [t, t])])
    half_x = b.op("Mul", [x, ctx.scalar(0.5)])
    slope = b.op("Add", [
        b.op("Mul", [b.op("Add", [t, ctx.scalar(1.0)]), ctx.scalar(0.5)]),
        b.op("Mul", [half_x, b.op("Mul", [tanh_slope, inner_slope])]),
    ])
    return _scaled(ctx, g[0], slope)


@rule("Softplus")
def softplus(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    return _scaled(ctx, g[0], ctx.b.op("Sigmoid", [node.input[0]]))


def _exponential_linear(ctx: VjpContext, node: onnx.NodeProto, gy: str | None,
                        scale: float, alpha: float) -> Grads:
    """y = scale x above 0, scale alpha (exp(x) - 1) below: slope scale, or y + scale alpha."""
    x, y = node.input[0], node.output[0]
    below = ctx.b.op("Add", [y, ctx.scalar(scale * alpha)])
    positive = ctx.b.op("Greater", [x, ctx.zero()])
    return _scaled(ctx, gy, ctx.b.op("Where", [positive, ctx.scalar(scale), below]))


@rule("Elu")
def elu(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    return _exponential_linear(ctx, node, g[0], 1.0, float(attrs(node).get("alpha", 1.0)))


@rule("Selu")
def selu(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    a = attrs(node)
    return _exponential_linear(ctx, node, g[0], float(a.get("gamma", SELU_GAMMA)),
                               float(a.get("alpha", SELU_ALPHA)))


@rule("PRelu")
def prelu(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """y = x above 0, slope * x below; the slope broadcasts to x (a constant, usually)."""
    (gy,) = g
    assert gy is not None
    x, slope = node.input
    y = node.output[0]
    positive = ctx.b.op("Greater", [x, ctx.zero()])
    gx = ctx.b.op("Where", [positive, gy, ctx.b.op("Mul", [gy, slope])])
    if not ctx.needs(slope):
        return [gx, None]
    below = ctx.b.op("Where", [positive, ctx.zero(), x])
    return [gx, ctx.unbroadcast(ctx.b.op("Mul", [gy, below]), y, slope)]
