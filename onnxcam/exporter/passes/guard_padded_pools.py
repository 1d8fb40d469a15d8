"""Zero padding before a MaxPool, rewritten so that onnxruntime cannot fuse it wrongly.

onnxruntime's ``Pad_Fusion`` rule (1.31, at every optimisation level but none) moves
a zero ``Pad`` into the following MaxPool's ``pads``, but a MaxPool pads with -inf:
a border window whose inputs are all negative then gives its largest input, not 0.
Keras ResNet50V2 pads and pools a convolution with no ReLU before it
(``pool1_pad`` -> ``pool1_pool``); its activations came out 6e-3 off TF's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from onnxcam.exporter.draft import Draft
from onnxcam.graph import GraphBuilder, attrs, consumers, initializer_values, skeleton

log = logging.getLogger(__name__)


def guard_padded_pools(draft: Draft) -> bool:
    """Replace each ``MaxPool(Pad(x, 0))`` by ``Max(MaxPool(x, pads), border)``.

    ``border`` is a constant [1, 1, *out]: 0 where a window reaches the zero padding,
    the lowest float elsewhere, so the values are those of the zero-padded pool.
    Precondition: the Pad input's spatial size is fixed (an image model's is).
    """
    graph = draft.graph
    users = consumers(graph)
    kept = {o.name for o in graph.output} | {tap.tensor for tap in draft.taps}
    constants = initializer_values(graph)
    builder = GraphBuilder(graph, "onnxcam/padded_pool")
    spatial: dict[str, list[int]] | None = None
    rewritten = []
    for pad in graph.node:
        pool = fusable_pool(pad, users, kept, constants)
        if pool is None:
            continue
        spatial = spatial if spatial is not None else spatial_sizes(draft.model)
        size = spatial.get(pad.input[0])
        if size is None:
            log.warning("a zero Pad before MaxPool %r has no static size; left as it is "
                        "(onnxruntime may fuse it wrongly)", pool.name)
            continue
        rewritten.append((pad, pool, size))
    for pad, pool, size in rewritten:
        maximum = rewrite(builder, pad, pool, size, constants[pad.input[1]])
        graph.node.remove(pad)
        position = list(graph.node).index(pool) + 1  # the order stays topological
        graph.node.insert(position, maximum)
    if rewritten:
        log.info("%d zero-padded MaxPool(s) guarded against onnxruntime's Pad fusion",
                 len(rewritten))
    return bool(rewritten)


def fusable_pool(pad: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]],
                 kept: set[str], constants: Mapping[str, np.ndarray]) -> onnx.NodeProto | None:
    """The MaxPool that ``pad`` alone feeds, where onnxruntime would fuse them; else None."""
    if pad.op_type != "Pad" or len(pad.input) < 2 or len(pad.input) > 3:
        return None  # opset < 11 (pads as an attribute), or padded axes given
    if attrs(pad).get("mode", b"constant") not in (b"constant", "constant"):
        return None
    if pad.output[0] in kept or pad.input[1] not in constants:
        return None
    if len(pad.input) == 3 and pad.input[2] and (
            pad.input[2] not in constants or np.any(constants[pad.input[2]] != 0)):
        return None
    readers = users.get(pad.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "MaxPool":
        return None
    pool = readers[0]
    options = attrs(pool)
    pads = constants[pad.input[1]].astype(np.int64)
    rank = len(pads) // 2
    if len(pool.output) > 1 or options.get("ceil_mode", 0) or \
            options.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if np.any(pads < 0) or np.any(pads[[0, 1, rank, rank + 1]] != 0):
        return None  # batch or channel padding, or cropping: nothing ORT fuses
    return pool


def spatial_sizes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Each tensor's static spatial dims (all but the first two), from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    sizes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) > 2 and all(d.HasField("dim_value") for d in dims[2:]):
            sizes[info.name] = [d.dim_value for d in dims[2:]]
    return sizes


def zero_pads(pads: np.ndarray, rank: int) -> tuple[list[int], list[int]]:
    """A Pad's spatial begins and ends (``pads`` covers N, C and ``rank`` spatial axes)."""
    return [int(p) for p in pads[2:2 + rank]], [int(p) for p in pads[rank + 4:]]


def border_map(size: list[int], pads: np.ndarray, pool: dict) -> np.ndarray:
    """[1, 1, *out]: 0 where a pooling window reaches the zero padding, else the
    lowest float32 (a max with it changes nothing)."""
    rank = len(size)
    begin, end = zero_pads(pads, rank)
    strides = pool.get("strides", [1] * rank)
    dilations = pool.get("dilations", [1] * rank)
    own = pool.get("pads", [0] * 2 * rank)
    # 1 on the zero padding; 0 on the data and on the pool's own (-inf) padding.
    marks = np.pad(np.zeros(size, np.float32), list(zip(begin, end)), constant_values=1.0)
    marks = np.pad(marks, list(zip(own[:rank], own[rank:])), constant_values=0.0)
    spans = [d * (k - 1) + 1 for k, d in zip(pool["kernel_shape"], dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(marks, spans)
    windows = windows[tuple(slice(None, None, s) for s in strides)]
    windows = windows[(...,) + tuple(slice(None, None, d) for d in dilations)]
    reached = windows.reshape(*windows.shape[:rank], -1).max(axis=-1) > 0
    return np.where(reached, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]


def rewrite(builder: GraphBuilder, pad: onnx.NodeProto, pool: onnx.NodeProto,
            size: list[int], pads: np.ndarray) -> onnx.NodeProto:
    """Fold ``pad`` into ``pool``'s pads (in place); return the Max with the border
    that now makes the pool's output."""
    options = attrs(pool)
    rank = len(size)
    border = builder.const(border_map(size, pads.astype(np.int64), options), "border")
    begin, end = zero_pads(pads.astype(np.int64), rank)
    merged = [int(p) + q for p, q in zip(options.get("pads", [0] * 2 * rank), begin + end)]
    pooled = builder.fresh("pooled")
    final = pool.output[0]
    pool.input[0] = pad.input[0]
    pool.output[0] = pooled
    for attribute in list(pool.attribute):
        if attribute.name == "pads":
            pool.attribute.remove(attribute)
    pool.attribute.append(helper.make_attribute("pads", merged))
    return helper.make_node("Max", [pooled, border], [final], name=builder.fresh("Max"))
