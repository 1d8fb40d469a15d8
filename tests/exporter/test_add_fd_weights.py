"""Finite-difference channel weights on tiny heads built in code: where the
perturbation starts, when the tail is affine, and the weights themselves against
float64 central differences in numpy."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from micrographs import draft_of, info, init, model_of, outputs_of
from onnx import helper, numpy_helper

import onnxcam.exporter.float64_tail as f64
import onnxcam.exporter.passes.add_fd_weights as fd
from onnxcam.bundle import INPUT_IMAGE, INPUT_TARGET, OUTPUT_ACTIVATIONS, OUTPUT_WEIGHTS
from onnxcam.errors import ExportError
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.passes import run_passes
from onnxcam.exporter.passes.add_fd_weights import (
    add_fd_weights,
    affine_tail,
    perturbation_point,
)
from onnxcam.exporter.passes.probe_head import probe_head
from onnxcam.exporter.pipeline import PASSES
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.graph import GraphBuilder

HEIGHT, WIDTH, CHANNELS, CLASSES = 3, 4, 5, 4
RNG = np.random.default_rng(11)
FC = RNG.normal(0, 1, (CLASSES, CHANNELS)).astype(np.float32)
BIAS = RNG.normal(0, 0.1, CLASSES).astype(np.float32)
MIX = RNG.normal(0, 1, (CHANNELS, 3, 1, 1)).astype(np.float32)  # 1x1 conv, 3 -> C channels


def shape(*dims: int) -> TensorShape:
    return TensorShape(tuple(dims), (True,) + (False,) * (len(dims) - 1))


# --------------------------------------------------------------------------- perturbation_point


def pooled_head(after_transpose: str | None) -> tuple[onnx.GraphProto, dict[str, TensorShape]]:
    """feat (NHWC) -> Transpose to NCHW [-> after_transpose] -> GAP -> Flatten -> Gemm,
    with the bundle's ``activations`` Identity also reading feat."""
    nodes = [helper.make_node("Identity", ["feat"], [OUTPUT_ACTIVATIONS],
                              name="onnxcam/activations"),
             helper.make_node("Transpose", ["feat"], ["t"], name="t", perm=[0, 3, 1, 2])]
    x = "t"
    if after_transpose:
        nodes.append(helper.make_node(after_transpose, ["t"], ["u"], name="u"))
        x = "u"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
              helper.make_node("Gemm", ["f", "fc", "bias"], ["s"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "head", [info("feat", ["N", HEIGHT, WIDTH, CHANNELS])],
                              [info("s", None)], [init("fc", FC), init("bias", BIAS)])
    shapes = {"feat": shape(1, HEIGHT, WIDTH, CHANNELS), "t": shape(1, CHANNELS, HEIGHT, WIDTH),
              "u": shape(1, CHANNELS, HEIGHT, WIDTH), "g": shape(1, CHANNELS, 1, 1),
              "f": shape(1, CHANNELS), "s": shape(1, CLASSES)}
    return graph, shapes


def test_perturbation_point_follows_a_uniform_shift_through_pooling() -> None:
    """A channel-uniform shift of feat (NHWC, channel axis 3) is the same shift of
    channel 1 after the Transpose, the pool and the Flatten."""
    graph, shapes = pooled_head(None)
    assert perturbation_point(graph, "feat", 3, shapes) == ("f", 1)


@pytest.mark.parametrize("op", ["Relu", "Tanh"])
def test_perturbation_point_stops_before_an_op_that_bends_the_shift(op: str) -> None:
    graph, shapes = pooled_head(op)
    assert perturbation_point(graph, "feat", 3, shapes) == ("t", 1)


def chain(*nodes: onnx.NodeProto, constants: tuple[onnx.TensorProto, ...] = ()
          ) -> onnx.GraphProto:
    """feat -> nodes, in order, with the bundle's ``activations`` Identity on feat."""
    marker = helper.make_node("Identity", ["feat"], [OUTPUT_ACTIVATIONS],
                              name="onnxcam/activations")
    return helper.make_graph([marker, *nodes], "chain", [info("feat", None)],
                             [info("s", None)], list(constants))


def test_perturbation_point_stops_before_layer_norm_over_channels() -> None:
    """ConvNeXt's head: GAP, channels last, LayerNorm over C. The shift passes the
    pool and the Transpose, never the normalisation: it mixes the channels."""
    graph = chain(helper.make_node("GlobalAveragePool", ["feat"], ["g"]),
                  helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 3, 1]),
                  helper.make_node("LayerNormalization", ["t", "gamma"], ["ln"], axis=-1),
                  helper.make_node("Flatten", ["ln"], ["s"], axis=1),
                  constants=(init("gamma", np.ones(CHANNELS)),))
    shapes = {"feat": shape(1, CHANNELS, HEIGHT, WIDTH), "g": shape(1, CHANNELS, 1, 1),
              "t": shape(1, 1, 1, CHANNELS), "ln": shape(1, 1, 1, CHANNELS),
              "s": shape(1, CHANNELS)}
    assert perturbation_point(graph, "feat", 1, shapes) == ("t", 3)


