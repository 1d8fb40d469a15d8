"""A tiny graph written as ultralytics exports YOLO (raw head, no NMS, one output
[N, 4 + K, A], its metadata), for the exporter's and the engine's detector tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam.runtime import cpu_session

SIZE, CLASSES, WIDTH = 16, 3, 4
ANCHORS = SIZE * SIZE + (SIZE // 2) ** 2  # a stride-1 and a stride-2 level
LABELS = ("cat", "dog", "owl")
METADATA = {"author": "Ultralytics", "task": "detect", "end2end": "False",
            "names": "{0: 'cat', 1: 'dog', 2: 'owl'}", "args": "{'nms': None}"}


def tiny_yolo(seed: int = 0, concat_boxes: bool = True,
              metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """A SiLU conv trunk (``/model.0``), a strided conv (``/model.1``) and a Detect
    head (``/model.2``) reading both: per level a 1x1 box conv and a 1x1 class conv,
    flattened over the anchors, a sigmoid on the classes, concatenated as ultralytics
    does ([boxes, scores] on axis 1); without ``concat_boxes`` the centres and sizes
    are separate parts of that Concat, as in no export, so the output must be sliced."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def conv(x: str, cin: int, cout: int, name: str, kernel: int = 1, stride: int = 1) -> str:
        w = const(f"{name}.w", rng.normal(0, 0.5, (cout, cin, kernel, kernel)).astype(np.float32))
        b = const(f"{name}.b", rng.normal(0, 0.1, cout).astype(np.float32))
        return node("Conv", [x, w, b], name, kernel_shape=[kernel, kernel],
                    pads=[kernel // 2] * 4, strides=[stride, stride])

    def silu(x: str, name: str) -> str:
        return node("Mul", [x, node("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")

    p1 = silu(conv("images", 3, WIDTH, "/model.0/conv/Conv", 3), "/model.0/act")
    p2 = silu(conv(p1, WIDTH, WIDTH, "/model.1/conv/Conv", 3, 2), "/model.1/act")
    flat = {rows: const(f"shape{rows}", np.array([0, rows, -1], np.int64))
            for rows in (4, CLASSES)}
    boxes, scores = [], []
    for level, x in enumerate((p1, p2)):
        box = conv(x, WIDTH, 4, f"/model.2/cv2.{level}/Conv")
        cls = conv(x, WIDTH, CLASSES, f"/model.2/cv3.{level}/Conv")
        boxes.append(node("Reshape", [box, flat[4]], f"/model.2/Reshape_{level}"))
        scores.append(node("Reshape", [cls, flat[CLASSES]], f"/model.2/Reshape_c{level}"))
    box = node("Concat", boxes, "/model.2/Concat", axis=2)
    box = node("Mul", [box, const("scale", np.array(4.0, np.float32))], "/model.2/Mul")
    score = node("Sigmoid", [node("Concat", scores, "/model.2/Concat_1", axis=2)],
                 "/model.2/Sigmoid")
    parts = [box] if concat_boxes else [
        node("Slice", [box, const(f"s{a}", np.array([a], np.int64)),
                       const(f"e{a}", np.array([a + 2], np.int64)),
                       const(f"x{a}", np.array([1], np.int64))], f"/model.2/Slice_{a}")
        for a in (0, 2)]
    nodes.append(helper.make_node("Concat", [*parts, score], ["output0"],
                                  name="/model.2/Concat_3", axis=1))
    graph = helper.make_graph(
        nodes, "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       ["batch", 4 + CLASSES, ANCHORS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8, producer_name="pytorch")
    for key, value in (METADATA if metadata is None else metadata).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def images(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), np.uint8)


def source_output(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    """The source model's own output on ``pixels`` (x / 255, NCHW)."""
    x = (pixels.astype(np.float32) / 255).transpose(0, 3, 1, 2)
    return cpu_session(model.SerializeToString()).run(None, {"images": x})[0]
