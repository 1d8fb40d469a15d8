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
from onnxcam.exporter.draft import Draft
from onnxcam.graph import GraphBuilder, float_output, opset_version, reduce
from onnxcam.layout import Layout


def add_cam(draft: Draft) -> bool:
    """Add ``cam`` (and ``weights``) for every tapped layer; False if all had them."""
    changed = False
    for index, tap in enumerate(draft.taps):
        changed |= add_layer_cam(draft.model, Layout.of(tap.layout), index)
    return changed


def add_layer_cam(model: onnx.ModelProto, layout: Layout, index: int = 0) -> bool:
    """Add ``cam`` [N, h, w] and, unless an fd pass made it already, ``weights`` [N, C],
    for exported layer ``index`` (suffixed names ``cam.i`` for i > 0), whose
    activations are in ``layout``. False when the cam is an output already.

    Precondition: ``activations`` and either ``gradients`` or ``weights`` are outputs.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    activations, gradients, weights, cam = (
        layer_output(name, index)
        for name in (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS, OUTPUT_WEIGHTS, OUTPUT_CAM))
    if cam in outputs:
        return False
    opset = opset_version(model)
    b = GraphBuilder(graph, "onnxcam/cam")
    if weights not in outputs:
        kept = reduce(b, "ReduceMean", gradients, layout.spatial_axes, True, opset)
        b.nodes.append(helper.make_node(
            "Reshape", [kept, b.const([0, -1], "shape")], [weights],
            name=f"onnxcam/{weights}"))
        graph.output.append(float_output(weights, 2))
        weights_kept = kept
    else:
        weights_kept = b.op("Reshape", [weights, b.const(layout.channel_view, "shape")])
    weighted = b.op("Mul", [activations, weights_kept])
    summed = reduce(b, "ReduceSum", weighted, [layout.channel_axis], False, opset)
    b.nodes.append(helper.make_node("Relu", [summed], [cam], name=f"onnxcam/{cam}"))
    b.commit()
    graph.output.append(float_output(cam, 3))
    return True
