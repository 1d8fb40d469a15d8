"""Graph helpers (``onnxcam.graph``) and the simple passes, on tiny hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.bundle import INPUT_IMAGE, OUTPUT_ACTIVATIONS, OUTPUT_LOGITS, PREPROCESS_MODES
from onnxcam.exporter.passes.embed_preprocessing import embed_preprocessing
from onnxcam.exporter.passes.linearize_logits import linearize_logits
from onnxcam.exporter.preprocess import preprocess_numpy
from onnxcam.graph import forward_reachable, prune_unused, toposort
from onnxcam.runtime import cpu_session

OPSET = 17


def info(name: str, shape: list | None = None, dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def model_of(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return cpu_session(model.SerializeToString()).run(None, feeds)


def assert_sorted(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    for n in graph.node:
        missing = set(n.input) - available
        assert not missing, f"{n.name} reads {missing} before they are made"
        available.update(n.output)


# --------------------------------------------------------------------------- toposort


def diamond() -> onnx.ModelProto:
    """x -> relu a -> neg b; c = a + b; k (Constant); y = c * k * w."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Add", ["a", "b"], ["c"], name="add"),
        helper.make_node("Constant", [], ["k"], name="const", value=init("kv", 2.0)),
        helper.make_node("Mul", ["c", "k"], ["d"], name="mul"),
        helper.make_node("Mul", ["d", "w"], ["y"], name="mul_w"),
    ]
    return model_of(nodes, [info("x", ["N", 3])], [info("y", ["N", 3])], [init("w", [1, 2, 3])])


def test_toposort_orders_shuffled_nodes() -> None:
    model = diamond()
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    (want,) = run(model, {"x": x})
    order = [5, 2, 4, 1, 3, 0]
    shuffled = [model.graph.node[i] for i in order]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    with pytest.raises(AssertionError):
        assert_sorted(model.graph)
    toposort(model.graph)
    assert_sorted(model.graph)
    assert sorted(n.name for n in model.graph.node) == sorted(n.name for n in diamond().graph.node)
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(run(model, {"x": x})[0], want)


def test_toposort_keeps_a_sorted_graph_as_is() -> None:
    model = diamond()
    before = [n.name for n in model.graph.node]
    toposort(model.graph)
    assert [n.name for n in model.graph.node] == before


def test_toposort_places_subgraph_readers_after_their_outer_producers() -> None:
    """An If whose branches read ``a`` from the outer scope must follow a's producer."""
    branch = helper.make_graph([helper.make_node("Neg", ["a"], ["out"])], "branch", [],
                               [info("out", None)])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch,
                         else_branch=branch),
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
    ]
    model = model_of(nodes, [info("x", [2]), info("cond", [], TensorProto.BOOL)],
                     [info("y", None)])
    toposort(model.graph)
    assert [n.name for n in model.graph.node] == ["relu", "if"]


def test_toposort_rejects_missing_inputs_and_cycles() -> None:
    missing = model_of([helper.make_node("Relu", ["nowhere"], ["y"])], [info("x", [1])],
                       [info("y", [1])])
    with pytest.raises(ValueError, match="nowhere"):
        toposort(missing.graph)
    cycle = model_of([helper.make_node("Add", ["x", "b"], ["a"]),
                      helper.make_node("Relu", ["a"], ["b"])], [info("x", [1])],
                     [info("b", [1])])
    with pytest.raises(ValueError):
        toposort(cycle.graph)


# --------------------------------------------------------------------------- prune_unused


def test_prune_unused_drops_dead_branch_and_its_initializer() -> None:
    nodes = [
        helper.make_node("Add", ["x", "live_w"], ["a"], name="live_add"),
        helper.make_node("Mul", ["x", "dead_w"], ["d1"], name="dead_mul"),
        helper.make_node("Neg", ["d1"], ["d2"], name="dead_neg"),
        helper.make_node("Relu", ["a"], ["y"], name="live_relu"),
    ]
    model = model_of(nodes, [info("x", ["N", 2])], [info("y", ["N", 2])],
                     [init("live_w", [1, 2]), init("dead_w", [3, 4])])
    assert prune_unused(model.graph) == 2
    assert [n.name for n in model.graph.node] == ["live_add", "live_relu"]
    assert [i.name for i in model.graph.initializer] == ["live_w"]
    onnx.checker.check_model(model)
    assert prune_unused(model.graph) == 0


