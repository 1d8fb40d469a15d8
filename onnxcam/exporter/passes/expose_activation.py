"""Expose the target layers' outputs as the bundle outputs ``activations``, ``activations.i``."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.bundle import OUTPUT_ACTIVATIONS, layer_output
from onnxcam.errors import ExportError
from onnxcam.exporter.draft import Draft
from onnxcam.graph import (
    attrs,
    consumers,
    float_output,
    producers,
    skeleton_graph,
    source_of,
    tensor_names,
    toposort,
)
from onnxcam.layout import TokenGrid


def static_tail(graph: onnx.GraphProto, name: str) -> list[int] | None:
    """The non-batch dims of ``name`` when static inference knows them all.

    A constant shape keeps the rerouted Reshape valid at any batch size, which a
    ``Shape`` of the batch-sized source would not be inside the fd Loop.
    """
    model = helper.make_model(skeleton_graph(graph))
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - no shape means no reroute
        return None
    for info in list(inferred.value_info) + list(inferred.output):
        if info.name == name:
            dims = info.type.tensor_type.shape.dim[1:]
            if dims and all(d.HasField("dim_value") for d in dims):
                return [int(d.dim_value) for d in dims]
    return None


def reroute_through_view(
    graph: onnx.GraphProto, tensor: str, node_name: str = "onnxcam/restore_layout"
) -> bool:
    """Make the head read ``tensor`` when it is only a view (transpose, reshape) of the map.

    tf2onnx runs convolutions in NCHW and adds a Transpose or Reshape to hand a
    tapped layer out in NHWC, so the logits depend on the view's input, not on
    ``tensor``. The other readers of that input get the inverse view of ``tensor``
    instead, the same values, so gradients with respect to ``tensor`` exist.
    """
    node = producers(graph).get(tensor)
    if node is None or node.op_type not in ("Transpose", "Reshape", "Identity"):
        return False
    source = node.input[0]
    readers = [n for n in consumers(graph).get(source, []) if n is not node]
    if not readers:
        return False
    restored = f"{tensor}/onnxcam_restored"
    if node.op_type == "Transpose":
        perm = attrs(node).get("perm")
        if perm is None:
            return False
        inverse = [int(i) for i in np.argsort(perm)]
        new_nodes = [helper.make_node("Transpose", [tensor], [restored],
                                      name=node_name, perm=inverse)]
    elif node.op_type == "Reshape":
        dims = static_tail(graph, source)
        if dims is None:
            return False
        shape = f"{tensor}/onnxcam_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, *dims], np.int64), shape))
        new_nodes = [helper.make_node("Reshape", [tensor, shape], [restored],
                                      name=node_name)]
    else:
        new_nodes = [helper.make_node("Identity", [tensor], [restored],
                                      name=node_name)]
    for reader in readers:
        for i, name in enumerate(reader.input):
            if name == source:
                reader.input[i] = restored
    graph.node.extend(new_nodes)
    toposort(graph)
    return True


def expose_activation(draft: Draft) -> bool:
    """Expose each tapped layer's tensor as ``activations``, ``activations.1``, ...

    Graph must be sorted. A layer already exposed is left as it is.
    """
    changed = False
    for index, tap in enumerate(draft.taps):
        rank = 3 if isinstance(tap.layout, TokenGrid) else 4
        changed |= expose(draft.graph, tap.tensor, layer_output(OUTPUT_ACTIVATIONS, index), rank)
    return changed


def expose(graph: onnx.GraphProto, tensor: str, output: str = OUTPUT_ACTIVATIONS,
           rank: int = 4) -> bool:
    """Add ``output = Identity(tensor)`` as a graph output; False if it is one already.

    ``rank`` is the tensor's: 4 for a map, 3 for a token layer [N, T, C].

    Any other graph output that already carries ``tensor`` (the Keras frontend taps
    the layer that way) is dropped in favour of the named one. Graph must be sorted.
    """
    if output in {o.name for o in graph.output}:
        if source_of(graph, output) != tensor:
            raise ExportError(f"output {output!r} already carries another tensor")
        return False
    if tensor not in tensor_names(graph):
        raise ExportError(f"tensor {tensor!r} is not in the graph")
    suffix = "" if output == OUTPUT_ACTIVATIONS else output.removeprefix(OUTPUT_ACTIVATIONS)
    reroute_through_view(graph, tensor, f"onnxcam/restore_layout{suffix}")
    graph.node.append(
        helper.make_node("Identity", [tensor], [output], name=f"onnxcam/{output}")
    )
    kept = [o for o in graph.output if o.name != tensor]
    del graph.output[:]
    graph.output.extend(kept)
    graph.output.append(float_output(output, rank))
    return True
