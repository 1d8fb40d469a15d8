"""A bundle cut in two at its layers, so that many targets of one image run its trunk once.

The trunk maps ``image`` to the logits, the activations and every other tensor the
part after the layers reads (``BundleInfo.head_inputs``); the head maps those tensors,
gathered per target row, and the seed to the gradients, weights and cams. The
exporter finds the cut (``head_inputs``) and checks it; the engine runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import onnx
from onnx import helper

from onnxcam.bundle import (
    DECODED_OUTPUTS,
    INPUT_IMAGE,
    OUTPUT_BOXES,
    OUTPUT_CAM,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
    OUTPUT_WEIGHTS,
    SEED,
    HeadInput,
    is_activation_output,
)
from onnxcam.errors import BundleError
from onnxcam.graph import outer_references

TARGET_OUTPUTS = (OUTPUT_GRADIENTS, OUTPUT_WEIGHTS, OUTPUT_CAM)


def target_outputs(graph: onnx.GraphProto) -> list[str]:
    """The outputs that depend on the target: every layer's gradients, weights and cam."""
    return [o.name for o in graph.output if o.name.partition(".")[0] in TARGET_OUTPUTS]


def head_boundary(graph: onnx.GraphProto, layers: Sequence[str],
                  pulled: Iterable[str] = ()) -> list[str]:
    """The tensors the part of the graph after ``layers`` reads from before them.

    That part is every node that reads, directly or not, a layer tensor or ``SEED``
    (or makes a ``pulled`` tensor) and that a target output needs; what it reads and
    does not make is the boundary (the layer tensors and the seed among it). Graph
    must be sorted.
    """
    nodes = list(graph.node)
    reached = set(layers) | {SEED}
    pulled = set(pulled)
    after: set[int] = set()  # positions of the nodes that read a layer or the seed
    for position, node in enumerate(nodes):
        if SEED in node.output:
            continue  # the default seed reads the logits (top-1), yet it is an input here
        if pulled.intersection(node.output) or \
                any(name in reached for name in [*node.input, *outer_references(node)]):
            reached.update(o for o in node.output if o)
            after.add(position)
    needed = set(target_outputs(graph))
    region: list[onnx.NodeProto] = []
    for position in sorted(after, reverse=True):
        node = nodes[position]
        if any(o in needed for o in node.output):
            region.append(node)
            needed.update(i for i in [*node.input, *outer_references(node)] if i)
    made = {o for node in region for o in node.output}
    constants = {t.name for t in graph.initializer}
    read = [i for node in reversed(region) for i in [*node.input, *outer_references(node)]]
    return list(dict.fromkeys(i for i in read if i and i not in made and i not in constants))


def extract(model: onnx.ModelProto, inputs: Mapping[str, int], outputs: Iterable[str]
            ) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (name: onnx data
    type) and the weights; the graph's own inputs stand in for anything else it needs.
    Graph must be sorted."""
    graph = model.graph
    outputs = list(outputs)
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed and o not in inputs for o in node.output):
            kept.append(node)
            needed.update(i for i in [*node.input, *outer_references(node)] if i)
    made = {o for node in kept for o in node.output}
    graph_inputs = {i.name: i for i in graph.input}
    constants = [t for t in graph.initializer if t.name in needed and t.name not in inputs]
    missing = needed - made - set(inputs) - {t.name for t in constants} - set(graph_inputs)
    if missing:
        raise BundleError(f"the bundle cannot be cut at its layer: {sorted(missing)[0]!r} "
                          "is made nowhere")
    declared = [helper.make_tensor_value_info(name, kind, None) for name, kind in inputs.items()]
    declared += [graph_inputs[name] for name in graph_inputs
                 if name in needed - made and name not in inputs]
    by_name = {o.name: o for o in graph.output}
    cut = helper.make_graph(list(reversed(kept)), "onnxcam-cut", declared,
                            [by_name.get(name) or onnx.ValueInfoProto(name=name)
                             for name in outputs], constants)
    return helper.make_model(cut, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)


def trunk_outputs(graph: onnx.GraphProto, head_inputs: Sequence[HeadInput]) -> list[str]:
    """The trunk's outputs: the logits, a detector's boxes (which the engine suppresses
    before choosing targets) or decoded detections, every layer's activations and the
    head's inputs."""
    names = [o.name for o in graph.output]
    activations = [name for name in names if is_activation_output(name)]
    boxes = [name for name in (OUTPUT_BOXES, *DECODED_OUTPUTS) if name in names]
    boundary = [h.name for h in head_inputs if h.name != SEED]
    return list(dict.fromkeys([OUTPUT_LOGITS, *boxes, *activations, *boundary]))


def split_at_layers(model: onnx.ModelProto, head_inputs: Sequence[HeadInput]
                    ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The trunk (``image`` to ``trunk_outputs``) and the head (``head_inputs`` to the
    target outputs) of a bundle; ``head_inputs`` is the cut its metadata records."""
    if not any(h.name == SEED for h in head_inputs):
        raise BundleError("this bundle records no cut at its layer (re-export it)")
    graph = model.graph
    trunk = extract(model, {INPUT_IMAGE: onnx.TensorProto.UINT8},
                    trunk_outputs(graph, head_inputs))
    head = extract(model, {h.name: h.elem_type for h in head_inputs}, target_outputs(graph))
    if len(head.graph.input) != len(head_inputs):
        extra = [i.name for i in head.graph.input][len(head_inputs):]
        raise BundleError(f"the part after the layer reads {extra[0]!r}, which the bundle's "
                          "head inputs leave out")
    return trunk, head
