"""Rules for broadcasting arithmetic and pointwise activations."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcam.exporter.vjp import rule
from onnxcam.exporter.vjp.context import VjpContext
from onnxcam.graph import attrs

Grads = list[str | None]


@rule("Add", "Sub")
def add_sub(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    y = node.output[0]
    a, b = node.input
    ga = ctx.unbroadcast(gy, y, a) if ctx.needs(a) else None
    if not ctx.needs(b):
        return [ga, None]
    gb = gy if node.op_type == "Add" else ctx.b.op("Neg", [gy])
    return [ga, ctx.unbroadcast(gb, y, b)]


@rule("Mul")
def mul(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    a, b = node.input
    y = node.output[0]
    return [
        ctx.unbroadcast(ctx.b.op("Mul", [gy, b]), y, a) if ctx.needs(a) else None,
        ctx.unbroadcast(ctx.b.op("Mul", [gy, a]), y, b) if ctx.needs(b) else None,
    ]


@rule("Div")
def div(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    a, b = node.input
    y = node.output[0]
    ga = ctx.b.op("Div", [gy, b])
    if not ctx.needs(b):
        return [ctx.unbroadcast(ga, y, a), None]
    # d(a/b)/db = -(dY/b) * y
    gb = ctx.b.op("Neg", [ctx.b.op("Mul", [ga, y])])
    return [ctx.unbroadcast(ga, y, a) if ctx.needs(a) else None, ctx.unbroadcast(gb, y, b)]


@rule("Neg")
def neg(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    assert g[0] is not None
    return [ctx.b.op("Neg", [g[0]])]


@rule("Sqrt")
def sqrt(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    # d sqrt(x)/dx = 0.5 / y: read the output, so no second Sqrt (infinite at x = 0).
    (gy,) = g
    assert gy is not None
    half = ctx.b.op("Div", [ctx.scalar(0.5), node.output[0]])
    return [ctx.b.op("Mul", [gy, half])]


@rule("Exp")
def exp(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    return [ctx.b.op("Mul", [gy, node.output[0]])]


@rule("Log")
def log(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    return [ctx.b.op("Div", [gy, node.input[0]])]


@rule("Reciprocal")
def reciprocal(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    # d(1/x)/dx = -y^2
    (gy,) = g
    assert gy is not None
    y = node.output[0]
    return [ctx.b.op("Neg", [ctx.b.op("Mul", [gy, ctx.b.op("Mul", [y, y])])])]


@rule("Abs")
def abs_(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    return [ctx.b.op("Mul", [gy, ctx.b.op("Sign", [node.input[0]])])]


@rule("Pow")
def pow_(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """y = x^p. A constant exponent is folded (p * x^(p-1), or 2x for squares); a
    computed one gets y * log(x), defined for positive bases only."""
    (gy,) = g
    assert gy is not None
    base, exponent = node.input
    y = node.output[0]
    grads: Grads = [None, None]
    if ctx.needs(base):
        value = ctx.const(exponent)
        if value is not None:
            p = value.astype(np.float32)
            if p.size == 1 and float(p.reshape(-1)[0]) == 2.0:
                slope = ctx.b.op("Mul", [base, ctx.scalar(2.0)])
            else:
                power = ctx.b.op("Pow", [base, ctx.b.const(p - np.float32(1), "pow_exponent")])
                slope = ctx.b.op("Mul", [power, ctx.b.const(p, "pow_factor")])
        else:
            as_float = ctx.b.op("Cast", [exponent], to=onnx.TensorProto.FLOAT)
            power = ctx.b.op("Pow", [base, ctx.b.op("Sub", [as_float, ctx.scalar(1.0)])])
            slope = ctx.b.op("Mul", [power, as_float])
        grads[0] = ctx.unbroadcast(ctx.b.op("Mul", [gy, slope]), y, base)
    if ctx.needs(exponent):
        slope = ctx.b.op("Mul", [y, ctx.b.op("Log", [base])])
        grads[1] = ctx.unbroadcast(ctx.b.op("Mul", [gy, slope]), y, exponent)
    return grads


@rule("Where")
def where(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """Each branch gets the gradient where it was picked; the condition gets none."""
    (gy,) = g
    assert gy is not None
    condition, picked, other = node.input
    y = node.output[0]
    grads: Grads = [None, None, None]
    if ctx.needs(picked):
        grads[1] = ctx.unbroadcast(ctx.mask(condition, gy), y, picked)
    if ctx.needs(other):
        grads[2] = ctx.unbroadcast(ctx.b.op("Where", [condition, ctx.zero(), gy]), y, other)
    return grads


@rule("Relu")
def relu(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    if ctx.guided:
        # Guided backprop: pass only positive gradients, and only where the input was positive.
        gy = ctx.b.op("Relu", [gy])
    # x > 0 exactly where relu(x) > 0. Reading the output leaves the producer's
    # output to the ReLU alone, so onnxruntime can still fuse Conv (+ Add) + ReLU.
    positive_of = node.output[0] if ctx.whole_body else node.input[0]
    return [ctx.mask(ctx.b.op("Greater", [positive_of, ctx.zero()]), gy)]


@rule("LeakyRelu")
def leaky_relu(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    alpha = float(attrs(node).get("alpha", 0.01))
    positive = ctx.b.op("Greater", [node.input[0], ctx.zero()])
    scaled = ctx.b.op("Mul", [gy, ctx.scalar(alpha)])
    return [ctx.b.op("Where", [positive, gy, scaled])]


@rule("Clip")
def clip(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    bounds = list(node.input[1:]) + ["", ""]
    conditions = []
    if bounds[0]:
        conditions.append(ctx.b.op("Greater", [x, bounds[0]]))
    if bounds[1]:
        conditions.append(ctx.b.op("Less", [x, bounds[1]]))
    # Opset < 11 keeps the bounds as attributes.
    a = attrs(node)
    if "min" in a:
        conditions.append(ctx.b.op("Greater", [x, ctx.scalar(float(a["min"]))]))
    if "max" in a:
        conditions.append(ctx.b.op("Less", [x, ctx.scalar(float(a["max"]))]))
    if not conditions:
        return [gy] + [None] * (len(node.input) - 1)
    inside = conditions[0]
    for extra in conditions[1:]:
        inside = ctx.b.op("And", [inside, extra])
    return [ctx.mask(inside, gy)] + [None] * (len(node.input) - 1)


def logistic_slope(ctx: VjpContext, x: str, scale: float) -> str:
    """e / (1 + e)^2 with e = exp(-scale |x|): sigmoid's derivative at scale x, to
    float32's relative precision however far x lies in a tail. Read from the output,
    y (1 - y) is 0 once y rounds to 1 (x past 17), and onnxruntime's Sigmoid itself is
    17% off at -15 and 0 at -20, so neither the output nor Sigmoid(-x) will do."""
    b = ctx.b
    e = b.op("Exp", [b.op("Mul", [b.op("Abs", [x]), ctx.scalar(-scale)])])
    one_plus = b.op("Add", [e, ctx.scalar(1.0)])
    return b.op("Div", [e, b.op("Mul", [one_plus, one_plus])])


@rule("Sigmoid")
def sigmoid(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    return [ctx.b.op("Mul", [gy, logistic_slope(ctx, node.input[0], 1.0)])]


@rule("Tanh")
def tanh(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """1 - y^2 = 4 sigmoid'(2x), kept precise where y rounds to +-1 (x past 9)."""
    (gy,) = g
    assert gy is not None
    slope = ctx.b.op("Mul", [logistic_slope(ctx, node.input[0], 2.0), ctx.scalar(4.0)])
    return [ctx.b.op("Mul", [gy, slope])]


