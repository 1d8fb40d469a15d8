"""A copy of part of a graph, run in float64: the tail of the head that fd perturbs.

onnxruntime's CPU provider has float64 kernels for most ops a classifier's head
holds; the few it lacks (2-D Conv, Erf, Gelu, HardSigmoid, HardSwish, global pools)
are rebuilt from ops that have them. Finite differences in float64 can then take a
step of 1e-6 and lose nothing to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import factorial, pi, sqrt

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.graph import GraphBuilder, attrs, skeleton

FLOAT, DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
OTHER_FLOATS = frozenset({DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

# Ops onnxruntime's CPU provider runs in float64 (held by
# tests/exporter/test_add_fd_weights.py against the installed onnxruntime). Erf,
# Gelu, Conv, Softplus, Elu, HardSigmoid, HardSwish, GlobalAveragePool, AveragePool,
# InstanceNormalization, LRN and Resize have float32 kernels only.
DOUBLE_OPS = frozenset({
    "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Relu",
    "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "LeakyRelu",
    "Softmax", "LogSoftmax", "Identity", "Dropout", "Flatten", "Transpose", "MaxPool",
    "ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "BatchNormalization",
    "LayerNormalization", "Clip", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Concat",
    "Slice", "Gather", "Pad", "Tile", "Einsum", "Cast", "PRelu", "Split", "Constant",
    "ConstantOfShape", "Where", "Shape", "CastLike", "GatherElements",
})
# Global pools have no float64 kernel, but the reductions they are do.
AS_REDUCTION = {"GlobalAveragePool": "ReduceMean", "GlobalMaxPool": "ReduceMax"}
# Nor have these; in float64 they are built from ops that have: Erf and Gelu from a
# series (``erf64``) whose derivative is within 4e-5 of erf's own, HardSigmoid and
# HardSwish (MobileNetV3's heads) from Clip, and 2-D Conv as im2col and MatMul
# (``conv64``).
EXPANDED = frozenset({"Erf", "Gelu", "HardSigmoid", "HardSwish", "Conv"})
# erf(x) = 2/sqrt(pi) x sum_n (-1)^n x^2n / (n! (2n+1)), on x clipped to +-3.5, where
# 1 - |erf| < 1e-6 and its slope < 6e-6; 40 terms converge there to 1e-9 in float64.
ERF_TERMS = 40
ERF_CLIP = 3.5


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the tensors that shape inference and the initializers name."""
    try:
        graph = onnx.shape_inference.infer_shapes(skeleton(model)).graph
    except Exception:  # noqa: BLE001 - without types the tail just stays in float32
        graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def runs_in_double(nodes: list[onnx.NodeProto], types: Mapping[str, int],
                   shapes: Mapping[str, TensorShape]) -> bool:
    """Whether every tail node that touches a float tensor has a float64 kernel
    (``DOUBLE_OPS``), and every tensor's type is known so the copy can convert it."""
    for node in nodes:
        names = [n for n in [*node.input, *node.output] if n]
        if node.domain not in ("", "ai.onnx") or any(n not in types for n in names):
            return False
        if any(types[n] in OTHER_FLOATS for n in names):
            return False  # a float16 tail would meet float64 tensors half way
        kernel = AS_REDUCTION.get(node.op_type, node.op_type)
        if node.op_type == "Gelu" and attrs(node).get("approximate", "none") != "none":
            return False
        if node.op_type == "Conv" and not conv64_applies(node, shapes):
            return False
        if (kernel not in DOUBLE_OPS | EXPANDED
                and any(types[n] == FLOAT for n in names)):
            return False
    return True


def _takes_double(node: onnx.NodeProto, position: int, opset: int) -> bool:
    """Whether the op's schema lets input ``position`` be float64 (Resize's scales,
    for one, must stay float32)."""
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    formal = schema.inputs[min(position, len(schema.inputs) - 1)]
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    return "tensor(double)" in allowed.get(formal.type_str, [formal.type_str])


