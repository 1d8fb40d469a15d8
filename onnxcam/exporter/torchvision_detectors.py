"""torchvision's detectors as their users export them: ``torch.onnx.export(model,
([image],), path, dynamo=False)``, a rank-3 [3, H, W] image in, the model's own
resizing, decoding, NonMaxSuppression and TopK inside, and three outputs named by
numbers: boxes [D, 4], scores [D] and int64 labels [D] (in the dict's order).

The bundle's ``logits`` are the pre-suppression scores the final scores are picked
from (``detection_sources.trace_sources`` finds them): each such tensor ends in the
class axis (Faster R-CNN's softmax [R, K], SSD's [1, A, K], RetinaNet's and FCOS's
[A_l, K] per level), so all of them flattened and concatenated read as [A', K], and
the bundle's logits are that, transposed, as [1, K, A'], the layout of an anchors
bundle. A detection's source s is its entry (class s mod K, anchor s div K).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.detection_sources import trace_sources
from onnxcam.exporter.detectors import Detection
from onnxcam.exporter.layers import LayerInfo
from onnxcam.exporter.shapes import run_with_outputs
from onnxcam.graph import GraphBuilder, op_types, real_inputs

log = logging.getLogger(__name__)

PREFIX = "onnxcam/decoded"
LOGITS = f"{PREFIX}/logits"
SOURCES_FLAT = f"{PREFIX}/source_flat"
# The modules whose last child is the default layer, per family: the ResNet or
# MobileNet body under an FPN (Faster R-CNN, RetinaNet, FCOS) and SSDlite's features.
BACKBONES = ("backbone.body", "backbone.features")


def decoded_outputs(model: onnx.ModelProto) -> tuple[str, str, str] | None:
    """(boxes, scores, labels) of a graph that reads one rank-3 image and decodes its
    own detections, as torchvision's detectors export; else None."""
    graph = model.graph
    inputs = real_inputs(graph)
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 3 \
            or len(graph.output) != 3 \
            or "NonMaxSuppression" not in op_types(graph):
        return None
    found: dict[tuple[int, int], str] = {}
    for output in graph.output:
        kind = output.type.tensor_type
        found[(kind.elem_type, len(kind.shape.dim))] = output.name
    boxes = found.get((TensorProto.FLOAT, 2))
    scores = found.get((TensorProto.FLOAT, 1))
    labels = found.get((TensorProto.INT64, 1))
    if boxes is None or scores is None or labels is None:
        return None
    return boxes, scores, labels


def add_batch_axis(model: onnx.ModelProto) -> str:
    """Give the rank-3 [C, H, W] image input a batch axis of 1, which a Squeeze takes
    off again before the model reads it; return the new input's name."""
    graph = model.graph
    old = real_inputs(graph)[0]
    name = f"{old.name}_batched"
    dims = [d for d in old.type.tensor_type.shape.dim]
    added = helper.make_tensor_value_info(name, old.type.tensor_type.elem_type, [1])
    added.type.tensor_type.shape.dim.extend(dims)
    b = GraphBuilder(graph, f"{PREFIX}/input")
    squeezed = b.op("Squeeze", [name, b.const(np.asarray([0], np.int64), "axis0")])
    b.commit()
    for node in graph.node:
        node.input[:] = [squeezed if i == old.name else i for i in node.input]
    graph.input.remove(old)
    graph.input.insert(0, added)
    # The Squeeze came last; the graph reads it first.
    squeeze = graph.node.pop(len(graph.node) - 1)
    graph.node.insert(0, squeeze)
    return name


def expose_decoded(model: onnx.ModelProto, outputs: tuple[str, str, str],
                   sample: Callable[[], dict[str, np.ndarray]]) -> tuple[int, tuple[str, ...]]:
    """Add ``LOGITS`` [1, K, A'] (the traced score tensors, flattened, concatenated,
    class axis first) as the graph's only output, and the final detections with a batch
    axis beside it (left for ``expose_detections``); return K and those four tensors.

    ``sample`` gives feeds to learn the score tensors' shapes on. Precondition: the
    graph is topologically sorted and its input has its batch axis (``add_batch_axis``).
    """
    graph = model.graph
    boxes, scores, labels = outputs
    starts = trace_sources(graph, scores, SOURCES_FLAT)
    shapes = {name: value.shape for name, value in
              run_with_outputs(model, starts, sample(), lean=True).items()}
    classes = {shape[-1] if shape else 0 for shape in shapes.values()}
    if len(classes) != 1 or 0 in classes:
        raise UnsupportedModelError(
            "the detector's scores come from tensors whose last axes differ ("
            + ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
            + "); onnxcam reads them as [..., classes]")
    (count,) = classes
    b = GraphBuilder(graph, PREFIX)
    rows = b.const(np.asarray([-1, count], np.int64), "rows")
    flat = [b.op("Reshape", [start, rows]) for start in starts]
    joined = b.op("Concat", flat, axis=0) if len(flat) > 1 else flat[0]
    axis0 = b.const(np.asarray([0], np.int64), "axis0")
    b.nodes.append(helper.make_node("Unsqueeze", [b.op("Transpose", [joined], perm=[1, 0]),
                                                  axis0], [LOGITS], name=LOGITS))
    decoded = tuple(b.op("Unsqueeze", [name, axis0])
                    for name in (boxes, scores, labels, SOURCES_FLAT))
    b.commit()
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, None))
    log.info("detector: scores from %s, %d classes", ", ".join(starts), count)
    return count, decoded


def backbone_layer(layers: list[LayerInfo]) -> str:
    """The default layer: the last child module of ``backbone.body`` (Faster R-CNN,
    RetinaNet, FCOS: the ResNet's ``layer4``, the MobileNet's last block) or of
    ``backbone.features`` (SSDlite), the map pytorch-grad-cam's detection tutorials
    hook; "" where no layer carries those module paths."""
    for layer in reversed(layers):
        for path in layer.modules:
            parent, _, child = path.rpartition(".")
            if parent in BACKBONES and child and layer.spatial:
                return layer.name
    return ""


def torchvision_detection(model: onnx.ModelProto, layers: list[LayerInfo], classes: int,
                          decoded: tuple[str, ...]) -> Detection:
    """The detector's ``Detection``, after ``expose_decoded`` and the layers' listing
    (its default layer "" where ``backbone_layer`` finds none)."""
    layer = backbone_layer(layers)
    return Detection(LOGITS, classes, scores=LOGITS, layers=(layer,) if layer else (),
                     decoded=decoded)
