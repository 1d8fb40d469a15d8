"""Every VJP rule against float64 central differences, at float32 tolerance.

Each case is a tiny forward graph whose inputs carry the batch axis first. The
analytic side runs the rules (``exporter.vjp``) on a float32 copy in onnxruntime;
the numeric side runs a float64 copy in ``onnx.reference.ReferenceEvaluator`` on a
batch of perturbed copies of one sample at a time, so the reference is, by
construction, per-sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnxcam.exporter.shapes import run_with_outputs
from onnxcam.exporter.vjp import load_rules
from onnxcam.exporter.vjp.context import TensorShape, VjpContext
from onnxcam.graph import GraphBuilder, forward_reachable, initializer_values
from onnxcam.runtime import cpu_session

OPSET = 17
STEP = 1e-6  # central-difference step in float64
BIG = 2**62  # "to the end" in Slice
RULES = load_rules()  # the live registry, so tests can patch it


# --------------------------------------------------------------------------- harness


@dataclass
class Case:
    nodes: list[onnx.NodeProto]
    inputs: dict[str, np.ndarray]  # graph inputs, batch axis first (float32)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    seeds: tuple[str, ...] = ("y",)  # outputs that receive an upstream gradient
    frozen: tuple[str, ...] = ()  # inputs fed but not differentiated
    opset: int = OPSET


def node(op: str, inputs: list[str], outputs: tuple[str, ...] = ("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, list(outputs), **attrs)


def forward_model(case: Case, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """The forward graph; with DOUBLE, float constants and float Casts become float64."""
    wide = dtype == TensorProto.DOUBLE
    inits = []
    for name, value in case.consts.items():
        if wide and value.dtype == np.float32:
            value = value.astype(np.float64)
        inits.append(numpy_helper.from_array(value, name))
    nodes = []
    for n in case.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        if wide and n.op_type == "Cast":
            for a in copy.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.DOUBLE
        if wide and n.op_type == "GroupNormalization":
            # Its function body computes in stash_type, float32 unless told otherwise.
            del copy.attribute[:]
            copy.attribute.extend(a for a in n.attribute if a.name != "stash_type")
            copy.attribute.append(helper.make_attribute("stash_type", TensorProto.DOUBLE))
        nodes.append(copy)
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info(k, dtype, ["N", *v.shape[1:]])
         for k, v in case.inputs.items()],
        [helper.make_tensor_value_info(s, dtype, None) for s in case.seeds],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)],
                             ir_version=8)


def probe(case: Case) -> dict[str, TensorShape]:
    """Shapes at batch 1, with the axes that grow at batch 2 marked (as the exporter does)."""
    model = forward_model(case)
    names = list(dict.fromkeys(o for n in case.nodes for o in n.output if o))
    runs = [run_with_outputs(model, names, {k: v[:b] for k, v in case.inputs.items()})
            for b in (1, 2)]
    values = {k: (v[:1], v[:2]) for k, v in case.inputs.items()}
    values.update({k: (runs[0][k], runs[1][k]) for k in names})
    values.update({k: (v, v) for k, v in case.consts.items()})
    return {k: TensorShape(tuple(int(d) for d in one.shape),
                           tuple(a != b for a, b in zip(one.shape, two.shape)))
            for k, (one, two) in values.items()}


def gradient_model(case: Case, guided: bool = False,
                   whole_body: bool = False) -> tuple[bytes, list[str]]:
    """Forward graph plus the rules run backwards from ``gy:<seed>`` inputs.

    Returns the serialized model (outputs ``grad:<input>``) and the differentiated inputs.
    """
    shapes = probe(case)
    model = forward_model(case)
    graph = model.graph
    wrt = [k for k in case.inputs if k not in case.frozen]
    needed: set[str] = set()
    for name in wrt:
        needed |= forward_reachable(graph, name)
    b = GraphBuilder(graph, "grad")
    ctx = VjpContext(b, shapes, initializer_values(graph), case.opset, needed, guided,
                     whole_body)
    grads: dict[str, str] = {}
    for seed in case.seeds:
        grads[seed] = f"gy:{seed}"
        graph.input.append(helper.make_tensor_value_info(
            f"gy:{seed}", TensorProto.FLOAT, ["N", *shapes[seed].dims[1:]]))
    for n in reversed(list(graph.node)):
        upstream = [grads.get(o) for o in n.output]
        if all(g is None for g in upstream):
            continue
        result = RULES[n.op_type](ctx, n, upstream)
        assert len(result) == len(n.input), f"{n.op_type} rule returned {len(result)} grads"
        for name, g in zip(n.input, result):
            if g is not None and ctx.needs(name):
                grads[name] = b.op("Add", [grads[name], g]) if name in grads else g
    del graph.output[:]
    for name in wrt:
        b.nodes.append(helper.make_node("Identity", [grads[name]], [f"grad:{name}"]))
        graph.output.append(helper.make_tensor_value_info(
            f"grad:{name}", TensorProto.FLOAT, ["N", *case.inputs[name].shape[1:]]))
    b.commit()
    onnx.checker.check_model(model)
    return model.SerializeToString(), wrt


def analytic(case: Case, gys: dict[str, np.ndarray], guided: bool = False,
             batch: int = 2, whole_body: bool = False) -> dict[str, np.ndarray]:
    model, wrt = gradient_model(case, guided, whole_body)
    feeds = {k: v[:batch] for k, v in case.inputs.items()}
    feeds.update({f"gy:{k}": v[:batch] for k, v in gys.items()})
    outs = cpu_session(model).run([f"grad:{k}" for k in wrt], feeds)
    return dict(zip(wrt, outs))


class Erf64(OpRun):
    """Erf at full float64: onnx's reference rounds it to float32, which a 1e-6 step
    cannot resolve (Gelu's function body reads it too)."""

    op_domain = ""
    op_type = "Erf"

    def _run(self, x: np.ndarray) -> tuple[np.ndarray]:
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu64(OpRun):
    """Gelu from the spec's formulas in float64 (its function body would use the float32 Erf)."""

    op_domain = ""

    def _run(self, x: np.ndarray, approximate: str = "none") -> tuple[np.ndarray]:
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
            return (0.5 * x * (1 + np.tanh(inner)),)
        return (0.5 * x * (1 + np.vectorize(math.erf, otypes=[x.dtype])(x / np.sqrt(2))),)


# The evaluator finds new ops by class name.
Erf64.__name__, Gelu64.__name__ = "Erf", "Gelu"


def numeric(case: Case, gys: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """d sum(gy * f(x)) / dx per sample, by float64 central differences."""
    session = ReferenceEvaluator(forward_model(case, TensorProto.DOUBLE), new_ops=[Erf64, Gelu64])
    values = {k: v.astype(np.float64) for k, v in case.inputs.items()}
    result = {}
    for name in case.inputs:
        if name in case.frozen:
            continue
        x = values[name]
        size = x[0].size
        grad = np.zeros_like(x)
        for n in range(x.shape[0]):
            feeds = {k: np.repeat(v[n:n + 1], 2 * size, axis=0) for k, v in values.items()}
            flat = feeds[name].reshape(2 * size, size).copy()
            flat[np.arange(size), np.arange(size)] += STEP
            flat[size + np.arange(size), np.arange(size)] -= STEP
            feeds[name] = flat.reshape(feeds[name].shape)
            outs = session.run(list(case.seeds), feeds)
            total = sum((o.reshape(2 * size, -1) * gys[s][n].reshape(1, -1)).sum(1)
                        for s, o in zip(case.seeds, outs))
            grad[n] = ((total[:size] - total[size:]) / (2 * STEP)).reshape(x.shape[1:])
        result[name] = grad
    return result


def upstream(case: Case, seed: int = 1) -> dict[str, np.ndarray]:
    out = ReferenceEvaluator(forward_model(case)).run(list(case.seeds), case.inputs)
    rng = np.random.default_rng(seed)
    return {s: rng.standard_normal(o.shape).astype(np.float32) for s, o in zip(case.seeds, out)}


def check(case: Case, whole_body: bool = False) -> None:
    gys = upstream(case)
    got = analytic(case, gys, whole_body=whole_body)
    want = numeric(case, gys)
    assert set(got) == set(want)
    for name, ref in want.items():
        scale = float(np.abs(ref).max())
        assert scale > 0, f"degenerate case: d/d{name} is zero"
        assert got[name].dtype == np.float32 and got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"d/d{name}")
    # Sample 0's gradient must not depend on sample 1: compare with a batch-1 run.
    alone = analytic(case, gys, batch=1, whole_body=whole_body)
    for name, g in alone.items():
        np.testing.assert_allclose(g[0], got[name][0], rtol=1e-5, atol=1e-6,
                                   err_msg=f"d/d{name} at batch 1")


# --------------------------------------------------------------------------- inputs

_rng = np.random.default_rng(2024)


def rand(*shape: int, lo: float = -1.0, hi: float = 1.0, away: tuple[float, ...] = (),
         gap: float = 0.05) -> np.ndarray:
    """Uniform float32 on (lo, hi), redrawn wherever a value falls within ``gap`` of a kink."""
    x = _rng.uniform(lo, hi, shape)
    for _ in range(100):
        bad = np.zeros(shape, bool)
        for k in away:
            bad |= np.abs(x - k) < gap
        if not bad.any():
            break
        x[bad] = _rng.uniform(lo, hi, int(bad.sum()))
    return x.astype(np.float32)


def distinct(*shape: int, scale: float = 2.0) -> np.ndarray:
    """Values with no ties (spaced by scale/size, far more than the finite-difference step)."""
    size = int(np.prod(shape))
    return ((_rng.permutation(size) / size - 0.5) * scale).reshape(shape).astype(np.float32)


def nonzero(*shape: int) -> np.ndarray:
    """Magnitudes in (0.5, 1.5) with random signs: safe divisors."""
    return (rand(*shape, lo=0.5, hi=1.5) * _rng.choice([-1, 1], shape)).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


def unary(op: str, x: np.ndarray, consts: dict | None = None, extra: tuple[str, ...] = (),
          **attrs) -> Case:
    return Case([node(op, ["x", *extra], **attrs)], {"x": x}, consts or {})


def binary(op: str, x: np.ndarray, c: np.ndarray, const_first: bool = False) -> Case:
    ins = ["c", "x"] if const_first else ["x", "c"]
    return Case([node(op, ins)], {"x": x}, {"c": c})


def two_inputs(op: str, x: np.ndarray, z: np.ndarray) -> Case:
    return Case([node(op, ["x", "z"])], {"x": x, "z": z})


# --------------------------------------------------------------------------- cases


def conv(x: np.ndarray, w_shape: tuple[int, ...], bias: bool = False, op: str = "Conv",
         **attrs) -> Case:
    consts = {"w": rand(*w_shape)}
    ins = ["x", "w"]
    if bias:
        # A ConvTranspose's weights are [C_in, C_out / group, k...]: its bias is C_out.
        out_channels = w_shape[0] if op == "Conv" else w_shape[1] * attrs.get("group", 1)
        consts["b"] = rand(out_channels)
        ins.append("b")
    return Case([node(op, ins, **attrs)], {"x": x}, consts)


def conv_transpose(x: np.ndarray, w_shape: tuple[int, ...], **attrs) -> Case:
    return conv(x, w_shape, op="ConvTranspose", **attrs)


def gemm(trans_a: int, trans_b: int, alpha: float = 1.0) -> Case:
    """x [N, K] fed as A (through a Transpose when transA, so the batch stays first)."""
    k, m = 4, 3
    nodes = []
    a = "x"
    if trans_a:
        nodes.append(node("Transpose", ["x"], ("xt",), perm=[1, 0]))
        a = "xt"
    nodes.append(node("Gemm", [a, "w", "c"], alpha=alpha, beta=1.3, transA=trans_a,
                      transB=trans_b))
    w = rand(m, k) if trans_b else rand(k, m)
    return Case(nodes, {"x": rand(2, k)}, {"w": w, "c": rand(m)})


CASES: dict[str, Case] = {
    # Conv
    "conv_3x3_pad1": conv(rand(2, 3, 6, 6), (4, 3, 3, 3), pads=[1, 1, 1, 1]),
    # 7 + 1 - 3 = 5 -> 3 outputs, covering 6 of 7 rows: output_padding 1, asymmetric pads.
    "conv_stride2_odd": conv(rand(2, 3, 7, 7), (4, 3, 3, 3), strides=[2, 2], pads=[0, 0, 1, 1]),
    # 2x2 stride 2 on 7x7 drops the last row and column: output_padding 1.
    "conv_k2_stride2_odd": conv(rand(2, 2, 7, 7), (3, 2, 2, 2), strides=[2, 2]),
    "conv_stride2_pad1_even": conv(rand(2, 3, 8, 8), (4, 3, 3, 3), strides=[2, 2],
                                   pads=[1, 1, 1, 1]),
    "conv_dilation2": conv(rand(2, 2, 7, 7), (3, 2, 3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    # Dilated and strided: 8 + 4 - 5 = 7 -> 4 outputs covering 7 of 8 rows.
    "conv_dilation2_stride2": conv(rand(2, 2, 8, 8), (3, 2, 3, 3), dilations=[2, 2],
                                   strides=[2, 2], pads=[2, 2, 2, 2]),
    "conv_valid": conv(rand(2, 2, 6, 5), (3, 2, 3, 3), auto_pad="VALID", strides=[2, 2]),
    "conv_dilation2_valid": conv(rand(2, 2, 8, 7), (3, 2, 3, 2), dilations=[2, 3]),
    # SAME_UPPER stride 2 on 8x7: H pads (0, 1), W pads (1, 1).
    "conv_same_upper_stride2": conv(rand(2, 3, 8, 7), (4, 3, 3, 3), auto_pad="SAME_UPPER",
                                    strides=[2, 2]),
    "conv_same_lower_stride2": conv(rand(2, 3, 8, 7), (4, 3, 3, 3), auto_pad="SAME_LOWER",
                                    strides=[2, 2]),
    "conv_same_upper_stride1_k2": conv(rand(2, 2, 5, 5), (3, 2, 2, 2), auto_pad="SAME_UPPER"),
    "conv_group2": conv(rand(2, 4, 5, 5), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    "conv_depthwise": conv(rand(2, 3, 5, 5), (3, 1, 3, 3), group=3, pads=[1, 1, 1, 1]),
    "conv_depthwise_mult2_stride2": conv(rand(2, 3, 6, 6), (6, 1, 3, 3), group=3,
                                         strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv_1x1": conv(rand(2, 3, 4, 4), (5, 3, 1, 1)),
    "conv_1x1_stride2": conv(rand(2, 3, 6, 6), (5, 3, 1, 1), strides=[2, 2]),
    "conv_bias": conv(rand(2, 3, 5, 5), (4, 3, 3, 3), bias=True, pads=[1, 1, 1, 1]),
    "conv_rect_kernel": conv(rand(2, 2, 6, 5), (3, 2, 3, 1), strides=[2, 1], pads=[1, 0, 0, 0]),
    "conv_3d": conv(rand(2, 2, 4, 5, 3), (3, 2, 2, 3, 2), strides=[2, 1, 1],
                    pads=[0, 1, 1, 0, 1, 0]),
    "conv_1d": conv(rand(2, 3, 9), (4, 3, 3), strides=[2], pads=[1, 0]),
    # ConvTranspose: U-Net decoders (Keras Conv2DTranspose, torch ConvTranspose2d)
    "conv_transpose_k2_stride2": conv_transpose(rand(2, 3, 3, 4), (3, 4, 2, 2), strides=[2, 2]),
    "conv_transpose_k3_stride2_pad1_extra1": conv_transpose(
        rand(2, 3, 3, 3), (3, 2, 3, 3), bias=True, strides=[2, 2], pads=[1, 1, 1, 1],
        output_padding=[1, 1]),
    "conv_transpose_uneven_pads": conv_transpose(rand(2, 2, 4, 3), (2, 3, 3, 2),
                                                 strides=[2, 3], pads=[0, 1, 1, 0]),
    # onnx's reference cannot run a grouped ConvTranspose: that one is held against torch.
    "conv_transpose_dilation2": conv_transpose(rand(2, 4, 3, 3), (4, 3, 3, 3),
                                               dilations=[2, 2], pads=[1, 1, 2, 2]),
    "conv_transpose_stride1_pad1": conv_transpose(rand(2, 3, 4, 4), (3, 5, 3, 3),
                                                  pads=[1, 1, 1, 1]),
    "conv_transpose_1d": conv_transpose(rand(2, 3, 5), (3, 2, 4), strides=[3], pads=[1, 2]),
    # Gemm
    "gemm_nn": gemm(0, 0),
    "gemm_nt": gemm(0, 1),
    "gemm_tn": gemm(1, 0, alpha=0.7),
    "gemm_tt": gemm(1, 1, alpha=0.7),
    "gemm_alpha": gemm(0, 1, alpha=-1.7),
    # MatMul
    "matmul_2d": binary("MatMul", rand(2, 4), rand(4, 3)),
    "matmul_3d": binary("MatMul", rand(2, 3, 4), rand(4, 5)),
    "matmul_const_first": binary("MatMul", rand(2, 4, 3), rand(5, 4), const_first=True),
    "matmul_both_inputs": two_inputs("MatMul", rand(2, 3, 4), rand(2, 4, 2)),
    # Broadcasting arithmetic with a constant operand
    "add_c11": binary("Add", rand(2, 3, 2, 2), rand(3, 1, 1)),
    "sub_c11": binary("Sub", rand(2, 3, 2, 2), rand(3, 1, 1)),
    "mul_c11": binary("Mul", rand(2, 3, 2, 2), rand(3, 1, 1)),
    "div_c11": binary("Div", rand(2, 3, 2, 2), nonzero(3, 1, 1)),
    "add_row": binary("Add", rand(2, 4), rand(1, 4)),
    "add_vec": binary("Add", rand(2, 4), rand(4)),
    "sub_vec": binary("Sub", rand(2, 4), rand(4)),
    "mul_vec": binary("Mul", rand(2, 4), rand(4)),
    "div_vec": binary("Div", rand(2, 4), nonzero(4)),
    "sub_const_first": binary("Sub", rand(2, 4), rand(4), const_first=True),
    "div_const_first": binary("Div", nonzero(2, 3, 2), rand(3, 1), const_first=True),
    # x itself is the broadcast operand: its gradient is summed over the channel axis.
    "add_x_broadcast": binary("Add", rand(2, 1, 3, 2), rand(4, 1, 1)),
    "mul_x_broadcast": binary("Mul", rand(2, 1, 3, 2), rand(4, 1, 1)),
    "div_x_broadcast": binary("Div", rand(2, 1, 3, 2), nonzero(4, 1, 1)),
    # Both operands are graph tensors that need gradients.
    "add_two": two_inputs("Add", rand(2, 3, 2, 2), rand(2, 3, 1, 1)),
    "sub_two": two_inputs("Sub", rand(2, 3, 2, 2), rand(2, 1, 2, 2)),
    "mul_two": two_inputs("Mul", rand(2, 3, 2, 2), rand(2, 3, 1, 1)),
    "div_two": two_inputs("Div", rand(2, 3, 2, 2), nonzero(2, 1, 2, 2)),
    "div_two_numerator_broadcast": two_inputs("Div", rand(2, 1, 2, 2), nonzero(2, 3, 2, 2)),
    # The same tensor on both sides: the two gradients must add up.
    "mul_x_x": Case([node("Mul", ["x", "x"])], {"x": rand(2, 3, 4)}),
    "sub_x_x_relu": Case([node("Relu", ["x"], ("r",)), node("Sub", ["r", "x"])],
                         {"x": rand(2, 5, away=(0.0,))}),
    # Two rules chained, with the gradients of x accumulated: y = x * relu(x).
    "mul_x_relu_x": Case([node("Relu", ["x"], ("r",)), node("Mul", ["x", "r"])],
                         {"x": rand(2, 3, 4, away=(0.0,))}),
    # Activations
    "neg": unary("Neg", rand(2, 3, 4)),
    "relu": unary("Relu", rand(2, 3, 4, 4, away=(0.0,))),
    "leaky_relu_default": unary("LeakyRelu", rand(2, 3, 4, away=(0.0,))),
    "leaky_relu": unary("LeakyRelu", rand(2, 3, 4, 4, away=(0.0,)), alpha=0.1),
    "clip_relu6": unary("Clip", rand(2, 3, 4, 4, lo=-3, hi=9, away=(0.0, 6.0)),
                        {"lo": np.float32(0.0), "hi": np.float32(6.0)}, ("lo", "hi")),
    "clip_max_only": Case([node("Clip", ["x", "", "hi"])],
                          {"x": rand(2, 3, 5, lo=-3, hi=3, away=(0.5,))},
                          {"hi": np.float32(0.5)}),
    "clip_no_bounds": unary("Clip", rand(2, 3, 4)),
    "sigmoid": unary("Sigmoid", rand(2, 3, 4, lo=-4, hi=4)),
    "tanh": unary("Tanh", rand(2, 3, 4, lo=-3, hi=3)),
    "hard_sigmoid": unary("HardSigmoid", rand(2, 3, 4, 4, lo=-5, hi=5, away=(-2.5, 2.5))),
    "hard_sigmoid_attrs": unary("HardSigmoid", rand(2, 3, 4, 4, lo=-4, hi=4, away=(-1.6, 2.4)),
                                alpha=0.25, beta=0.4),
    "hard_swish": unary("HardSwish", rand(2, 3, 4, 4, lo=-5, hi=5, away=(-3.0, 3.0))),
    "softmax_last": unary("Softmax", rand(2, 5, lo=-2, hi=2), axis=-1),
    "softmax_3d_last": unary("Softmax", rand(2, 3, 4, lo=-2, hi=2), axis=-1),
    "softmax_axis1": unary("Softmax", rand(2, 3, 4, lo=-2, hi=2), axis=1),
    "max_two": two_inputs("Max", *np.split(distinct(2, 2, 3, 4), 2, axis=1)),
    "max_const_broadcast": binary("Max", distinct(2, 3, 4), np.float32([-0.31, 0.07, 0.52, 0.9])),
    "max_same_tensor": Case([node("Max", ["x", "x"])], {"x": rand(2, 3, 4)}),
    "min_two": two_inputs("Min", *np.split(distinct(2, 2, 3, 4), 2, axis=1)),
    # Shape ops
    "flatten": unary("Flatten", rand(2, 3, 2, 2), axis=1),
    "reshape": unary("Reshape", rand(2, 3, 4), {"s": ints(-1, 2, 6)}, ("s",)),
    "reshape_zero": unary("Reshape", rand(2, 3, 4), {"s": ints(0, 12)}, ("s",)),
    "transpose_nhwc": unary("Transpose", rand(2, 3, 4, 5), perm=[0, 2, 3, 1]),
    "transpose_default_perm": Case(
        [node("Transpose", ["x"], ("t",)), node("Transpose", ["t"], ("y",), perm=[2, 1, 0])],
        {"x": rand(2, 3, 4)}),
    "squeeze": unary("Squeeze", rand(2, 3, 1, 4), {"a": ints(2)}, ("a",)),
    "unsqueeze": unary("Unsqueeze", rand(2, 3, 4), {"a": ints(1, 3)}, ("a",)),
    "concat": Case([node("Concat", ["x", "f", "z"], axis=1)],
                   {"x": rand(2, 2, 3, 3), "f": rand(2, 1, 3, 3), "z": rand(2, 3, 3, 3)},
                   frozen=("f",)),
    "concat_negative_axis": Case([node("Concat", ["x", "z"], axis=-1)],
                                 {"x": rand(2, 3, 2), "z": rand(2, 3, 4)}),
    "split_one_used": Case([node("Split", ["x", "s"], ("y0", "y1"), axis=1)],
                           {"x": rand(2, 5, 3)}, {"s": ints(2, 3)}, seeds=("y1",)),
    "split_first_used": Case([node("Split", ["x", "s"], ("y0", "y1"), axis=1)],
                             {"x": rand(2, 5, 3)}, {"s": ints(2, 3)}, seeds=("y0",)),
    "split_both_used": Case([node("Split", ["x", "s"], ("y0", "y1"), axis=-1)],
                            {"x": rand(2, 3, 5)}, {"s": ints(2, 3)}, seeds=("y0", "y1")),
    "slice_negative": unary("Slice", rand(2, 3, 6, 7),
                            {"st": ints(1, -5), "en": ints(-1, 6), "ax": ints(2, 3),
                             "sp": ints(1, 1)}, ("st", "en", "ax", "sp")),
    "slice_batch_and_clamped": unary("Slice", rand(2, 5, 4),
                                     {"st": ints(0, 1, -3), "en": ints(BIG, 100, -1),
                                      "ax": ints(0, 1, -1)}, ("st", "en", "ax")),
    "slice_no_axes": unary("Slice", rand(2, 4, 5), {"st": ints(0, 1, 2), "en": ints(BIG, 3, 4)},
                           ("st", "en")),
    # Slice bounds from Constant nodes rather than initializers.
    "slice_constant_nodes": Case(
        [helper.make_node("Constant", [], ["st"], value=numpy_helper.from_array(ints(1, -4))),
         helper.make_node("Constant", [], ["en"], value_ints=[3, -1]),
         helper.make_node("Constant", [], ["ax"], value_ints=[1, 2]),
         node("Slice", ["x", "st", "en", "ax"])],
        {"x": rand(2, 4, 6)}),
    "pad": unary("Pad", rand(2, 3, 4, 5), {"p": ints(0, 0, 1, 2, 0, 0, 2, 1)}, ("p",)),
    "pad_value": unary("Pad", rand(2, 3, 4, 5), {"p": ints(0, 0, 0, 3, 0, 0, 2, 0),
                                                 "v": np.float32(0.7)}, ("p", "v")),
    "expand": unary("Expand", rand(2, 3, 1, 1), {"s": ints(1, 3, 4, 5)}, ("s",)),
    "expand_middle": unary("Expand", rand(2, 1, 4), {"s": ints(3, 4)}, ("s",)),
    # Pooling and reductions
    "global_average_pool": unary("GlobalAveragePool", rand(2, 3, 4, 5)),
    "global_max_pool": unary("GlobalMaxPool", distinct(2, 3, 4, 5)),
    "reduce_mean_attr": unary("ReduceMean", rand(2, 3, 4, 5), axes=[2, 3], keepdims=0),
    "reduce_mean_keep": unary("ReduceMean", rand(2, 3, 4, 5), axes=[1], keepdims=1),
    "reduce_sum_input": unary("ReduceSum", rand(2, 3, 4, 5), {"a": ints(1)}, ("a",), keepdims=1),
    "reduce_sum_negative_axes": unary("ReduceSum", rand(2, 3, 4, 5), {"a": ints(-1, 1)}, ("a",),
                                      keepdims=0),
    "reduce_max": unary("ReduceMax", distinct(2, 3, 4, 5), axes=[2, 3], keepdims=0),
    "reduce_max_keep": unary("ReduceMax", distinct(2, 3, 4, 5), axes=[1, 3], keepdims=1),
    "average_pool_2x2": unary("AveragePool", rand(2, 3, 6, 6), kernel_shape=[2, 2],
                              strides=[2, 2]),
    "average_pool_2x2_odd": unary("AveragePool", rand(2, 2, 7, 5), kernel_shape=[2, 2],
                                  strides=[2, 2]),
    "average_pool_3x3_pad_exclude": unary("AveragePool", rand(2, 3, 5, 6), kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1], count_include_pad=0),
    "average_pool_3x3_pad_include": unary("AveragePool", rand(2, 3, 5, 6), kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1], count_include_pad=1),
    "average_pool_3x3_stride2_pad": unary("AveragePool", rand(2, 2, 7, 7), kernel_shape=[3, 3],
                                          strides=[2, 2], pads=[1, 1, 1, 1]),
    "average_pool_same_upper": unary("AveragePool", rand(2, 2, 5, 6), kernel_shape=[2, 2],
                                     strides=[2, 2], auto_pad="SAME_UPPER"),
    "average_pool_3x3_stride2_pad_include": unary(
        "AveragePool", rand(2, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
        count_include_pad=1),
    "average_pool_asymmetric": unary("AveragePool", rand(2, 2, 7, 6), kernel_shape=[3, 2],
                                     strides=[2, 1], pads=[0, 1, 2, 0]),
    "average_pool_same_upper_include": unary(
        "AveragePool", rand(2, 2, 5, 6), kernel_shape=[3, 3], strides=[2, 2],
        auto_pad="SAME_UPPER", count_include_pad=1),
    "average_pool_1d": unary("AveragePool", rand(2, 3, 9), kernel_shape=[3], strides=[2],
                             pads=[1, 1]),
    "max_pool_2x2": unary("MaxPool", distinct(2, 3, 6, 6), kernel_shape=[2, 2], strides=[2, 2]),
    "max_pool_3x3_stride2_pad1": unary("MaxPool", distinct(2, 3, 7, 7), kernel_shape=[3, 3],
                                       strides=[2, 2], pads=[1, 1, 1, 1]),
    "max_pool_3x3_stride1": unary("MaxPool", distinct(2, 2, 5, 5), kernel_shape=[3, 3]),
    "max_pool_ceil": unary("MaxPool", distinct(2, 2, 7, 7), kernel_shape=[2, 2], strides=[2, 2],
                           ceil_mode=1),
    "max_pool_dilated": unary("MaxPool", distinct(2, 2, 7, 7), kernel_shape=[2, 2],
                              dilations=[2, 2]),
    "max_pool_same_upper": unary("MaxPool", distinct(2, 2, 7, 6), kernel_shape=[3, 3],
                                 strides=[2, 2], auto_pad="SAME_UPPER"),
    # BatchNormalization and pass-through ops
    "batch_norm": unary("BatchNormalization", rand(2, 3, 4, 4),
                        {"s": np.float32([0.5, -1.2, 2.0]), "b": rand(3), "m": rand(3),
                         "v": np.float32([0.3, 1.7, 0.02])}, ("s", "b", "m", "v"),
                        epsilon=1e-2),
    "batch_norm_2d": unary("BatchNormalization", rand(2, 3),
                           {"s": np.float32([0.5, -1.2, 2.0]), "b": rand(3), "m": rand(3),
                            "v": np.float32([0.3, 1.7, 0.02])}, ("s", "b", "m", "v")),
    # Parameters computed in the graph (not initializers): the rule builds the factor in ONNX.
    "batch_norm_computed_params": Case(
        [node("Identity", ["s0"], ("s",)), node("Identity", ["v0"], ("v",)),
         node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
        {"x": rand(2, 3, 2, 2)},
        {"s0": np.float32([0.5, -1.2, 2.0]), "b": rand(3), "m": rand(3),
         "v0": np.float32([0.3, 1.7, 0.02])}),
    "identity": unary("Identity", rand(2, 3, 4)),
    "dropout": unary("Dropout", rand(2, 3, 4), {"r": np.float32(0.5)}, ("r",)),
    "cast_float": unary("Cast", rand(2, 3, 4), to=TensorProto.FLOAT),
}


def at_opset(opset: int, case: Case) -> Case:
    case.opset = opset
    return case


# Models already past opset 17 stay there: reductions take axes as inputs, Pad takes axes.
CASES.update({
    "reduce_mean_axes_input_op18": at_opset(18, unary(
        "ReduceMean", rand(2, 3, 4, 5), {"a": ints(2, 3)}, ("a",), keepdims=0)),
    "reduce_max_axes_input_op18": at_opset(18, unary(
        "ReduceMax", distinct(2, 3, 4, 5), {"a": ints(-1)}, ("a",), keepdims=0)),
    "global_max_pool_op18": at_opset(18, unary("GlobalMaxPool", distinct(2, 3, 4, 5))),
    "softmax_op18": at_opset(18, unary("Softmax", rand(2, 3, 4, lo=-2, hi=2), axis=1)),
    "add_x_broadcast_op18": at_opset(18, binary("Add", rand(2, 1, 3, 2), rand(4, 1, 1))),
    "pad_axes_op18": at_opset(18, unary(
        "Pad", rand(2, 3, 4, 5), {"p": ints(1, 2, 0, 1), "ax": ints(2, -1)}, ("p", "", "ax"))),
    "split_num_outputs_op18": at_opset(18, Case(
        [node("Split", ["x"], ("y0", "y1", "y2"), axis=1, num_outputs=3)],
        {"x": rand(2, 6, 2)}, seeds=("y0", "y2"))),
})


SQRT2 = np.float32(np.sqrt(2.0))


def where(x: np.ndarray, z: np.ndarray, condition: np.ndarray) -> Case:
    return Case([node("Where", ["c", "x", "z"])], {"x": x, "z": z}, {"c": condition})


# Smooth functions, their kinks kept away from the samples; logs and roots on
# positive inputs only (the harness's 1e-6 step must not cross 0).
CASES.update({
    "sqrt": unary("Sqrt", rand(2, 3, 4, lo=0.2, hi=3.0)),
    "sqrt_small": unary("Sqrt", rand(2, 3, 4, lo=0.01, hi=0.03)),
    "exp": unary("Exp", rand(2, 3, 4, lo=-3.0, hi=2.0)),
    "log": unary("Log", rand(2, 3, 4, lo=0.05, hi=3.0)),
    "pow_square": binary("Pow", rand(2, 3, 4), np.float32(2.0)),
    "pow_half": binary("Pow", rand(2, 3, 4, lo=0.2, hi=2.0), np.float32(0.5)),
    "pow_broadcast": binary("Pow", rand(2, 3, 4, lo=0.2, hi=2.0),
                            np.float32([3.0, -1.5, 0.7, 2.5])),
    "pow_int_exponent": binary("Pow", rand(2, 3, 4), ints(3)),
    "pow_const_base": binary("Pow", rand(2, 3, 4), rand(4, lo=0.5, hi=2.0), const_first=True),
    "pow_two": two_inputs("Pow", rand(2, 3, 4, lo=0.3, hi=2.0), rand(2, 1, 4)),
    "where_const_condition": where(rand(2, 3, 4), rand(2, 1, 4),
                                   _rng.random((3, 4)) > 0.5),
    "where_computed_condition": Case(
        [node("Greater", ["x", "k"], ("m",)), node("Where", ["m", "x", "z"])],
        {"x": rand(2, 3, 4, away=(0.1,)), "z": rand(2, 3, 1)}, {"k": np.float32(0.1)}),
    # masked_fill: a constant on one side.
    "where_constant_branch": Case(
        [node("Less", ["x", "k"], ("m",)), node("Where", ["m", "f", "x"])],
        {"x": rand(2, 5, away=(-0.2,))}, {"k": np.float32(-0.2), "f": np.float32(-3.0)}),
    "reciprocal": unary("Reciprocal", nonzero(2, 3, 4)),
    "abs": unary("Abs", rand(2, 3, 4, away=(0.0,))),
    # dynamo's scalar casts: CastLike(x, like) reads only like's type.
    "cast_like_float": Case([node("CastLike", ["x", "z"])], {"x": rand(2, 3), "z": rand(2, 3)},
                            frozen=("z",)),
    "cast_like_const": binary("CastLike", rand(2, 3), np.float32(0.0)),
    "erf": unary("Erf", rand(2, 3, 4, lo=-2.5, hi=2.5)),
    # GELU as the legacy exporter writes it: x * 0.5 * (1 + erf(x / sqrt 2)).
    "gelu_decomposed": Case(
        [node("Div", ["x", "r"], ("s",)), node("Erf", ["s"], ("e",)),
         node("Add", ["e", "one"], ("p",)), node("Mul", ["x", "p"], ("q",)),
         node("Mul", ["q", "half"])],
        {"x": rand(2, 3, 4, lo=-3.0, hi=3.0)},
        {"r": SQRT2, "one": np.float32(1.0), "half": np.float32(0.5)}),
    "gelu_op20": at_opset(20, unary("Gelu", rand(2, 3, 4, lo=-4.0, hi=4.0))),
    "gelu_tanh_op20": at_opset(20, unary("Gelu", rand(2, 3, 4, lo=-4.0, hi=4.0),
                                         approximate="tanh")),
    "softplus": unary("Softplus", rand(2, 3, 4, lo=-4.0, hi=4.0)),
    "elu": unary("Elu", rand(2, 3, 4, lo=-3.0, hi=2.0, away=(0.0,))),
    "elu_alpha": unary("Elu", rand(2, 3, 4, lo=-3.0, hi=2.0, away=(0.0,)), alpha=0.3),
    "selu": unary("Selu", rand(2, 3, 4, lo=-3.0, hi=2.0, away=(0.0,))),
    "selu_attrs": unary("Selu", rand(2, 3, 4, lo=-3.0, hi=2.0, away=(0.0,)), alpha=1.3,
                        gamma=0.9),
    "prelu_channel": binary("PRelu", rand(2, 3, 4, 4, away=(0.0,)), rand(3, 1, 1)),
    "prelu_scalar": binary("PRelu", rand(2, 3, 4, away=(0.0,)), np.float32([0.23])),
    "prelu_slope_computed": two_inputs("PRelu", rand(2, 3, 2, 2, away=(0.0,)), rand(2, 3, 1, 1)),
    "reduce_l2": unary("ReduceL2", rand(2, 3, 4), axes=[-1], keepdims=1),
    "reduce_l2_axes_input_op18": at_opset(18, unary(
        "ReduceL2", rand(2, 3, 4, 2), {"a": ints(1, 3)}, ("a",), keepdims=0)),
    "reduce_sum_square": unary("ReduceSumSquare", rand(2, 3, 4), axes=[1, 2], keepdims=0),
    # F.normalize as the legacy exporter writes it (swin_v2's cosine attention).
    "l2_normalize": Case(
        [node("ReduceL2", ["x"], ("n",), axes=[-1], keepdims=1),
         node("Clip", ["n", "eps"], ("nc",)), node("Div", ["x", "nc"])],
        {"x": rand(2, 3, 4)}, {"eps": np.float32(1e-12)}),
})


def layer_norm(x: np.ndarray, normalized: tuple[int, ...], bias: bool = True, **attrs) -> Case:
    consts = {"s": nonzero(*normalized)}
    if bias:
        consts["b"] = rand(*normalized)
    return Case([node("LayerNormalization", ["x", *consts], **attrs)], {"x": x}, consts)


def group_norm(opset: int, x: np.ndarray, groups: int, **attrs) -> Case:
    width = x.shape[1]
    return at_opset(opset, Case(
        [node("GroupNormalization", ["x", "s", "b"], num_groups=groups, **attrs)],
        {"x": x}, {"s": nonzero(width), "b": rand(width)}))


def near_constant(*shape: int, spread: float) -> np.ndarray:
    """Rows close to a constant: a variance near 0, where LayerNorm's slope is steepest."""
    return (0.5 + spread * _rng.uniform(-1, 1, shape)).astype(np.float32)


CASES.update({
    "layer_norm_last": layer_norm(rand(2, 3, 5), (5,)),
    "layer_norm_no_bias": layer_norm(rand(2, 4, 6), (6,), bias=False, epsilon=1e-6),
    "layer_norm_axis1": layer_norm(rand(2, 3, 4), (3, 4), axis=1),
    "layer_norm_axis_minus2": layer_norm(rand(2, 2, 3, 4), (3, 4), axis=-2, epsilon=1e-2),
    # Variance 1e-5 against eps 1e-5 (and 3e-7 against 1e-6): the steep, near-singular end.
    "layer_norm_small_variance": layer_norm(near_constant(2, 3, 8, spread=5e-3), (8,)),
    "layer_norm_tiny_variance": layer_norm(near_constant(2, 3, 8, spread=1e-3), (8,),
                                           epsilon=1e-6),
    # Mean and InvStdDev outputs exported but unused.
    "layer_norm_three_outputs": Case(
        [node("LayerNormalization", ["x", "s", "b"], ("y", "mean", "inv_std"))],
        {"x": rand(2, 3, 5)}, {"s": nonzero(5), "b": rand(5)}),
    "instance_norm": unary("InstanceNormalization", rand(2, 3, 4, 5),
                           {"s": nonzero(3), "b": rand(3)}, ("s", "b")),
    "instance_norm_1d_eps": unary("InstanceNormalization", rand(2, 3, 6),
                                  {"s": nonzero(3), "b": rand(3)}, ("s", "b"), epsilon=1e-3),
    "group_norm_op21": group_norm(21, rand(2, 6, 2, 3), 3, epsilon=1e-3),
    "group_norm_op21_one_group": group_norm(21, rand(2, 4, 3), 1),
    "group_norm_op21_per_channel": group_norm(21, rand(2, 3, 2, 2), 3),
})


def shape_of(axis: int, output: str) -> list[onnx.NodeProto]:
    """``output`` = x.shape[axis] as a 1-D int64 tensor, computed in the graph."""
    return [node("Shape", ["x"], (f"{output}_shape",)),
            node("Gather", [f"{output}_shape", f"{output}_axis"], (f"{output}_dim",), axis=0),
            node("Unsqueeze", [f"{output}_dim", "zero_axis"], (output,))]


def gather(x: np.ndarray, indices: np.ndarray, axis: int, opset: int = OPSET) -> Case:
    return at_opset(opset, unary("Gather", x, {"i": indices}, ("i",), axis=axis))


CASES.update({
    # Strided slices (Swin's patch merging), a reversal, and a stride with clamped ends.
    "slice_step2": unary("Slice", rand(2, 3, 6), {"st": ints(0), "en": ints(6), "ax": ints(2),
                                                 "sp": ints(2)}, ("st", "en", "ax", "sp")),
    "slice_patch_merging": Case(
        [node("Slice", ["x", "st", "en", "ax", "sp"], ("a",)),
         node("Slice", ["x", "st1", "en", "ax", "sp"], ("b",)),
         node("Concat", ["a", "b"], axis=-1)],
        {"x": rand(2, 4, 4, 3)},
        {"st": ints(0, 1), "st1": ints(1, 0), "en": ints(BIG, BIG), "ax": ints(1, 2),
         "sp": ints(2, 2)}),
    "slice_reversed": unary("Slice", rand(2, 3, 5), {"st": ints(-1), "en": ints(-BIG),
                                                    "ax": ints(1), "sp": ints(-1)},
                            ("st", "en", "ax", "sp")),
    "slice_step3_negative_start": unary("Slice", rand(2, 7, 3), {"st": ints(-6), "en": ints(100),
                                                                "ax": ints(-2), "sp": ints(3)},
                                        ("st", "en", "ax", "sp")),
    # Bounds computed from the input's shape, as the legacy exporter writes Swin's
    # crops (x[:, :H, :W]) and MaxViT's chunks.
    "slice_computed_end": Case(
        [*shape_of(2, "h"), node("Sub", ["h", "one_i"], ("e",)),
         node("Slice", ["x", "zero_i", "e", "two_i"])],
        {"x": rand(2, 3, 5, 2)},
        {"h_axis": np.int64(2), "zero_axis": ints(0), "one_i": ints(1), "zero_i": ints(0),
         "two_i": ints(2)}),
    "slice_computed_start_and_end": Case(
        [*shape_of(-1, "c"), node("Div", ["c", "three_i"], ("third",)),
         node("Mul", ["third", "two_i"], ("two_thirds",)),
         node("Slice", ["x", "third", "two_thirds", "last"])],
        {"x": rand(2, 3, 6)},
        {"c_axis": np.int64(-1), "zero_axis": ints(0), "three_i": ints(3), "two_i": ints(2),
         "last": ints(-1)}),
    # Pads computed from the shape, as Swin pads to a multiple of its window.
    "pad_computed": Case(
        [*shape_of(2, "h"), node("Sub", ["four_i", "h"], ("short",)),
         node("Mod", ["short", "four_i"], ("pad_h",)),
         node("Concat", ["begins", "pad_h", "pad_w"], ("p",), axis=0),
         node("Pad", ["x", "p"])],
        {"x": rand(2, 3, 5, 2)},
        {"h_axis": np.int64(2), "zero_axis": ints(0), "four_i": ints(4),
         "begins": ints(0, 0, 1, 0, 0, 0), "pad_w": ints(2)}),
    "pad_computed_axes_op18": at_opset(18, Case(
        [*shape_of(1, "h"), node("Sub", ["four_i", "h"], ("short",)),
         node("Concat", ["zero_i", "one_i", "short", "zero_i"], ("p",), axis=0),
         node("Pad", ["x", "p", "", "ax"])],
        {"x": rand(2, 3, 2, 3)},
        {"h_axis": np.int64(1), "zero_axis": ints(0), "four_i": ints(4), "zero_i": ints(0),
         "one_i": ints(1), "ax": ints(1, -1)})),
    # ViT's class token (x[:, 0]), q/k/v picked from a [3, N, ...] tensor, and index lists.
    "gather_class_token": gather(rand(2, 5, 4), np.int64(0), axis=1),
    "gather_negative_scalar": gather(rand(2, 5, 4), np.int64(-2), axis=2),
    "gather_qkv": Case(
        [node("Transpose", ["x"], ("t",), perm=[1, 0, 2, 3]),
         node("Gather", ["t", "i0"], ("q",), axis=0), node("Gather", ["t", "i2"], ("v",), axis=0),
         node("Mul", ["q", "v"])],
        {"x": rand(2, 3, 2, 4)}, {"i0": np.int64(0), "i2": np.int64(2)}),
    "gather_list": gather(rand(2, 5, 3), ints(4, 0, 2), axis=1),
    "gather_repeated": gather(rand(2, 5, 3), ints(1, -4, 3, 1), axis=1),  # -4 is 1 too
    "gather_grid": gather(rand(2, 4, 3), np.asarray([[3, 1], [0, 2]], np.int64), axis=1),
    "gather_list_op13": gather(rand(2, 5, 3), ints(4, 0, 2), axis=1, opset=13),
    # as_strided as dynamo writes it at batch 1: a flat tensor gathered by an index grid.
    "gather_flat_grid": Case(
        [node("Gather", ["x", "i"], ("t",), axis=1), node("Reshape", ["t", "s"])],
        {"x": rand(2, 6)}, {"i": np.arange(6)[::-1].reshape(1, 3, 2, 1).copy(),
                            "s": ints(0, 3, 2)}),
    "gather_computed_indices": Case(
        [*shape_of(1, "n"), node("Sub", ["n", "one_i"], ("last",)),
         node("Gather", ["x", "last"], axis=1)],
        {"x": rand(2, 4, 3)}, {"n_axis": np.int64(1), "zero_axis": ints(0), "one_i": ints(1)}),
    # GatherND indexes leading axes, so the batch is moved last first; [1, 2] repeats.
    "gather_nd": Case(
        [node("Transpose", ["x"], ("t",), perm=[1, 2, 0]), node("GatherND", ["t", "i"], ("u",)),
         node("Transpose", ["u"], perm=[2, 0, 1])],
        {"x": rand(2, 3, 4)}, {"i": np.asarray([[[1, 2], [0, 0]], [[2, 3], [1, 2]]], np.int64)}),
    # adaptive_avg_pool2d from 1x1 to 3x3 at small inputs (dynamo): the batch stays behind.
    "gather_nd_upsample": Case(
        [node("Transpose", ["x"], ("t",), perm=[2, 3, 0, 1]),
         node("GatherND", ["t", "i"], ("u",)),
         node("Transpose", ["u"], perm=[2, 3, 0, 1])],
        {"x": rand(2, 3, 2, 2)},
        {"i": np.asarray([[[a // 2, b // 2] for b in range(3)] for a in range(3)], np.int64)}),
})


def einsum(equation: str, x: np.ndarray, z: np.ndarray, z_const: bool = False) -> Case:
    if z_const:
        return Case([node("Einsum", ["x", "z"], equation=equation)], {"x": x}, {"z": z})
    return Case([node("Einsum", ["x", "z"], equation=equation)], {"x": x, "z": z})


CASES.update({
    # Attention as Swin, ViT and MaxViT write it (MaxViT's with spaces and capitals).
    "einsum_scores": einsum("bhid,bhjd->bhij", rand(2, 2, 3, 4), rand(2, 2, 5, 4)),
    "einsum_values": einsum("bhij,bhjd->bhid", rand(2, 2, 3, 5), rand(2, 2, 5, 4)),
    "einsum_maxvit": einsum("B G H I D, B G H J D -> B G H I J", rand(2, 2, 1, 3, 4),
                            rand(2, 2, 1, 3, 4)),
    "einsum_same_operand": Case([node("Einsum", ["x", "x"], equation="bij,bkj->bik")],
                                {"x": rand(2, 3, 4)}),
    "einsum_weight": einsum("bij,jk->bik", rand(2, 3, 4), rand(4, 5), z_const=True),
    "einsum_implicit_output": einsum("bij,jk", rand(2, 3, 4), rand(4, 2), z_const=True),
    "einsum_ellipsis": einsum("...ij,jk->...ik", rand(2, 3, 4), rand(4, 5), z_const=True),
    "einsum_ellipsis_both": einsum("...ij,...jk->...ik", rand(2, 2, 3, 4), rand(2, 2, 4, 3)),
    # i is summed away from x alone: its gradient comes back by broadcasting.
    "einsum_summed_index": einsum("bij,bk->bjk", rand(2, 3, 4), rand(2, 5)),
    "einsum_single_transpose": unary("Einsum", rand(2, 3, 4), equation="bij->bji"),
    "einsum_single_sum": unary("Einsum", rand(2, 3, 4), equation="bij->bi"),
})


def resize(x: np.ndarray, scales: list[float], opset: int = OPSET, **attrs) -> Case:
    return at_opset(opset, unary("Resize", x, {"roi": np.zeros(0, np.float32),
                                               "sc": np.float32(scales)}, ("roi", "sc"), **attrs))


CASES.update({
    "resize_nearest_2x": resize(rand(2, 2, 3, 3), [1, 1, 2, 2]),
    # torch's nearest upsampling, non-integer along W.
    "resize_nearest_torch": resize(rand(2, 2, 3, 4), [1, 1, 2, 1.5],
                                   coordinate_transformation_mode="asymmetric",
                                   nearest_mode="floor"),
    "resize_linear_2x": resize(rand(2, 2, 3, 4), [1, 1, 2, 2], mode="linear"),
    # Sizes stay whole (3 * 2, 4 * 1.5): onnx's reference resizes by the unrounded
    # size where they are not; onnxruntime and torch agree on the rounded one.
    "resize_linear_align_corners": resize(rand(2, 2, 3, 4), [1, 1, 2, 1.5], mode="linear",
                                          coordinate_transformation_mode="align_corners"),
    "resize_linear_down": resize(rand(2, 2, 6, 5), [1, 1, 0.5, 0.6], mode="linear",
                                 coordinate_transformation_mode="pytorch_half_pixel"),
    "resize_linear_antialias_op18": resize(rand(2, 1, 8, 6), [1, 1, 0.5, 0.5], opset=18,
                                           mode="linear", antialias=1),
    "resize_cubic": resize(rand(2, 2, 4, 3), [1, 1, 2, 2], mode="cubic", cubic_coeff_a=-0.75),
    "resize_1d": resize(rand(2, 3, 5), [1, 1, 3], mode="linear"),
    # Channels-last maps resized along H and W (axes 1 and 2: the matrices transpose in).
    "resize_nhwc_axes_op18": at_opset(18, unary(
        "Resize", rand(2, 3, 2, 4), {"sc": np.float32([2, 1.5])}, ("", "sc"), mode="linear",
        axes=[1, 2])),
    # Sizes computed from the input's shape, as torch's legacy export writes F.interpolate(size=).
    "resize_sizes_computed": Case(
        [node("Shape", ["x"], ("s",)), node("Slice", ["s", "zero_i", "two_i"], ("nc",)),
         node("Concat", ["nc", "hw"], ("sizes",), axis=0),
         node("Resize", ["x", "", "", "sizes"], mode="linear")],
        {"x": rand(2, 2, 3, 4)},
        {"zero_i": ints(0), "two_i": ints(2), "hw": ints(5, 7)}),
    "resize_sizes_axes_op18": at_opset(18, unary(
        "Resize", rand(2, 2, 3, 3), {"sz": ints(7, 4)}, ("", "", "sz"), axes=[2, 3],
        mode="nearest")),
})


def picked_by(repeat: bool = False) -> list[onnx.NodeProto]:
    """``idx``: per-sample indices along axis 1, the top ``k`` of ``z`` (twice with ``repeat``)."""
    nodes = [node("TopK", ["z", "k"], ("z_top", "idx0" if repeat else "idx"), axis=1)]
    if repeat:
        nodes.append(node("Concat", ["idx0", "idx0"], ("idx",), axis=1))
    return nodes


# Detectors pick their scores by TopK and scatter MultiScaleRoIAlign's levels back.
CASES.update({
    "top_k": Case([node("TopK", ["x", "k"], ("y", "i"), axis=1)], {"x": distinct(2, 6)},
                  {"k": ints(3)}),
    "top_k_smallest_last_axis": Case(
        [node("TopK", ["x", "k"], ("y", "i"), largest=0)], {"x": distinct(2, 3, 5)},
        {"k": ints(2)}),
    "gather_elements": Case(
        [*picked_by(), node("GatherElements", ["x", "idx"], axis=1)],
        {"x": rand(2, 5, 3), "z": distinct(2, 5, 3)}, {"k": ints(2)}, frozen=("z",)),
    "gather_elements_repeated": Case(
        [*picked_by(repeat=True),
         node("GatherElements", ["x", "idx"], axis=1)],
        {"x": rand(2, 5, 3), "z": distinct(2, 5, 3)}, {"k": ints(2)}, frozen=("z",)),
    "scatter_elements": Case(
        [*picked_by(), node("ScatterElements", ["x", "idx", "u"], axis=1)],
        {"x": rand(2, 5, 3), "u": rand(2, 2, 3), "z": distinct(2, 5, 3)}, {"k": ints(2)},
        frozen=("z",)),
    "scatter_elements_add": Case(
        [*picked_by(repeat=True),
         node("ScatterElements", ["x", "idx", "u"], axis=1, reduction="add")],
        {"x": rand(2, 5, 3), "u": rand(2, 4, 3), "z": distinct(2, 5, 3)}, {"k": ints(2)},
        frozen=("z",)),
})


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_numerical_vjp(name: str) -> None:
    check(CASES[name])


# Rules with another form for passes through the whole body (Conv on the flipped
# kernel at stride 1, ReLU masks read from the output).
BODY_FORMS = [name for name, case in CASES.items()
              if any(n.op_type in ("Conv", "Relu") for n in case.nodes)]


@pytest.mark.parametrize("name", BODY_FORMS)
def test_whole_body_form_matches_numerical_vjp(name: str) -> None:
    check(CASES[name], whole_body=True)


@pytest.mark.parametrize("op,x,slope", [
    # A confident score: float32 rounds sigmoid(x) to 1 past x = 17, and y (1 - y) to 0.
    ("Sigmoid", np.array([[17.5, 20.0, 25.0, -20.0, 0.5]]),
     lambda x: np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))) ** 2),
    # tanh rounds to +-1 past 9, and 1 - y^2 to 0.
    ("Tanh", np.array([[9.5, 11.0, 14.0, -12.0, 0.5]]), lambda x: 1 / np.cosh(x) ** 2),
])
def test_saturated_slopes_keep_their_precision(op: str, x: np.ndarray, slope: Any) -> None:
    """Where the output rounds to its bound in float32, the derivative is still each
    element's, to float32's relative precision (hand-worked in float64), not 0."""
    case = unary(op, x.astype(np.float32))
    gy = np.ones_like(case.inputs["x"])
    got = analytic(case, {"y": gy}, batch=1)["x"].astype(np.float64)
    want = slope(case.inputs["x"].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_whole_body_conv_is_a_conv_at_stride_one() -> None:
    ops = {}
    for name in ("conv_3x3_pad1", "conv_depthwise_mult2_stride2", "conv_group2"):
        model, _ = gradient_model(CASES[name], whole_body=True)
        ops[name] = [n.op_type for n in onnx.load_from_string(model).graph.node][1:]
    assert "ConvTranspose" not in ops["conv_3x3_pad1"] + ops["conv_group2"]
    assert "ConvTranspose" in ops["conv_depthwise_mult2_stride2"]


def test_every_rule_is_exercised() -> None:
    # RoiAlign mixes samples by design: tests/exporter/test_vjp_detection.py holds it.
    tested = {n.op_type for case in CASES.values() for n in case.nodes} | {"RoiAlign"}
    assert set(RULES) <= tested, sorted(set(RULES) - tested)


# --------------------------------------------------------------------------- guided ReLU


def test_guided_relu_passes_only_positive_gradients_at_positive_inputs() -> None:
    case = CASES["relu"]
    gys = upstream(case)
    got = analytic(case, gys, guided=True)["x"]
    want = np.maximum(gys["y"], 0) * (case.inputs["x"] > 0)
    np.testing.assert_array_equal(got, want)
    assert (got != analytic(case, gys)["x"]).any()  # differs from the plain rule


# --------------------------------------------------------------------------- unbroadcast


@pytest.mark.parametrize(
    "small, reduced",
    [((4,), (0, 1, 2)), ((3, 1, 4), (0, 2)), ((1, 5, 4), (0, 1))],
    ids=["vector", "middle_and_leading", "leading_one"],
)
def test_unbroadcast_sums_leading_and_unit_axes(small: tuple[int, ...],
                                                reduced: tuple[int, ...]) -> None:
    """A constant shaped ``small`` broadcast into [N, 3, 5, 4]: sum the gradient back."""
    rng = np.random.default_rng(7)
    grad = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    graph = helper.make_graph(
        [], "u", [helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 3, 5, 4])], [],
        [numpy_helper.from_array(np.zeros(small, np.float32), "c")])
    shapes = {"y": TensorShape((1, 3, 5, 4), (True, False, False, False)),
              "c": TensorShape(small, (False,) * len(small))}
    b = GraphBuilder(graph, "grad")
    ctx = VjpContext(b, shapes, initializer_values(graph), OPSET)
    out = ctx.unbroadcast("g", "y", "c")
    b.nodes.append(helper.make_node("Identity", [out], ["out"]))
    b.commit()
    graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=8)
    (got,) = cpu_session(model.SerializeToString()).run(["out"], {"g": grad})
    want = grad.sum(axis=reduced).reshape(small)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unbroadcast_same_shape_is_a_no_op() -> None:
    shape = TensorShape((1, 3), (True, False))
    ctx = VjpContext(GraphBuilder(helper.make_graph([], "u", [], []), "g"),
                     {"y": shape, "x": shape}, {}, OPSET)
    assert ctx.unbroadcast("gy", "y", "x") == "gy"
    assert ctx.b.nodes == []


# --------------------------------------------------------------------------- the harness


def test_harness_catches_a_wrong_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sigmoid's gradient replaced by the identity's must fail the check."""
    monkeypatch.setitem(RULES, "Sigmoid", RULES["Identity"])
    with pytest.raises(AssertionError):
        check(CASES["sigmoid"])


@pytest.mark.parametrize("op, name", [
    ("LayerNormalization", "layer_norm_tiny_variance"), ("Gelu", "gelu_op20"),
    ("Gather", "gather_list"), ("Einsum", "einsum_scores"), ("Resize", "resize_linear_2x"),
    ("Slice", "slice_patch_merging"), ("Pow", "pow_two"),
])
def test_harness_catches_a_rule_off_by_one_percent(monkeypatch: pytest.MonkeyPatch, op: str,
                                                     name: str) -> None:
    """Each new rule, its first gradient scaled by 1.01, must fail the check."""
    exact = RULES[op]

    def off(ctx: VjpContext, n: onnx.NodeProto, g: list[str | None]) -> list[str | None]:
        grads = exact(ctx, n, g)
        first = next(i for i, grad in enumerate(grads) if grad is not None)
        exact_first = grads[first]
        assert exact_first is not None
        grads[first] = ctx.b.op("Mul", [exact_first, ctx.scalar(1.01)])
        return grads

    monkeypatch.setitem(RULES, op, off)
    with pytest.raises(AssertionError, match="d/d"):
        check(CASES[name])


def test_harness_catches_batch_mixing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that leaks gradient across samples must fail the check."""
    def leaky(ctx: VjpContext, n: onnx.NodeProto, g: list[str | None]) -> list[str | None]:
        total = ctx.reduce("ReduceSum", g[0], [0], keepdims=True)  # type: ignore[arg-type]
        return [ctx.b.op("Add", [g[0], ctx.b.op("Mul", [total, ctx.scalar(1e-3)])])]

    monkeypatch.setitem(RULES, "Identity", leaky)
    with pytest.raises(AssertionError):
        check(CASES["identity"])


# --------------------------------------------------------------------------- refusals


REFUSED = {
    "slice_batch_axis": unary("Slice", rand(2, 3), {"st": ints(1), "en": ints(2), "ax": ints(0)},
                              ("st", "en", "ax")),
    "pad_reflect": unary("Pad", rand(2, 3, 4), {"p": ints(0, 0, 1, 0, 0, 1)}, ("p",),
                         mode="reflect"),
    "pad_batch_axis": unary("Pad", rand(2, 3), {"p": ints(1, 0, 0, 0)}, ("p",)),
    "average_pool_ceil_overhang": unary("AveragePool", rand(2, 2, 7, 7), kernel_shape=[2, 2],
                                        strides=[2, 2], ceil_mode=1),
    "reduce_mean_over_batch": unary("ReduceMean", rand(2, 3), axes=[0, 1], keepdims=1),
    "reduce_max_over_batch": unary("ReduceMax", distinct(2, 3), axes=[0], keepdims=1),
    "concat_batch_axis": Case([node("Concat", ["x", "z"], axis=0)],
                              {"x": rand(2, 3), "z": rand(2, 3)}),
    "max_pool_column_major": unary("MaxPool", distinct(2, 1, 4, 4), kernel_shape=[2, 2],
                                   strides=[2, 2], storage_order=1),
    "matmul_vector": binary("MatMul", rand(2, 4), rand(4)),
    "softmax_opset12": at_opset(12, unary("Softmax", rand(2, 5), axis=1)),
    "group_norm_op18": at_opset(18, Case(
        [node("GroupNormalization", ["x", "s", "b"], num_groups=2)], {"x": rand(2, 4, 3)},
        {"s": nonzero(2), "b": rand(2)})),
    "layer_norm_over_batch": layer_norm(rand(2, 3), (1, 3), axis=0),
    "resize_tf_crop": unary("Resize", rand(2, 1, 3, 3),
                            {"roi": np.float32([0, 0, 0.1, 0, 1, 1, 0.9, 1]),
                             "sc": np.float32([1, 1, 2, 2])}, ("roi", "sc"), mode="linear",
                            coordinate_transformation_mode="tf_crop_and_resize"),
    "resize_computed_scales": Case(
        [node("Identity", ["sc0"], ("sc",)), node("Resize", ["x", "", "sc"])],
        {"x": rand(2, 1, 3, 3)}, {"sc0": np.float32([1, 1, 2, 2])}),
    "einsum_diagonal": unary("Einsum", rand(2, 3, 3), equation="bii->bi"),
    "einsum_three_operands": Case([node("Einsum", ["x", "x", "x"], equation="bi,bi,bi->b")],
                                  {"x": rand(2, 3)}),
    "gather_batch_axis": gather(rand(2, 3), ints(0), axis=0),
    "top_k_batch_axis": Case([node("TopK", ["x", "k"], ("y", "i"), axis=0)],
                             {"x": distinct(2, 3)}, {"k": ints(1)}),
    "scatter_elements_max": Case(
        [*picked_by(),
         node("ScatterElements", ["x", "idx", "u"], axis=1, reduction="max")],
        {"x": rand(2, 5, 3), "u": rand(2, 2, 3), "z": distinct(2, 5, 3)}, {"k": ints(2)},
        frozen=("z",)),
    # carries_gradient lets CastLike through whatever its target: the rule must refuse.
    "cast_like_int": Case([node("CastLike", ["x", "c"], ("i",)),
                           node("Cast", ["i"], to=TensorProto.FLOAT)],
                          {"x": rand(2, 3, lo=-9, hi=9)}, {"c": ints(0)}),
    "gather_repeated_op13": gather(rand(2, 5, 3), ints(1, 1), axis=1, opset=13),
    "gather_nd_batch_dims": Case(
        [node("Transpose", ["x"], ("t",), perm=[1, 2, 0]),
         node("GatherND", ["t", "i"], batch_dims=1)],
        {"x": rand(2, 3, 4)}, {"i": ints(1, 0, 3).reshape(3, 1)}),
    # Bounds computed, axes not given: the slice could cut the batch.
    "slice_computed_no_axes": Case(
        [*shape_of(1, "c"), node("Slice", ["x", "zero_i", "c"])],
        {"x": rand(2, 3)}, {"c_axis": np.int64(1), "zero_axis": ints(0), "zero_i": ints(0)}),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_rule_refuses_what_it_cannot_differentiate(name: str) -> None:
    with pytest.raises(NotImplementedError):
        gradient_model(REFUSED[name])


# --------------------------------------------------------------------------- max ties


@pytest.mark.parametrize("op, attrs", [("GlobalMaxPool", {}),
                                       ("ReduceMax", {"axes": [2, 3], "keepdims": 1})])
def test_max_reductions_share_tied_gradients_equally(op: str, attrs: dict) -> None:
    x = distinct(2, 2, 3, 3)
    x[0, 0, 0, 0] = x[0, 0, 2, 1] = x[0, 0, 1, 2] = x.max() + 1  # a three-way tie
    x[1, 1, 1, 1] = x[1, 1, 0, 0] = x.max() + 1  # a two-way tie
    case = unary(op, x, **attrs)
    gys = upstream(case)
    got = analytic(case, gys)["x"]
    peak = x == x.max(axis=(2, 3), keepdims=True)
    want = peak * gys["y"].reshape(2, 2, 1, 1) / peak.sum(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- Resize vs torch


def sized_resize(x: np.ndarray, size: tuple[int, int], **attrs) -> Case:
    """Resize to a fixed H, W with sizes computed from the input (torch's legacy form)."""
    return Case(
        [node("Shape", ["x"], ("s",)), node("Slice", ["s", "zero_i", "two_i"], ("nc",)),
         node("Concat", ["nc", "hw"], ("sizes",), axis=0),
         node("Resize", ["x", "", "", "sizes"], **attrs)],
        {"x": x}, {"zero_i": ints(0), "two_i": ints(2), "hw": ints(*size)})


TORCH_RESIZES = {
    # name: (torch's interpolate arguments, the ONNX form torch exports)
    "bilinear_2x": (dict(scale_factor=2.0, mode="bilinear", align_corners=False),
                    resize(rand(2, 2, 3, 4), [1, 1, 2, 2], mode="linear",
                           coordinate_transformation_mode="pytorch_half_pixel")),
    "bilinear_align_corners_odd": (dict(size=(7, 6), mode="bilinear", align_corners=True),
                                   sized_resize(rand(2, 2, 3, 4), (7, 6), mode="linear",
                                                coordinate_transformation_mode="align_corners")),
    "nearest_2x": (dict(scale_factor=2.0, mode="nearest"),
                   resize(rand(2, 2, 3, 3), [1, 1, 2, 2],
                          coordinate_transformation_mode="asymmetric", nearest_mode="floor")),
    "bicubic_down": (dict(size=(3, 4), mode="bicubic", align_corners=False),
                     sized_resize(rand(2, 1, 5, 7), (3, 4), mode="cubic", cubic_coeff_a=-0.75,
                                  coordinate_transformation_mode="pytorch_half_pixel")),
}


@pytest.mark.parametrize("name", list(TORCH_RESIZES))
def test_resize_rule_matches_torch_autograd(name: str) -> None:
    """torch defines these resizes: its autograd is a reference independent of onnx's
    (whose align_corners differs from onnxruntime's and torch's at odd sizes)."""
    torch = pytest.importorskip("torch")
    kwargs, case = TORCH_RESIZES[name]
    gys = upstream(case)
    got = analytic(case, gys)["x"]
    x = torch.tensor(case.inputs["x"], dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.interpolate(x, **kwargs)
    assert tuple(y.shape) == gys["y"].shape
    (y * torch.tensor(gys["y"], dtype=torch.float64)).sum().backward()
    want = x.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_grouped_conv_transpose_rule_matches_torch_autograd() -> None:
    """onnx's reference evaluator cannot run a grouped ConvTranspose; torch's autograd
    of conv_transpose2d is the reference instead."""
    torch = pytest.importorskip("torch")
    case = conv_transpose(rand(2, 4, 3, 4), (4, 3, 3, 3), group=2, strides=[2, 2],
                          dilations=[2, 1], pads=[1, 0, 2, 1], output_padding=[1, 0])
    gys = upstream_by_torch(case, torch)
    got = analytic(case, gys)["x"]
    x = torch.tensor(case.inputs["x"], dtype=torch.float64, requires_grad=True)
    y = transposed_by_torch(case, x, torch)
    (y * torch.tensor(gys["y"], dtype=torch.float64)).sum().backward()
    want = x.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def transposed_by_torch(case: Case, x: object, torch: object) -> object:
    """The case's ConvTranspose in torch: its pads cropped off a padding-free result."""
    a = {attr.name: helper.get_attribute_value(attr) for attr in case.nodes[0].attribute}
    w = torch.tensor(case.consts["w"], dtype=torch.float64)
    y = torch.nn.functional.conv_transpose2d(x, w, stride=a["strides"], groups=a["group"],
                                             dilation=a["dilations"])
    top, left, bottom, right = a["pads"]
    extra_h, extra_w = a["output_padding"]
    y = torch.nn.functional.pad(y, (0, extra_w, 0, extra_h))
    return y[:, :, top : y.shape[2] - bottom, left : y.shape[3] - right]


def upstream_by_torch(case: Case, torch: object) -> dict[str, np.ndarray]:
    x = torch.tensor(case.inputs["x"], dtype=torch.float64)
    theirs = transposed_by_torch(case, x, torch).numpy()
    ours = cpu_session(forward_model(case).SerializeToString()).run(None, case.inputs)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # the same op
    return {"y": np.random.default_rng(1).standard_normal(theirs.shape).astype(np.float32)}


def test_resize_opset10_rule_matches_its_opset11_form() -> None:
    """onnx's reference cannot run Resize-10; its linear mode is 11's asymmetric one."""
    x = rand(2, 2, 3, 3)
    old = at_opset(10, unary("Resize", x, {"sc": np.float32([1, 1, 2, 3])}, ("sc",),
                             mode="linear"))
    new = resize(x, [1, 1, 2, 3], mode="linear", coordinate_transformation_mode="asymmetric")
    gys = upstream(new)
    want = numeric(new, gys)["x"]
    np.testing.assert_allclose(analytic(old, gys)["x"], want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_negative_computed_pads_match_crop_then_pad() -> None:
    """onnx's reference cannot pad by negative amounts: hold the rule against the
    same function written as a crop (Slice) and a positive Pad."""
    x = rand(2, 3, 5, 4)
    # H loses 1 row at the start and gains 3 at the end; W the reverse (+1, -2).
    negative = Case(
        [*shape_of(2, "h"), node("Sub", ["four_i", "h"], ("short",)),
         node("Mod", ["short", "four_i"], ("pad_h",)),
         node("Concat", ["begins", "pad_h", "pad_w"], ("p",), axis=0),
         node("Pad", ["x", "p"])],
        {"x": x},
        {"h_axis": np.int64(2), "zero_axis": ints(0), "four_i": ints(4),
         "begins": ints(0, 0, -1, 1, 0, 0), "pad_w": ints(-2)})
    cropped = Case(
        [node("Slice", ["x", "st", "en", "ax"], ("c",)), node("Pad", ["c", "p"])],
        {"x": x}, {"st": ints(1, 0), "en": ints(BIG, -2), "ax": ints(2, 3),
                   "p": ints(0, 0, 0, 1, 0, 0, 3, 0)})
    gys = upstream(cropped)
    want = numeric(cropped, gys)["x"]
    np.testing.assert_allclose(analytic(negative, gys)["x"], want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
