"""Graph helpers (``onnxcam.graph``) on tiny hand-built graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from micrographs import info, init, model_of, run
from onnx import TensorProto, helper

from onnxcam.files import atomic_write
from onnxcam.graph import (
    GraphBuilder,
    forward_reachable,
    head_nodes,
    on_path,
    prune_unused,
    serialized_in_parts,
    shell_of,
    source_of,
    toposort,
    varint,
)


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


# --------------------------------------------------------------------------- head queries


def two_paths() -> onnx.GraphProto:
    """x -> relu a -> (b = a * w) -> y, with a shape branch s = Shape(a) -> reshape(y, s)
    and a dead branch a -> neg d."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Mul", ["a", "w"], ["b"], name="mul"),
        helper.make_node("Shape", ["a"], ["s"], name="shape"),
        helper.make_node("Reshape", ["b", "s"], ["y"], name="reshape"),
        helper.make_node("Neg", ["a"], ["d"], name="neg"),
        helper.make_node("Identity", ["y"], ["out"], name="out"),
    ]
    return helper.make_graph(nodes, "g", [info("x", [2])], [info("out", [2]), info("d", [2])],
                             [init("w", [2.0, 3.0])])


def test_head_nodes_are_the_nodes_between_start_and_end_in_order() -> None:
    graph = two_paths()
    assert [n.name for n in head_nodes(graph, "a", "y")] == ["mul", "reshape"]
    everything = head_nodes(graph, "a", "y", differentiable_only=False)
    assert [n.name for n in everything] == ["mul", "shape", "reshape"]
    assert on_path(graph, ["a"], "y") == {"a", "b", "y"}
    assert [n.name for n in head_nodes(graph, ["x", "a"], "y")] == ["relu", "mul", "reshape"]
    assert source_of(graph, "out") == "y"


def test_child_builder_names_never_collide_with_the_outer_graph() -> None:
    """A Loop body must not redefine what it reads from outside, nor the outside what
    the body defines: names made through either builder are unique across both."""
    graph = helper.make_graph([], "outer", [info("p/t_0", [1])], [])
    outer = GraphBuilder(graph, "p")
    made = [outer.fresh("t") for _ in range(3)]
    body = helper.make_graph([], "body", [], [])
    inner = outer.child(body, "p")  # the same prefix: only the shared names keep them apart
    made += [inner.fresh("t") for _ in range(3)]
    made += [outer.fresh("t") for _ in range(3)]
    assert "p/t_0" not in made
    assert len(set(made)) == len(made) == 9


def model_with_weights() -> onnx.ModelProto:
    """Two MatMuls by weights, one large, one held as float_data, not raw bytes; empty
    strings set explicitly (protobuf 2 keeps that apart from unset), and metadata."""
    rng = np.random.default_rng(3)
    large = rng.standard_normal((300, 200)).astype(np.float32)
    small = helper.make_tensor("small", TensorProto.FLOAT, [200, 4],
                               rng.standard_normal(800).astype(np.float32).tolist())
    model = model_of([helper.make_node("MatMul", ["x", "large"], ["h"]),
                      helper.make_node("MatMul", ["h", "small"], ["y"])],
                     [info("x", [None, 300])], [info("y", [None, 4])],
                     [init("large", large), small])
    model.graph.doc_string = ""
    model.doc_string, model.domain = "", ""
    model.metadata_props.add(key="k", value="v")
    return model


def test_serialized_in_parts_reads_back_as_the_model(tmp_path: Path) -> None:
    model = model_with_weights()
    parts = list(serialized_in_parts(model))
    assert len(parts) == 1 + 2 * len(model.graph.initializer)
    assert onnx.load_from_string(b"".join(parts)) == model
    atomic_write(tmp_path / "m.onnx", serialized_in_parts(model))
    assert onnx.load(str(tmp_path / "m.onnx")) == model


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**40 + 5])
def test_varint_is_protobufs(value: int) -> None:
    from google.protobuf.internal import encoder

    assert varint(value) == encoder._VarintBytes(value)


def test_shell_holds_all_but_the_weights() -> None:
    model = model_with_weights()
    shell = shell_of(model)
    assert not shell.graph.initializer
    shell.graph.initializer.extend(model.graph.initializer)
    assert shell == model