@pytest.mark.parametrize("op,attributes,out_dims", [
    ("Softmax", {"axis": 1}, (1, CHANNELS, HEIGHT, WIDTH)),  # mixes the channels
    ("GlobalAveragePool", {}, (1, CHANNELS, 1, 1)),  # channels last: pools over C
    ("ReduceMean", {"axes": [1, 3]}, (1, 1, WIDTH, 1)),  # reduces the channel axis
    ("Flatten", {"axis": 1}, (1, CHANNELS * HEIGHT * WIDTH)),  # merges C with space
    ("LRN", {"size": 3}, (1, CHANNELS, HEIGHT, WIDTH)),  # not on the list
])
def test_perturbation_point_refuses_what_is_not_channel_wise(
        op: str, attributes: dict, out_dims: tuple[int, ...]) -> None:
    """feat is [1, H, W, C] (channel axis 3) for the pool and the reduction, else
    [1, C, H, W]. The pool's output is given a lone axis of size C (as when H == C):
    matching sizes alone, as the shortcut once did, would follow it."""
    channels_last = op in ("GlobalAveragePool", "ReduceMean")
    dims = (1, HEIGHT, WIDTH, CHANNELS) if channels_last else (1, CHANNELS, HEIGHT, WIDTH)
    axis = 3 if channels_last else 1
    graph = chain(helper.make_node(op, ["feat"], ["s"], **attributes))
    shapes = {"feat": shape(*dims), "s": shape(*out_dims)}
    assert perturbation_point(graph, "feat", axis, shapes) == ("feat", axis)


def test_perturbation_point_passes_a_spatial_reduction_with_axes_as_input() -> None:
    """Opset 18's ReduceMean takes its axes as an input: read from the constant."""
    graph = chain(helper.make_node("ReduceMean", ["feat", "axes"], ["s"], keepdims=0),
                  constants=(init("axes", [2, 3], np.int64),))
    shapes = {"feat": shape(1, CHANNELS, HEIGHT, WIDTH), "s": shape(1, CHANNELS)}
    assert perturbation_point(graph, "feat", 1, shapes) == ("s", 1)


@pytest.mark.parametrize("nodes,affine", [
    ([("MatMul", ["f", "fc_t"])], True),
    ([("Mul", ["f", "scale"]), ("MatMul", ["m", "fc_t"])], True),
    ([("MatMul", ["f", "square"]), ("MatMul", ["m", "fc_t"])], True),
    ([("Transpose", ["f"]), ("MatMul", ["f", "m"])], False),  # f f^T: a product of two
    ([("Mul", ["f", "f"]), ("MatMul", ["m", "fc_t"])], False),  # a square
    ([("Div", ["scale", "f"]), ("MatMul", ["m", "fc_t"])], False),  # 1 / f
    ([("Softmax", ["f"]), ("MatMul", ["m", "fc_t"])], False),  # not on the list
])
def test_affine_in_follows_what_depends_on_the_point(nodes: list, affine: bool) -> None:
    """Each node writes ``m``, the last one ``s``."""
    made = [helper.make_node(op, inputs, ["m" if i < len(nodes) - 1 else "s"])
            for i, (op, inputs) in enumerate(nodes)]
    assert fd.affine_in(made, "f") is affine