def _to_double(node: onnx.NodeProto) -> None:
    """Make the float32 values a node creates itself (Cast, Constant,
    ConstantOfShape) float64, so they meet the float64 tail."""
    for attr in list(node.attribute):
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = DOUBLE
        elif attr.name == "value" and attr.t.data_type == FLOAT:
            value = numpy_helper.to_array(attr.t).astype(np.float64)
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            value = np.asarray(helper.get_attribute_value(attr), np.float64)
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def _as_reduction(outer: GraphBuilder, node: onnx.NodeProto, rank: int,
                  opset: int) -> onnx.NodeProto:
    """A global pool as the Reduce* over every axis after the second that it is."""
    axes = list(range(2, rank))
    reduction = AS_REDUCTION[node.op_type]
    if opset >= 18:
        axes_input = outer.const(axes, "axes")
        return helper.make_node(reduction, [node.input[0], axes_input], node.output, keepdims=1)
    return helper.make_node(reduction, node.input, node.output, axes=axes, keepdims=1)


def _double_const(b: GraphBuilder, value: float | list[float]) -> str:
    """A float64 constant (``GraphBuilder.const`` makes floats float32)."""
    name = b.fresh("c64")
    b.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float64), name))
    return name


def erf64(b: GraphBuilder, x: str) -> str:
    """erf of a float64 tensor from float64 kernels: the Maclaurin series on the
    clipped argument, by Horner's rule in x^2. See ``ERF_TERMS``."""
    clipped = b.op("Clip", [x, _double_const(b, -ERF_CLIP), _double_const(b, ERF_CLIP)])
    square = b.op("Mul", [clipped, clipped])
    terms = [(-1) ** n / (factorial(n) * (2 * n + 1)) for n in range(ERF_TERMS)]
    total = _double_const(b, terms[-1])
    for term in reversed(terms[:-1]):
        total = b.op("Add", [b.op("Mul", [total, square]), _double_const(b, term)])
    return b.op("Mul", [b.op("Mul", [clipped, total]), _double_const(b, 2 / sqrt(pi))])


