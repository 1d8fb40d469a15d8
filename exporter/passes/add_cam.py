"""Grad-CAM inside the graph: ReLU(sum_k weights_k * activations_k), at layer resolution."""

from __future__ import annotations

import onnx
from onnx import helper

from onnxcam.bundle import (
    OUTPUT_ACTIVATIONS,
    OUTPUT_CAM,
    OUTPUT_GRADIENTS,
    OUTPUT_WEIGHTS,
    layer_output,
)
from onnxcam.exporter.passes import PassResult
from onnxcam.graph import GraphBuilder, float_output, opset_version, reduce


def axes_for(layout: str) -> tuple[int, list[int]]:
    """The channel axis and spatial axes of a 4-D activation in ``layout``."""
    return (3, [1, 2]) if layout == "nhwc" else (1, [2, 3])


def add_cam(model: onnx.ModelProto, layout: str, index: int = 0) -> PassResult:
    """Add ``cam`` [N, h, w] and, unless an fd pass made it already, ``weights`` [N, C],
    for exported layer ``index`` (suffixed names ``cam.i`` for i > 0).

    Precondition: ``activations`` and either ``gradients`` or ``weights`` are outputs.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    opset = opset_version(model)
    channel, spatial = axes_for(layout)
    activations, gradients, weights, cam = (
        layer_output(name, index)
        for name in (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS, OUTPUT_WEIGHTS, OUTPUT_CAM))
    b = GraphBuilder(graph, "onnxcam/cam")
    if weights not in outputs:
        kept = reduce(b, "ReduceMean", gradients, spatial, True, opset)
        b.nodes.append(helper.make_node(
            "Reshape", [kept, b.const([0, -1], "shape")], [weights],
            name=f"onnxcam/{weights}"))
        graph.output.append(float_output(weights, 2))
        weights_kept = kept
    else:
        view = [0, 1, 1, -1] if layout == "nhwc" else [0, -1, 1, 1]
        weights_kept = b.op("Reshape", [weights, b.const(view, "shape")])
    weighted = b.op("Mul", [activations, weights_kept])
    summed = reduce(b, "ReduceSum", weighted, [channel], False, opset)
    b.nodes.append(helper.make_node("Relu", [summed], [cam], name=f"onnxcam/{cam}"))
    b.commit()
    graph.output.append(float_output(cam, 3))
    return PassResult(model, True)