def test_prune_unused_keeps_what_subgraphs_read() -> None:
    branch = helper.make_graph([helper.make_node("Add", ["x", "inner_w"], ["out"])], "branch",
                               [], [info("out", None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch,
                              else_branch=branch)]
    model = model_of(nodes, [info("x", [2]), info("cond", [], TensorProto.BOOL)],
                     [info("y", None)], [init("inner_w", [1, 2]), init("unused", [0.0])])
    assert prune_unused(model.graph) == 0
    assert [i.name for i in model.graph.initializer] == ["inner_w"]


# --------------------------------------------------------------------------- forward_reachable


def test_forward_reachable_stops_at_shape_and_index_ops() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["zeros"]),
        helper.make_node("Reshape", ["r", "s"], ["reshaped"]),
        helper.make_node("Add", ["zeros", "w"], ["only_from_shape"]),
        helper.make_node("Cast", ["r"], ["as_int"], to=TensorProto.INT64),
        helper.make_node("Cast", ["as_int"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["r"], ["as_double"], to=TensorProto.DOUBLE),
        helper.make_node("MaxPool", ["r"], ["pooled", "indices"], kernel_shape=[2]),
        helper.make_node("Split", ["r"], ["s0", "s1"], axis=1, num_outputs=2),
        helper.make_node("ArgMax", ["r"], ["arg"], axis=1),
    ]
    graph = helper.make_graph(nodes, "g", [info("x", [1, 2, 4])], [], [init("w", [1.0])])
    reached = forward_reachable(graph, "x")
    assert {"x", "r", "reshaped", "as_double", "pooled", "s0", "s1"} <= reached
    for cut in ("s", "zeros", "only_from_shape", "as_int", "back", "indices", "arg", "w"):
        assert cut not in reached, cut
    everything = forward_reachable(graph, "x", differentiable_only=False)
    assert {"s", "zeros", "only_from_shape", "as_int", "back", "indices", "arg"} <= everything
    assert "w" not in everything


# --------------------------------------------------------------------------- linearize_logits


W = np.array([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]], np.float32)
B = np.array([0.1, -0.2, 0.3], np.float32)
X = np.array([[0.5, -1.5], [2.0, 1.0]], np.float32)


def classifier(head: str | None, with_activations: bool = False) -> onnx.ModelProto:
    """x -> Gemm -> scores [-> head -> squashed -> Identity -> probs]."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["scores"])]
    out = "scores"
    if head:
        nodes += [helper.make_node(head, ["scores"], ["squashed"]),
                  helper.make_node("Identity", ["squashed"], ["probs"])]
        out = "probs"
    outputs = [info(out, ["N", 3])]
    if with_activations:
        nodes.append(helper.make_node("Identity", ["x"], [OUTPUT_ACTIVATIONS]))
        outputs.insert(0, info(OUTPUT_ACTIVATIONS, ["N", 2]))
    return model_of(nodes, [info("x", ["N", 2])], outputs,
                    [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")])


@pytest.mark.parametrize("head", ["Softmax", "Sigmoid", "LogSoftmax"])
def test_linearize_logits_removes_terminal_squashing(head: str) -> None:
    model = classifier(head, with_activations=True)
    result, removed = linearize_logits(model)
    assert removed == head
    assert [o.name for o in result.model.graph.output] == [OUTPUT_LOGITS, OUTPUT_ACTIVATIONS]
    logits, activations = run(result.model, {"x": X})
    np.testing.assert_allclose(logits, X @ W + B, rtol=1e-6)
    np.testing.assert_array_equal(activations, X)


def test_linearize_logits_without_squashing_keeps_the_scores() -> None:
    result, removed = linearize_logits(classifier(None))
    assert removed == ""
    assert [o.name for o in result.model.graph.output] == [OUTPUT_LOGITS]
    (logits,) = run(result.model, {"x": X})
    np.testing.assert_allclose(logits, X @ W + B, rtol=1e-6)


# --------------------------------------------------------------------------- embed_preprocessing


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_embed_preprocessing_matches_numpy(mode: str, layout: str) -> None:
    h, w, c = 4, 5, 3
    shape = ["N", h, w, c] if layout == "nhwc" else ["N", c, h, w]
    model = model_of([helper.make_node("Identity", ["x"], ["y"])], [info("x", shape)],
                     [info("y", shape)])
    result = embed_preprocessing(model, mode, layout, h, w, c)
    graph = result.model.graph
    assert [i.name for i in graph.input] == [INPUT_IMAGE]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    onnx.checker.check_model(result.model)
    images = np.random.default_rng(3).integers(0, 256, (2, h, w, c), dtype=np.uint8)
    images[0, 0, 0] = [0, 128, 255]  # distinct channels, so a channel flip cannot hide
    (got,) = run(result.model, {INPUT_IMAGE: images})
    want = preprocess_numpy(images, mode)
    if layout == "nchw":
        want = want.transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=3e-5)
