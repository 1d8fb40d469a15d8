"""Grad-CAM inside the graph: ReLU(sum_k weights_k * activations_k), at layer resolution.

A 4-D map is reduced over its spatial axes; a token layer over its grid's tokens
only (leading class or distillation tokens dropped), and its cam is that grid.
"""

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
from onnxcam.layout import ActivationLayout, Layout, TokenGrid


def add_cam(draft: Draft) -> bool:
    """Add ``cam`` (and ``weights``) for every tapped layer; False if all had them."""
    changed = False
    for index, tap in enumerate(draft.taps):
        layout = tap.layout if isinstance(tap.layout, TokenGrid) else Layout.of(tap.layout)
        changed |= add_layer_cam(draft.model, layout, index)
    return changed


def add_layer_cam(model: onnx.ModelProto, layout: ActivationLayout, index: int = 0) -> bool:
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
    if isinstance(layout, TokenGrid):
        # [N, T, C] -> the grid's tokens [N, h*w, C]; channels on axis 2, space on axis 1.
        activations = grid_tokens(b, activations, layout)
        space, channel_axis, channel_view = [1], 2, [0, 1, -1]
    else:
        space, channel_axis, channel_view = (list(layout.spatial_axes), layout.channel_axis,
                                             layout.channel_view)
    if weights not in outputs:
        if isinstance(layout, TokenGrid):
            gradients = grid_tokens(b, gradients, layout)
        kept = reduce(b, "ReduceMean", gradients, space, True, opset)
        b.nodes.append(helper.make_node(
            "Reshape", [kept, b.const([0, -1], "shape")], [weights],
            name=f"onnxcam/{weights}"))
        graph.output.append(float_output(weights, 2))
        weights_kept = kept
    else:
        weights_kept = b.op("Reshape", [weights, b.const(channel_view, "shape")])
    weighted = b.op("Mul", [activations, weights_kept])
    summed = reduce(b, "ReduceSum", weighted, [channel_axis], False, opset)
    if isinstance(layout, TokenGrid):
        summed = b.op("Reshape", [summed, b.const([0, layout.height, layout.width], "grid")])
    b.nodes.append(helper.make_node("Relu", [summed], [cam], name=f"onnxcam/{cam}"))
    b.commit()
    graph.output.append(float_output(cam, 3))
    return True


def grid_tokens(b: GraphBuilder, tokens: str, grid: TokenGrid) -> str:
    """``tokens`` [N, T, C] without the leading ones: [N, h*w, C]."""
    return b.op("Slice", [tokens, b.const([grid.leading], "starts"),
                          b.const([grid.tokens], "ends"), b.const([1], "axes")])
