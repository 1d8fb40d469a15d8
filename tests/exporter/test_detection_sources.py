"""``trace_sources`` on a tiny graph picking scores as torchvision's detectors do (Split
off the background, flatten, TopK, a keep list, Concat of two levels): each final
score's traced position holds exactly that score, and is the one numpy picks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam.exporter.detection_sources import DETECTION_SOURCE, trace_sources
from onnxcam.runtime import cpu_session

ANCHORS, CLASSES, TOP = 6, 4, 5  # level 1: [6, 4] with background; level 2: [4, 3]


def picking_graph() -> onnx.ModelProto:
    ints = {"split": [1, CLASSES - 1], "flat": [-1], "top": [TOP], "pick": [2, 7]}
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Split", ["s", "split"], ["background", "fg"], axis=1),
        helper.make_node("Reshape", ["fg", "flat"], ["fg_flat"]),
        helper.make_node("TopK", ["fg_flat", "top"], ["best", "best_at"]),
        helper.make_node("Gather", ["best", "keep"], ["kept"]),  # NMS's keep list
        helper.make_node("Sigmoid", ["y"], ["t"]),
        helper.make_node("Reshape", ["t", "flat"], ["t_flat"]),
        helper.make_node("Gather", ["t_flat", "pick"], ["picked"]),
        helper.make_node("Concat", ["kept", "picked"], ["scores"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "picking",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ANCHORS, CLASSES]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3]),
         helper.make_tensor_value_info("keep", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [ANCHORS, CLASSES]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_each_final_score_is_traced_to_its_entry() -> None:
    model = picking_graph()
    starts = trace_sources(model.graph, "scores")
    assert starts == ["s", "t"]  # where picking starts, in the positions' order
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(ANCHORS, CLASSES)), rng.normal(size=(4, 3))
    keep = np.array([3, 0, 4], np.int64)
    feeds = {"x": x.astype(np.float32), "y": y.astype(np.float32), "keep": keep}
    session = cpu_session(model.SerializeToString())
    scores, sources, s, t = session.run(["scores", DETECTION_SOURCE, "s", "t"], feeds)
    np.testing.assert_array_equal(np.concatenate([s.ravel(), t.ravel()])[sources], scores)
    # numpy's own picking, in positions: foreground columns 1.., best TOP, kept; then 2, 7.
    foreground = np.arange(ANCHORS * CLASSES).reshape(ANCHORS, CLASSES)[:, 1:].ravel()
    best = foreground[np.argsort(-x[:, 1:].ravel(), kind="stable")[:TOP]]
    want = np.concatenate([best[keep], ANCHORS * CLASSES + np.array([2, 7])])
    np.testing.assert_array_equal(sources, want)