def test_affine_tail_is_gemm_alone() -> None:
    graph, shapes = pooled_head(None)
    assert affine_tail(graph, "f", "s", shapes, 1) is True
    assert affine_tail(graph, "t", "s", shapes, 1) is False  # a map, not a vector
    bent = helper.make_graph(
        [helper.make_node("Relu", ["f"], ["r"]),
         helper.make_node("Gemm", ["r", "fc", "bias"], ["s"], transB=1)],
        "bent", [info("f", None)], [info("s", None)], [init("fc", FC), init("bias", BIAS)])
    assert affine_tail(bent, "f", "s", shapes, 1) is False
    reads_more = helper.make_graph(
        [helper.make_node("Add", ["f", "other"], ["sum"]),
         helper.make_node("Gemm", ["sum", "fc", "bias"], ["s"], transB=1)],
        "reads_more", [info("f", None), info("other", None)], [info("s", None)],
        [init("fc", FC), init("bias", BIAS)])
    assert affine_tail(reads_more, "f", "s", {**shapes, "other": shape(1, CHANNELS)}, 1) is False


# --------------------------------------------------------------------------- the weights


def classifier(op: str | None) -> onnx.ModelProto:
    """NCHW x (3 channels) -> 1x1 conv to C -> feat [-> op] -> GAP -> Flatten -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "mix"], ["feat"], name="conv")]
    x = "feat"
    if op:
        nodes.append(helper.make_node(op, ["feat"], ["bent"], name="bend"))
        x = "bent"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat", "fc", "bias"], ["scores"], name="fc",
                               transB=1)]
    return model_of(nodes, [info("x", ["N", 3, HEIGHT, WIDTH])], [info("scores", ["N", CLASSES])],
                    [init("mix", MIX), init("fc", FC), init("bias", BIAS)])


def head_in_numpy(op: str | None, feat: np.ndarray) -> np.ndarray:
    """The scores from feat [B, C, H, W] in float64."""
    bent = {None: lambda a: a, "Tanh": np.tanh, "Sigmoid": lambda a: 1 / (1 + np.exp(-a))}[op]
    return bent(feat).mean(axis=(2, 3)) @ FC.T.astype(np.float64) + BIAS


def fd_draft(op: str | None, opset: int = 17) -> Draft:
    model = classifier(op)
    model.opset_import[0].version = opset  # every op here reads the same in 17 and 18
    draft = draft_of(model, "nchw", [("feat", "nchw")], (HEIGHT, WIDTH, 3), gradient="fd")
    return run_passes(draft, PASSES[: PASSES.index(probe_head) + 1])


def reference_weights(op: str | None, feat: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """weights[n, k] = d score / d (all of channel k) / (H W), by float64 central
    differences, far more exact than the bundle's float32 forward differences."""
    weights = np.zeros((len(feat), CHANNELS))
    for n in range(len(feat)):
        step = 1e-6 * float(np.abs(feat[n]).mean())
        for k in range(CHANNELS):
            moved = np.zeros_like(feat[n : n + 1])
            moved[:, k] = step
            plus = head_in_numpy(op, feat[n : n + 1] + moved)[0, chosen[n]]
            minus = head_in_numpy(op, feat[n : n + 1] - moved)[0, chosen[n]]
            weights[n, k] = (plus - minus) / (2 * step) / (HEIGHT * WIDTH)
    return weights


