"""Detectors the exporter knows: ultralytics' YOLO export (raw head, no NMS in the graph),
whose one output [N, 4 + K, A] holds each anchor's box (cx, cy, w, h in input pixels)
and then its K class scores (the sigmoid applied)."""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass

import onnx

from onnxcam.bundle import RESIZE_LETTERBOX
from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.layers import LayerInfo
from onnxcam.graph import producers

log = logging.getLogger(__name__)

BOX_ROWS = 4  # cx, cy, w, h, before the class scores on axis 1


@dataclass(frozen=True)
class Detection:
    """Where a detector's class scores [N, K, A] and boxes [N, 4, A] (cx, cy, w, h) are,
    or (``decoded``) the final detections of one that decodes its own.

    ``scores`` and ``boxes`` name the tensors the model concatenates into its output,
    or are empty where the output is to be sliced instead. ``layers`` are the default
    target layers (``LayerInfo.name``s), the map each level of the head reads, finest
    first; empty when they could not be found. ``resize``
    is how the model's users bring an image to its size (a ``bundle.RESIZE_MODES``).
    """

    output: str
    classes: int
    labels: tuple[str, ...] = ()
    scores: str = ""
    boxes: str = ""
    layers: tuple[str, ...] = ()
    resize: str = "bilinear"
    # A detector that decodes its own detections: the tensors that become the bundle's
    # ``DECODED_OUTPUTS`` (boxes, scores, labels, sources; each with a batch axis of 1).
    decoded: tuple[str, ...] = ()


def ultralytics_metadata(model: onnx.ModelProto) -> dict[str, str] | None:
    """The metadata of an ultralytics detection export, else None."""
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("author") != "Ultralytics" or props.get("task") != "detect":
        return None
    return props


def labels_of(props: dict[str, str]) -> tuple[str, ...]:
    """The class names ultralytics writes as a Python dict literal, by index."""
    try:
        names = ast.literal_eval(props.get("names", "{}"))
    except (ValueError, SyntaxError):
        return ()
    if not isinstance(names, dict) or sorted(names) != list(range(len(names))):
        return ()
    return tuple(str(names[index]) for index in range(len(names)))


def find_detection(model: onnx.ModelProto, layers: list[LayerInfo], props: dict[str, str]
                   ) -> Detection:
    """The output of an ultralytics detector (``props``, its ``ultralytics_metadata``),
    after ``prepare`` kept one output and listed ``layers`` (each node's first output
    with its shape at the probe batch). An export with NMS in the graph, or an NMS-free
    end-to-end head, is refused: its boxes are already chosen, and their scores are no
    longer a tensor the graph computes per anchor.
    """
    output = model.graph.output[0].name
    shapes = {layer.tensor: layer.shape for layer in layers}
    shape = shapes.get(output, ())
    if props.get("end2end") == "True" or "'nms': True" in props.get("args", "") \
            or len(shape) != 3 or shape[1] is None:
        raise UnsupportedModelError(
            f"the ultralytics detector's output {output} has shape {list(shape)}: its "
            "detections are chosen in the graph (nms=True, or an end-to-end head); "
            "export it with model.export(format='onnx', nms=False), and end2end=False "
            "where the model has an NMS-free head")
    classes = shape[1] - BOX_ROWS
    labels = labels_of(props)
    if labels and len(labels) != classes:
        log.warning("the model's metadata names %d classes, its output holds %d; "
                    "names ignored", len(labels), classes)
        labels = ()
    scores, boxes = concatenated_parts(model.graph, output, shapes)
    # ultralytics' predict letterboxes every image (LetterBox, centred, grey 114).
    return Detection(output, classes, labels, scores, boxes, default_layers(model.graph, layers),
                     RESIZE_LETTERBOX)


def concatenated_parts(graph: onnx.GraphProto, output: str,
                       shapes: dict[str, tuple[int | None, ...]]) -> tuple[str, str]:
    """(scores, boxes) where ``output`` is a Concat on axis 1 of box rows (4 in all)
    then the scores, as ultralytics writes it ([boxes, scores]); boxes is "" where the
    box rows come in several parts (the output is sliced for them then). ("", "") for
    any other output. Taking the scores from before the Concat keeps the box branch
    out of the head, and out of its backward pass."""
    node = producers(graph).get(output)
    if node is None or node.op_type != "Concat" or len(node.input) < 2:
        return "", ""
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    parts = [shapes.get(name, ()) for name in node.input[:-1]]
    if axis not in (1, -2) or any(len(part) != 3 or part[1] is None for part in parts) or \
            sum(part[1] or 0 for part in parts) != BOX_ROWS:
        return "", ""
    return node.input[-1], node.input[0] if len(parts) == 1 else ""


def default_layers(graph: onnx.GraphProto, layers: list[LayerInfo]) -> tuple[str, ...]:
    """The maps the Detect head reads, finest first: the neck's outputs at strides 8,
    16 and 32 (YOLOv8's ``model.15``, ``18``, ``21``; YOLO11's ``model.16``, ``19``,
    ``22``); () where they cannot be told.

    Each level's anchors are explained at the map its own branch of the head reads,
    as a classifier is at the last map before its head: the score is then a few
    convolutions of that map around the anchor's cell (``passes.local_heads``).
    The head is the torch module of the node making the output (``/model.22/...``):
    the maps it reads are those made outside it.
    """
    made_by = producers(graph)
    end = made_by.get(graph.output[0].name)
    scope = end.name.rpartition("/")[0] + "/" if end is not None and end.name else ""
    if scope.count("/") < 2:  # no module path: names were stripped
        return ()
    inside = {o for node in graph.node if node.name.startswith(scope) for o in node.output}
    read = {name for node in graph.node if node.name.startswith(scope) for name in node.input
            if name in made_by and name not in inside}
    maps = [layer for layer in layers if layer.tensor in read and len(layer.shape) == 4]
    finest = sorted(maps, key=lambda layer: -(layer.shape[2] or 0) * (layer.shape[3] or 0))
    return tuple(layer.name for layer in finest)
