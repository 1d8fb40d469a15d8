"""Replace the model's float input with the bundle's uint8 NHWC ``image`` input."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxcam.bundle import INPUT_IMAGE
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.preprocess import affine_for
from onnxcam.graph import GraphBuilder, real_inputs
from onnxcam.layout import Layout


def embed_preprocessing(draft: Draft) -> bool:
    """Feed the model from ``image`` through cast, channel order, scale/offset and
    layout; record the tensor the model read as ``draft.model_input``.

    Precondition: the model has exactly one real input, shaped as ``draft.layout``
    says. False when ``image`` is the input already.
    """
    graph = draft.graph
    if any(i.name == INPUT_IMAGE for i in graph.input):
        return False
    (original,) = real_inputs(graph)
    draft.model_input = original.name
    mode = draft.options.preprocess
    b = GraphBuilder(graph, "onnxcam/preprocess")
    affine = affine_for(mode, draft.channels)
    x = b.op("Cast", [INPUT_IMAGE], to=onnx.TensorProto.FLOAT)
    if affine.flip_rgb:
        x = b.op("Gather", [x, b.const(np.array([2, 1, 0], np.int64), "bgr")], axis=3)
    if mode != "none":
        x = b.op("Mul", [x, b.const(affine.scale.astype(np.float32), "scale")])
        x = b.op("Add", [x, b.const(affine.offset.astype(np.float32), "offset")])
    if draft.layout is Layout.NCHW:
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    b.nodes.append(helper.make_node("Identity", [x], [original.name], name=b.fresh("input")))
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info(
        INPUT_IMAGE, onnx.TensorProto.UINT8, ["N", draft.height, draft.width, draft.channels]))
    # The new nodes must run first.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(b.nodes + existing)
    return True
