"""Tiny ONNX classifiers that bake batch 1 into a Reshape, built with onnx.helper, and
their Grad-CAM worked out from the source one image at a time (issue 10, item 1)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam.runtime import cpu_session

SIZE = 8
CHANNELS = 4
CLASSES = 5
RNG = np.random.default_rng(0)
CONV = RNG.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32)
DENSE = (RNG.normal(size=(CLASSES, CHANNELS * SIZE * SIZE)) * 0.1).astype(np.float32)


def reshape_model(mix: bool = False, allowzero: int = 0) -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> Conv -> Relu ("r", the layer) -> Reshape [1, -1] -> Gemm.

    ``mix`` puts a Transpose that moves the batch to axis 1 before the Reshape: at
    batch 1 the same numbers, at any other batch a mix of samples, so its batch
    cannot be freed.
    """
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    flat_input = "r"
    if mix:
        nodes.append(helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0, 2, 3]))
        flat_input = "t"
    nodes += [helper.make_node("Reshape", [flat_input, "shape"], ["f"], allowzero=allowzero),
              helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    target = [1, CHANNELS * SIZE * SIZE] if allowzero else [1, -1]
    graph = helper.make_graph(
        nodes, "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(CONV, "w"), numpy_helper.from_array(DENSE, "g"),
         numpy_helper.from_array(np.array(target, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def nchw_inputs(count: int) -> np.ndarray:
    return np.random.default_rng(count).normal(size=(count, 3, SIZE, SIZE)).astype(np.float32)


def per_image(model: onnx.ModelProto, inputs: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """``outputs`` of ``model`` run on each input alone (its own batch of 1), stacked."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in outputs:
        if name not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                    None))
    session = cpu_session(probe.SerializeToString())
    runs = [session.run(outputs, {"x": image[None]}) for image in inputs]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(outputs))]


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), np.uint8)


def unit_nchw(batch: np.ndarray) -> np.ndarray:
    """What a ``preprocess="unit"`` bundle feeds the model."""
    return np.ascontiguousarray((batch.astype(np.float32) / 255).transpose(0, 3, 1, 2))


def numpy_gradcam(model: onnx.ModelProto, batch: np.ndarray, targets: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and Grad-CAM of ``reshape_model`` from the source, one image at a time:
    the head is Dense on the flattened map (in the order the model flattens it), so
    d logit_k / d r is row k of the Dense weights laid out as the map."""
    logits, maps = per_image(model, unit_nchw(batch), ["y", "r"])
    cams = []
    for n, target in enumerate(targets):
        gradient = DENSE[target].reshape(CHANNELS, SIZE, SIZE)  # batch 1: any flatten order
        weights = gradient.mean(axis=(1, 2))
        cams.append(np.maximum(np.einsum("chw,c->hw", maps[n], weights), 0))
    return logits, np.array(cams)


def class_token_model() -> onnx.ModelProto:
    """A ViT-like head at batch 1: Conv -> Reshape [1, C, HW] -> Transpose -> Concat
    with a class token [1, 1, C] along the tokens -> ReduceMean -> Gemm."""
    token = np.random.default_rng(5).normal(size=(1, 1, CHANNELS)).astype(np.float32)
    dense = np.random.default_rng(6).normal(size=(CLASSES, CHANNELS)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "tokens_shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["class_token", "tokens"], ["all"], axis=1),
        helper.make_node("ReduceMean", ["all", "axes"], ["mean"], keepdims=0),
        helper.make_node("Gemm", ["mean", "g"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "class_token",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CLASSES])],
        [numpy_helper.from_array(CONV, "w"), numpy_helper.from_array(token, "class_token"),
         numpy_helper.from_array(dense, "g"),
         numpy_helper.from_array(np.array([1, CHANNELS, SIZE * SIZE], np.int64), "tokens_shape"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


SCORES = RNG.normal(size=(CLASSES, CHANNELS, 1, 1)).astype(np.float32)
UPSAMPLED = 2 * SIZE


def resize_model() -> onnx.ModelProto:
    """A segmenter as torch's dynamo exporter writes one at batch 1: x [1, 3, 8, 8] ->
    Conv -> Relu ("r", the layer) -> 1x1 Conv to the classes -> bilinear Resize to
    16x16 by the constant sizes [1, K, 16, 16] (batch included)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "s"], ["scores"]),
             helper.make_node("Resize", ["scores", "", "", "sizes"], ["y"], mode="linear",
                              coordinate_transformation_mode="half_pixel")]
    graph = helper.make_graph(
        nodes, "baked_resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       [1, CLASSES, UPSAMPLED, UPSAMPLED])],
        [numpy_helper.from_array(CONV, "w"), numpy_helper.from_array(SCORES, "s"),
         numpy_helper.from_array(np.array([1, CLASSES, UPSAMPLED, UPSAMPLED], np.int64),
                                 "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def upsample_reshape_model() -> onnx.ModelProto:
    """A detection head as ultralytics' static export writes one at batch 1: x [1, 3, 8, 8]
    -> Conv -> Relu ("r", the layer) -> nearest Resize by scales [1, 1, 2, 2] (shape
    inference loses the batch there) -> Reshape to [1, C, -1] -> 1x1 scores by MatMul."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Reshape", ["u", "flat"], ["f"]),
             helper.make_node("MatMul", ["head", "f"], ["y"])]
    graph = helper.make_graph(
        nodes, "baked_upsample",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       [1, CLASSES, UPSAMPLED * UPSAMPLED])],
        [numpy_helper.from_array(CONV, "w"),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
         numpy_helper.from_array(np.array([1, CHANNELS, -1], np.int64), "flat"),
         numpy_helper.from_array(SCORES[:, :, 0, 0], "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def region_gradcam(batch: np.ndarray, classes: list[list[int]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and Grad-CAM of ``resize_model`` for each image's classes, each over the
    pixels it wins, from the source one image at a time. Bilinear weights of each
    output pixel sum to 1, so d sum(mask * y_c) / d r_k sums to s[c, k] * |mask| over
    the layer's pixels: the channel weights are s[c, k] |mask| / (8 * 8)."""
    logits, maps = per_image(resize_model(), unit_nchw(batch), ["y", "r"])
    cams = []
    for n, wanted in enumerate(classes):
        winners = logits[n].argmax(axis=0)
        for cls in wanted:
            weights = SCORES[cls, :, 0, 0] * (winners == cls).sum() / (SIZE * SIZE)
            cams.append(np.maximum(np.einsum("chw,c->hw", maps[n], weights), 0))
    return logits, np.array(cams)
