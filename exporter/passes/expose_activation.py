"""Expose the target layer's output as the bundle output ``activations``."""

from __future__ import annotations

import onnx
from onnx import helper

from exporter.graph import float_output, tensor_names
from exporter.passes import PassResult
from worker.bundle import OUTPUT_ACTIVATIONS
from worker.errors import ExportError


def expose_activation(model: onnx.ModelProto, tensor: str) -> PassResult:
    """Add ``activations = Identity(tensor)`` as a graph output.

    Any other graph output that already carries ``tensor`` (the Keras frontend taps
    the layer that way) is dropped in favour of the named one.
    """
    graph = model.graph
    if tensor not in tensor_names(graph):
        raise ExportError(f"tensor {tensor!r} is not in the graph")
    graph.node.append(
        helper.make_node("Identity", [tensor], [OUTPUT_ACTIVATIONS], name="onnxcam/activations")
    )
    kept = [o for o in graph.output if o.name != tensor]
    del graph.output[:]
    graph.output.extend(kept)
    graph.output.append(float_output(OUTPUT_ACTIVATIONS, 4))
    return PassResult(model, True)