def conv64_applies(node: onnx.NodeProto, shapes: Mapping[str, TensorShape]) -> bool:
    """Whether ``conv64`` can stand for this Conv: 2-D, explicit pads, known shapes."""
    given = attrs(node)
    known = all(name in shapes for name in (node.input[0], node.input[1], node.output[0]))
    return (known and shapes[node.input[0]].rank == 4
            and given.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID"))


def conv64(b: GraphBuilder, node: onnx.NodeProto, x: str, weight: str, bias: str,
            shapes: Mapping[str, TensorShape]) -> str:
    """A 2-D Conv on float64 tensors, as im2col and one MatMul (float64 MatMul is
    fast; float64 Einsum is not): pad, stack the strided slice of the input each
    kernel tap (i, j) reads, and contract with W group by group.

    Precondition: ``conv64_applies(node, shapes)``.
    """
    given = attrs(node)
    out_channels, per_group, kh, kw = shapes[node.input[1]].dims
    out_h, out_w = shapes[node.output[0]].dims[2:]
    groups = int(given.get("group", 1))
    sh, sw = given.get("strides", [1, 1])
    dh, dw = given.get("dilations", [1, 1])
    top, left, bottom, right = given.get("pads", [0, 0, 0, 0])
    padded = b.op("Pad", [x, b.const([0, 0, top, left, 0, 0, bottom, right], "pads")])
    patches = []
    for i in range(kh):
        for j in range(kw):
            starts = [i * dh, j * dw]
            ends = [i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1]
            patch = b.op("Slice", [padded, b.const(starts, "s"), b.const(ends, "e"),
                                   b.const([2, 3], "axes"), b.const([sh, sw], "steps")])
            patches.append(b.op("Unsqueeze", [patch, b.const([2], "axes")]))
    # [N, C, taps, Ho, Wo] -> [N, G, Cg * taps, Ho * Wo]; W [O, Cg, kh, kw] -> [G, O/G, Cg * taps]
    stacked = patches[0] if len(patches) == 1 else b.op("Concat", patches, axis=2)
    columns = b.op("Reshape", [stacked, b.const([-1, groups, per_group * kh * kw,
                                                 out_h * out_w], "shape")])
    kernel = b.op("Reshape", [weight, b.const([groups, -1, per_group * kh * kw], "shape")])
    out = b.op("Reshape", [b.op("MatMul", [kernel, columns]),
                           b.const([-1, out_channels, out_h, out_w], "shape")])
    if not bias:
        return out
    return b.op("Add", [out, b.op("Reshape", [bias, b.const([1, -1, 1, 1], "shape")])])


def expanded64(b: GraphBuilder, node: onnx.NodeProto, x: str) -> str:
    """One of ``EXPANDED`` on float64 ``x``: Erf; Gelu (exact form, x/2 (1 + erf(x /
    sqrt 2))); HardSigmoid, clip(alpha x + beta, 0, 1); HardSwish, x hardsigmoid(x)
    with alpha 1/6 and beta 1/2."""
    if node.op_type == "Erf":
        return erf64(b, x)
    if node.op_type == "Gelu":
        erf = erf64(b, b.op("Mul", [x, _double_const(b, 0.5 ** 0.5)]))
        half = b.op("Mul", [x, _double_const(b, 0.5)])
        return b.op("Mul", [half, b.op("Add", [erf, _double_const(b, 1.0)])])
    alpha, beta = 1 / 6, 0.5
    if node.op_type == "HardSigmoid":
        alpha, beta = attrs(node).get("alpha", 0.2), attrs(node).get("beta", 0.5)
    line = b.op("Add", [b.op("Mul", [x, _double_const(b, alpha)]), _double_const(b, beta)])
    gate = b.op("Clip", [line, _double_const(b, 0.0), _double_const(b, 1.0)])
    return gate if node.op_type == "HardSigmoid" else b.op("Mul", [x, gate])


def copy_double(outer: GraphBuilder, inner: GraphBuilder, nodes: list[onnx.NodeProto],
                renamed: dict[str, str], types: Mapping[str, int], opset: int,
                shapes: Mapping[str, TensorShape]) -> None:
    """``copy_nodes`` into a Loop body with every float32 tensor made float64.

    Tensors from outside the tail are cast once, in the outer graph; a float64
    tensor meets an input that must be float32 through a Cast back. Precondition:
    ``runs_in_double(nodes, types, shapes)``; the ``renamed`` tensors are float64
    already.
    """
    cast_outside: dict[str, str] = {}

    def as_double(name: str) -> str:
        """A float32 tensor's float64 version: the copy's own, or one Cast outside."""
        if name in renamed:
            return renamed[name]
        if name not in cast_outside:
            cast_outside[name] = outer.op("Cast", [name], to=DOUBLE)
        return cast_outside[name]

    for node in nodes:
        if node.op_type in AS_REDUCTION:
            node = _as_reduction(outer, node, shapes[node.input[0]].rank, opset)
            types = {**types, **{name: onnx.TensorProto.INT64 for name in node.input[1:]}}
        if node.op_type == "Conv":
            bias = as_double(node.input[2]) if len(node.input) > 2 and node.input[2] else ""
            renamed[node.output[0]] = conv64(inner, node, as_double(node.input[0]),
                                              as_double(node.input[1]), bias, shapes)
            continue
        if node.op_type in EXPANDED:
            renamed[node.output[0]] = expanded64(inner, node, as_double(node.input[0]))
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = inner.fresh("head")
        _to_double(copy)
        for i, name in enumerate(node.input):
            if not name or types[name] != FLOAT:
                copy.input[i] = renamed.get(name, name)
            elif _takes_double(node, i, opset):
                copy.input[i] = as_double(name)
            elif name in renamed:
                copy.input[i] = inner.op("Cast", [renamed[name]], to=FLOAT)
        for i, name in enumerate(node.output):
            if name:
                renamed[name] = copy.output[i] = inner.fresh("head_out")
        inner.nodes.append(copy)
