"""Grad-CAM inside the graph: ReLU(sum_k weights_k * activations_k), at layer resolution."""

from __future__ import annotations

import onnx
from onnx import helper

from exporter.graph import GraphBuilder, float_output, opset_version, reduce
from exporter.passes import PassResult
from worker.bundle import OUTPUT_ACTIVATIONS, OUTPUT_CAM, OUTPUT_GRADIENTS, OUTPUT_WEIGHTS


def axes_for(layout: str) -> tuple[int, list[int]]:
    """The channel axis and spatial axes of a 4-D activation in ``layout``."""
    return (3, [1, 2]) if layout == "nhwc" else (1, [2, 3])


def add_cam(model: onnx.ModelProto, layout: str) -> PassResult:
    """Add ``cam`` [N, h, w] and, unless an fd pass made it already, ``weights`` [N, C].

    Precondition: ``activations`` and either ``gradients`` or ``weights`` are outputs.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    opset = opset_version(model)
    channel, spatial = axes_for(layout)
    b = GraphBuilder(graph, "onnxcam/cam")
    if OUTPUT_WEIGHTS not in outputs:
        kept = reduce(b, "ReduceMean", OUTPUT_GRADIENTS, spatial, True, opset)
        b.nodes.append(helper.make_node(
            "Reshape", [kept, b.const([0, -1], "shape")], [OUTPUT_WEIGHTS],
            name="onnxcam/weights"))
        graph.output.append(float_output(OUTPUT_WEIGHTS, 2))
        weights_kept = kept
    else:
        view = [0, 1, 1, -1] if layout == "nhwc" else [0, -1, 1, 1]
        weights_kept = b.op("Reshape", [OUTPUT_WEIGHTS, b.const(view, "shape")])
    weighted = b.op("Mul", [OUTPUT_ACTIVATIONS, weights_kept])
    summed = reduce(b, "ReduceSum", weighted, [channel], False, opset)
    b.nodes.append(helper.make_node("Relu", [summed], [OUTPUT_CAM], name="onnxcam/cam"))
    b.commit()
    graph.output.append(float_output(OUTPUT_CAM, 3))
    return PassResult(model, True)