@rule("HardSigmoid")
def hard_sigmoid(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    a = attrs(node)
    alpha = float(a.get("alpha", 0.2))
    beta = float(a.get("beta", 0.5))
    pre = ctx.b.op("Add", [ctx.b.op("Mul", [node.input[0], ctx.scalar(alpha)]), ctx.scalar(beta)])
    inside = ctx.b.op(
        "And",
        [ctx.b.op("Greater", [pre, ctx.zero()]), ctx.b.op("Less", [pre, ctx.scalar(1.0)])],
    )
    return [ctx.mask(inside, ctx.b.op("Mul", [gy, ctx.scalar(alpha)]))]


@rule("HardSwish")
def hard_swish(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    x = node.input[0]
    # y = x * clip(x/6 + 1/2, 0, 1): slope (2x+3)/6 inside (-3, 3), 1 above, 0 below.
    inner = ctx.b.op(
        "Add", [ctx.b.op("Mul", [x, ctx.scalar(1.0 / 3.0)]), ctx.scalar(0.5)]
    )
    above = ctx.b.op("Where", [ctx.b.op("Less", [x, ctx.scalar(3.0)]), inner, ctx.scalar(1.0)])
    slope = ctx.b.op("Where", [ctx.b.op("Greater", [x, ctx.scalar(-3.0)]), above, ctx.zero()])
    return [ctx.b.op("Mul", [gy, slope])]


@rule("Softmax")
def softmax(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    y = node.output[0]
    axis = int(attrs(node).get("axis", -1))
    if ctx.opset < 13:
        raise NotImplementedError("Softmax before opset 13 flattens its input")
    inner = ctx.reduce("ReduceSum", ctx.b.op("Mul", [gy, y]), [axis], keepdims=True)
    return [ctx.b.op("Mul", [y, ctx.b.op("Sub", [gy, inner])])]


@rule("Identity", "Dropout")
def identity(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    return [g[0]] + [None] * (len(node.input) - 1)


@rule("Cast")
def cast(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    (gy,) = g
    assert gy is not None
    # Gradients stay float32; a cast to an integer type has no gradient at all.
    if int(attrs(node)["to"]) not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.FLOAT16):
        raise NotImplementedError("Cast to a non-float type is not differentiable")
    return [gy]


@rule("CastLike")
def cast_like(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """A cast to the second input's type, which gets no gradient (only its type is read)."""
    (gy,) = g
    assert gy is not None
    like = ctx.const(node.input[1])
    if like is not None and like.dtype.kind != "f":
        raise NotImplementedError("CastLike to a non-float type is not differentiable")
    return [gy, None]


@rule("Max", "Min")
def max_min(ctx: VjpContext, node: onnx.NodeProto, g: Grads) -> Grads:
    """The picked input gets the gradient; on a tie the first one does, as in TF."""
    (gy,) = g
    assert gy is not None
    y = node.output[0]
    grads: Grads = []
    taken: str | None = None
    for x in node.input:
        picked = ctx.b.op("Equal", [x, y])
        first = picked if taken is None else ctx.b.op("And", [picked, ctx.b.op("Not", [taken])])
        taken = picked if taken is None else ctx.b.op("Or", [taken, picked])
        grads.append(ctx.unbroadcast(ctx.mask(first, gy), y, x) if ctx.needs(x) else None)
    return grads