def run_weights(draft: Draft, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    images = np.random.default_rng(seed).integers(0, 256, (3, HEIGHT, WIDTH, 3), np.uint8)
    target = np.array([-1, 0, CLASSES - 1], np.int64)
    got = outputs_of(draft.model, {INPUT_IMAGE: images, INPUT_TARGET: target})
    return got, np.where(target < 0, got["logits"].argmax(axis=1), target)


def test_affine_tail_slopes_are_exact() -> None:
    """GAP then Gemm: the slopes come from the unit basis, exactly FC[t] / (H W)."""
    draft = fd_draft(None)
    assert add_fd_weights(draft) is True
    assert (draft.gradient, draft.fd_step, draft.fd_chunk) == ("fd", 1.0, 0)
    assert not any(node.op_type == "Loop" for node in draft.graph.node)
    got, chosen = run_weights(draft, seed=1)
    np.testing.assert_allclose(got[OUTPUT_WEIGHTS], FC[chosen] / (HEIGHT * WIDTH), rtol=1e-5)
    feat = got[OUTPUT_ACTIVATIONS].astype(np.float64)
    np.testing.assert_allclose(got[OUTPUT_WEIGHTS], reference_weights(None, feat, chosen),
                               rtol=1e-5)


@pytest.mark.parametrize("op,opset", [("Tanh", 17), ("Sigmoid", 17), ("Tanh", 18)])
def test_loop_slopes_match_float64_differences(op: str, opset: int) -> None:
    """A head bent before the pool: the Loop moves each channel of the map in turn,
    and the tail (Tanh or Sigmoid, GAP as a ReduceMean, with its axes as an input
    from opset 18, then Gemm) runs in float64."""
    draft = fd_draft(op, opset)
    assert add_fd_weights(draft) is True
    assert (draft.fd_step, draft.fd_chunk) == (fd.STEP_FLOAT64, 1)
    assert any(node.op_type == "Loop" for node in draft.graph.node)
    got, chosen = run_weights(draft, seed=2)
    feat = got[OUTPUT_ACTIVATIONS].astype(np.float64)
    want = reference_weights(op, feat, chosen)
    # Central differences in float64: only the float32 output rounds.
    np.testing.assert_allclose(got[OUTPUT_WEIGHTS], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_float32_fallback_when_an_op_lacks_a_double_kernel(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Without a float64 kernel for Tanh the tail stays float32, with a larger step:
    central differences are then second-order, within 1e-4 of the scale here."""
    monkeypatch.setattr(f64, "DOUBLE_OPS", f64.DOUBLE_OPS - {"Tanh"})
    draft = fd_draft("Tanh")
    assert add_fd_weights(draft) is True
    assert draft.fd_step == fd.STEP_FLOAT32
    got, chosen = run_weights(draft, seed=3)
    want = reference_weights("Tanh", got[OUTPUT_ACTIVATIONS].astype(np.float64), chosen)
    assert np.abs(got[OUTPUT_WEIGHTS] - want).max() <= 1e-4 * np.abs(want).max()


def test_add_fd_weights_twice_changes_nothing() -> None:
    draft = fd_draft("Tanh")
    assert add_fd_weights(draft) is True
    before = draft.model.SerializeToString(deterministic=True)
    assert add_fd_weights(draft) is False
    assert draft.model.SerializeToString(deterministic=True) == before


# --------------------------------------------------------------------------- float64


def double_model(nodes: list[onnx.NodeProto], inputs: list[str],
                 constants: list[onnx.TensorProto], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [info(name, None, onnx.TensorProto.DOUBLE)
                                           for name in inputs],
                              [info("y", None, onnx.TensorProto.DOUBLE)], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8)


def _d(*dims: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0.5, 1.5, dims)


def _i(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


# One float64 use of each op in DOUBLE_OPS: (attributes, extra inputs); x is [2, 3, 4, 4].
DOUBLE_CASES: dict[str, tuple[dict, list[np.ndarray]]] = {
    "Gemm": ({}, [_d(48, 3)]), "MatMul": ({}, [_d(4, 2)]), "Add": ({}, [_d(4)]),
    "Sub": ({}, [_d(4)]), "Mul": ({}, [_d(4)]), "Div": ({}, [_d(4)]), "Pow": ({}, [_d(4)]),
    "Max": ({}, [_d(4)]), "Min": ({}, [_d(4)]), "Sum": ({}, [_d(4)]), "Relu": ({}, []),
    "Sigmoid": ({}, []), "Tanh": ({}, []), "Exp": ({}, []), "Log": ({}, []), "Sqrt": ({}, []),
    "Neg": ({}, []), "Abs": ({}, []), "Reciprocal": ({}, []), "LeakyRelu": ({}, []),
    "Softmax": ({"axis": 1}, []), "LogSoftmax": ({"axis": 1}, []), "Identity": ({}, []),
    "Dropout": ({}, []), "Flatten": ({}, []), "Transpose": ({"perm": [0, 2, 3, 1]}, []),
    "MaxPool": ({"kernel_shape": [2, 2]}, []), "ReduceMean": ({"axes": [1]}, []),
    "ReduceMax": ({"axes": [1]}, []), "ReduceSum": ({}, [_i(1)]), "ReduceL2": ({"axes": [1]}, []),
    "BatchNormalization": ({}, [_d(3), _d(3), _d(3), _d(3)]),
    "LayerNormalization": ({"axis": 1}, [_d(3, 4, 4), _d(3, 4, 4)]),
    "Clip": ({}, [np.asarray(0.7), np.asarray(1.2)]), "Reshape": ({}, [_i(2, -1)]),
    "Squeeze": ({}, [np.zeros(0, np.int64)]), "Unsqueeze": ({}, [_i(0)]),
    "Expand": ({}, [_i(2, 3, 4, 4)]), "Concat": ({"axis": 1}, [_d(2, 1, 4, 4)]),
    "Slice": ({}, [_i(0), _i(1), _i(1)]), "Gather": ({"axis": 1}, [_i(0, 2)]),
    "Pad": ({}, [_i(0, 0, 1, 1, 0, 0, 1, 1)]), "Tile": ({}, [_i(1, 1, 1, 2)]),
    "Einsum": ({"equation": "nchw,nchw->nc"}, [_d(2, 3, 4, 4)]),
    "Cast": ({"to": onnx.TensorProto.DOUBLE}, []), "PRelu": ({}, [_d(3, 1, 1)]),
    "Split": ({"axis": 1}, [_i(1, 2)]), "CastLike": ({}, [_d(1)]),
    "GatherElements": ({"axis": 1}, [np.zeros((2, 1, 4, 4), np.int64)]),
    "Where": ({}, []),  # condition from Greater, below
    "Constant": ({}, []), "ConstantOfShape": ({}, []), "Shape": ({}, []),
}


@pytest.mark.parametrize("op", sorted(f64.DOUBLE_OPS))
def test_double_ops_have_float64_kernels(op: str) -> None:
    """Every op the fd tail may run in float64 has an onnxruntime CPU kernel for it."""
    attributes, extra = DOUBLE_CASES[op]
    names = [f"k{i}" for i in range(len(extra))]
    constants = [numpy_helper.from_array(value, name) for value, name in zip(extra, names)]
    nodes = [helper.make_node(op, ["x", *names], ["y"] + (["z"] if op == "Split" else []),
                              **attributes)]
    if op == "Gemm":  # on a matrix
        nodes = [helper.make_node("Flatten", ["x"], ["flat"]),
                 helper.make_node("Gemm", ["flat", *names], ["y"])]
    elif op == "Where":
        nodes = [helper.make_node("Greater", ["x", "x"], ["b"]),
                 helper.make_node("Where", ["b", "x", "x"], ["y"])]
    elif op in ("Constant", "ConstantOfShape", "Shape"):
        made = {"Constant": helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                    np.asarray(1.0))),
                "ConstantOfShape": helper.make_node(
                    "ConstantOfShape", ["shape"], ["c"],
                    value=numpy_helper.from_array(np.asarray([1.0]))),
                "Shape": helper.make_node("Cast", ["shape"], ["c"], to=onnx.TensorProto.DOUBLE)}
        nodes = [helper.make_node("Shape", ["x"], ["shape"]), made[op],
                 helper.make_node("Add", ["x", "c"] if op != "Shape" else ["c", "c"], ["y"])]
    model = double_model(nodes, ["x"], constants)
    outputs_of(model, {"x": _d(2, 3, 4, 4)})


def expanded_values(op: str, x: np.ndarray, **attributes: float) -> np.ndarray:
    """``expanded64`` of ``op`` on float64 x, run by onnxruntime."""
    graph = helper.make_graph([], "g", [info("x", None, onnx.TensorProto.DOUBLE)],
                              [info("y", None, onnx.TensorProto.DOUBLE)])
    b = GraphBuilder(graph, "t")
    result = f64.expanded64(b, helper.make_node(op, ["x"], ["unused"], **attributes), "x")
    b.nodes.append(helper.make_node("Identity", [result], ["y"]))
    b.commit()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return outputs_of(model, {"x": x})["y"]


@pytest.mark.parametrize("op", ["Erf", "Gelu"])
def test_float64_erf_and_gelu_have_erfs_derivative(op: str) -> None:
    """What fd needs of the float64 Erf is its slope: float64 central differences of
    it within 1e-4 of erf' = 2/sqrt(pi) exp(-x^2) (GELU's likewise) over [-6, 6]."""
    x = np.linspace(-6, 6, 4001)
    step = 1e-6
    slope = (expanded_values(op, x + step) - expanded_values(op, x - step)) / (2 * step)
    erf = np.vectorize(math.erf)
    if op == "Erf":
        want = erf(x)
        want_slope = 2 / math.sqrt(math.pi) * np.exp(-x * x)
    else:  # x Phi(x), Phi the normal CDF; its slope Phi(x) + x phi(x)
        want = 0.5 * x * (1 + erf(x / math.sqrt(2)))
        want_slope = 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(
            2 * math.pi)
    assert np.abs(expanded_values(op, x) - want).max() < 1e-5
    assert np.abs(slope - want_slope).max() < 1e-4


@pytest.mark.parametrize("op,attributes,want", [
    ("HardSigmoid", {"alpha": 0.25, "beta": 0.375}, lambda x: np.clip(x / 4 + 0.375, 0, 1)),
    ("HardSigmoid", {}, lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    ("HardSwish", {}, lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
])
def test_float64_hard_activations(op: str, attributes: dict, want: Callable) -> None:
    """Against their ONNX definitions in numpy, attributes (float32 in the node, so
    exact binary fractions here) and defaults alike."""
    x = np.linspace(-8, 8, 1601)
    np.testing.assert_allclose(expanded_values(op, x, **attributes), want(x), atol=1e-15)


def test_fd_is_refused_past_its_cost_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tail costs (C + 1) evaluations; past MAX_FD_MACS the export says what to do."""
    monkeypatch.setattr(fd, "MAX_FD_MACS", 10)
    with pytest.raises(ExportError, match="later --layer"):
        add_fd_weights(fd_draft("Tanh"))


@pytest.mark.parametrize("attributes,weight_dims,bias", [
    ({"pads": [1, 1, 1, 1]}, (6, 4, 3, 3), True),
    ({"strides": [2, 2], "pads": [0, 1, 2, 0]}, (6, 4, 3, 2), True),
    ({"dilations": [2, 1], "pads": [2, 1, 2, 1]}, (5, 4, 3, 3), False),
    ({"group": 2, "strides": [1, 2]}, (6, 2, 2, 2), True),
    ({"group": 4, "pads": [1, 1, 1, 1]}, (4, 1, 3, 3), True),  # depthwise
    ({}, (3, 4, 1, 1), False),
])
def test_float64_conv_matches_onnxruntimes_conv(attributes: dict,
                                                weight_dims: tuple[int, ...], bias: bool) -> None:
    """``conv64`` (im2col and MatMul in float64) against onnxruntime's own float32
    Conv on the same values: strides, asymmetric pads, dilations, groups."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (2, 4, 7, 6)).astype(np.float32)
    weight = rng.normal(0, 1, weight_dims).astype(np.float32)
    offset = rng.normal(0, 1, weight_dims[0]).astype(np.float32)
    inputs = ["x", "w", "bias"] if bias else ["x", "w"]
    conv = helper.make_node("Conv", inputs, ["y"], **attributes)
    constants = [init("w", weight), init("bias", offset)]
    want = outputs_of(model_of([conv], [info("x", list(x.shape))], [info("y", None)],
                               constants), {"x": x})["y"]
    shapes = {"x": TensorShape(x.shape, (True, False, False, False)),
              "w": TensorShape(weight.shape, (False,) * 4),
              "y": TensorShape(want.shape, (True, False, False, False))}
    graph = helper.make_graph([], "g", [info("x", None, onnx.TensorProto.DOUBLE)],
                              [info("out", None, onnx.TensorProto.DOUBLE)],
                              [init("w", weight, np.float64), init("bias", offset, np.float64)])
    b = GraphBuilder(graph, "t")
    assert f64.conv64_applies(conv, shapes)
    result = f64.conv64(b, conv, "x", "w", "bias" if bias else "", shapes)
    b.nodes.append(helper.make_node("Identity", [result], ["out"]))
    b.commit()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    got = outputs_of(model, {"x": x.astype(np.float64)})["out"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
