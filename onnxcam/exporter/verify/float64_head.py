"""The bundle's head (target layer -> logits) rebuilt in float64, for finite
differences exact enough to judge float32 gradients by."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    OUTPUT_ACTIVATIONS,
    OUTPUT_LOGITS,
)
from onnxcam.exporter.shapes import OutputRunner
from onnxcam.exporter.verify.kernels import REFERENCE_OPS
from onnxcam.graph import (
    WITH_SUBGRAPHS,
    carries_gradient,
    constant_tensors,
    head_nodes,
    read_by,
    source_of,
)

# A float64 head run takes as many moved starts as fit this budget, counting each
# start's intermediates at HEAD_GROWTH times its own size: the reference evaluator
# keeps every intermediate tensor of a run, and a body's convolutions fan out.
FD_CHUNK_BYTES = 256 * 2**20
HEAD_GROWTH = 32


@dataclass
class Float64Head:
    """The head (``start`` -> logits) in float64, and what it reads from outside.

    Parameters, also behind Identity, Cast or Constant nodes, are computed inside
    the head from ``parameters`` (float64 arrays, fed as they are). What the graph
    computes from its input is fed: ``batched`` tensors (activations of earlier
    layers, with the batch first) are repeated for each moved copy; ``fixed`` ones
    (a shape read from the input, a value derived from one) hold at the batch they
    were computed for, so a head that reads them runs one copy at a time. The head
    of a fixed-batch bundle (``rows``) runs on a batch of copies of the image, the
    first one moved, and scores the sum over the batch: what the bundle's backward
    pass differentiates (every row's target, summed). All it reads is then fixed,
    taken from a run on those copies.
    """

    evaluator: ReferenceEvaluator
    start: str
    batched: list[str]
    invariant: list[str]  # the same at any batch size: fed as they are
    fixed: list[str]
    values: list[dict[str, np.ndarray]]  # per probe image, at batch 1 (or ``rows`` copies)
    parameters: dict[str, np.ndarray] = field(default_factory=dict)  # float64, fed as is
    rows: int = 0  # the bundle's fixed batch; 0: any

    def scores(self, image: int, moved: np.ndarray, target: int) -> np.ndarray:
        """The head's score for ``target`` (``class_scores``) at each of ``moved`` (a
        batch of starts)."""
        values = self.values[image]
        per_run = 1 if self.fixed or self.rows else \
            max(1, FD_CHUNK_BYTES // (8 * HEAD_GROWTH * moved[0].size))
        scores = []
        for first in range(0, len(moved), per_run):
            chunk = moved[first : first + per_run]
            if self.rows:  # one moved copy, then the unmoved ones up to the fixed batch
                unmoved = _as_float64(values[self.start])
                chunk = np.concatenate([chunk, np.repeat(unmoved, self.rows - 1, axis=0)])
            feeds = {self.start: chunk, **self.parameters}
            feeds.update({name: np.repeat(_as_float64(values[name]), len(chunk), axis=0)
                          for name in self.batched})
            feeds.update({name: _as_float64(values[name])
                          for name in self.invariant + self.fixed})
            (logits,) = self.evaluator.run(None, feeds)
            rows = class_scores(np.asarray(logits, np.float64))[:, target]
            scores.append(rows.sum(keepdims=True) if self.rows else rows)
        return np.concatenate(scores)


def class_scores(logits: np.ndarray) -> np.ndarray:
    """[N, K] scores: a segmenter's logits [N, K, h, w] summed over the pixels, the
    score its default target (a class over the whole image) explains."""
    return logits.reshape(*logits.shape[:2], -1).sum(axis=2) if logits.ndim > 2 else logits


def _as_float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype == np.float32 else array


def float64_head(bundle: onnx.ModelProto, images: np.ndarray, chosen: np.ndarray,
                 start: str = "", batch_size: int = 0) -> Float64Head:
    """The head alone (target layer, or the tensor ``start``, -> logits) in float64,
    with the values it reads from outside the head for each probe image.

    ``batch_size`` is the bundle's fixed batch (0: any): its values are then taken
    from a run on that many copies of each image, as the head will run.
    Precondition: graph sorted (a finished bundle is).
    """
    graph = bundle.graph
    start = start or source_of(graph, OUTPUT_ACTIVATIONS)
    end = source_of(graph, OUTPUT_LOGITS)
    inside = without_held(head_nodes(graph, start, end, differentiable_only=False), end)
    made_inside = {o for n in inside for o in n.output}
    read = {i for n in inside for i in read_by(n) if i and i not in made_inside and i != start}
    constant = constant_tensors(graph)
    # Nodes are told apart by their first output (protobuf wrappers have no stable id).
    wanted = {n.output[0] for n in inside} | constant_producers(graph, read & constant)
    nodes = [n for n in graph.node if n.output and n.output[0] in wanted]
    made = {o for n in nodes for o in n.output}
    initializers = {i.name for i in graph.initializer}
    outside = sorted(name for name in read if name not in constant)
    runner = OutputRunner(bundle, [start, *outside], lean=True)
    copies = batch_size or 1
    feeds = [{INPUT_IMAGE: np.repeat(images[n : n + 1], copies, axis=0),
              INPUT_TARGET: np.repeat(chosen[n : n + 1].astype(np.int64), copies)}
             for n in range(len(images))]
    values = [runner(feed) for feed in feeds]
    both = runner({INPUT_IMAGE: images[:2], INPUT_TARGET: chosen[:2].astype(np.int64)}) \
        if len(images) > 1 and not batch_size else values[0]
    del runner  # a session of the whole bundle: gone before the float64 parameters come
    used = {i for n in nodes for i in n.input if i in initializers and i not in made}
    # Parameters are fed, not stored in the head's proto: VGG's first Dense layer is
    # 800 MB in float64, and the proto and the evaluator would each hold a copy. Large
    # weights that only products read stay float32 (``product`` widens them by blocks).
    narrow = product_weights(nodes, graph)
    parameters = {i.name: numpy_helper.to_array(i) if i.name in narrow
                  else _as_float64(numpy_helper.to_array(i))
                  for i in graph.initializer if i.name in used}
    head = helper.make_graph(
        [_to_float64(n) for n in nodes], "head",
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
         for name in [start, *outside, *parameters]],
        [helper.make_tensor_value_info(end, onnx.TensorProto.DOUBLE, None)])
    model = helper.make_model(head, opset_imports=list(bundle.opset_import))
    evaluator = ReferenceEvaluator(model, new_ops=REFERENCE_OPS)
    batched, invariant, fixed = [], [], []
    for name in outside:
        one, two = values[0][name], both[name]
        if batch_size:
            fixed.append(name)  # at the bundle's batch, as every run of the head is
        elif one.ndim and two.shape[1:] == one.shape[1:] and two.shape[0] != one.shape[0]:
            batched.append(name)
        elif one.shape == two.shape and np.array_equal(one, two):
            invariant.append(name)
        else:
            fixed.append(name)  # a shape read from the input, or a batch on another axis
    for per_image in values:  # the copies' starts are one; the differences move one
        per_image[start] = per_image[start][:1]
    return Float64Head(evaluator, start, batched, invariant, fixed, values, parameters,
                       batch_size)


# Inputs that a gradient rule holds constant, by op: RoiAlign's boxes and batch
# indices (``vjp/roi_align``: torchvision detaches its proposals). The float64 head
# feeds them as the bundle computed them, so that its differences hold them too.
HELD_INPUTS = {"RoiAlign": (1, 2)}


def without_held(nodes: list[onnx.NodeProto], end: str) -> list[onnx.NodeProto]:
    """The ``nodes`` that ``end`` reads other than through a held input
    (``HELD_INPUTS``) where the head has one. What the boxes are picked by then is
    held too: ops that carry no gradient (NonZero, Shape, an If's NonMaxSuppression)
    are read from outside, not computed. Precondition: sorted."""
    if not any(node.op_type in HELD_INPUTS for node in nodes):
        return nodes
    needed = {end}
    kept = []
    for node in reversed(nodes):
        if not any(o in needed for o in node.output) or not carries_gradient(node) \
                or node.op_type in WITH_SUBGRAPHS:
            continue
        kept.append(node)
        held = HELD_INPUTS.get(node.op_type, ())
        needed.update(i for position, i in enumerate(node.input)
                      if i and position not in held)
    return kept[::-1]


# A float32 weight at least this large stays float32 in the float64 head.
NARROW_WEIGHT_ELEMENTS = 1 << 20


def product_weights(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> set[str]:
    """Large 2-D float32 initializers that ``nodes`` read only as the weight of a Gemm
    or MatMul (its second input), which the float64 head multiplies by blocks."""
    large = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
             and len(i.dims) == 2 and int(np.prod(i.dims)) >= NARROW_WEIGHT_ELEMENTS}
    for node in nodes:
        for position, name in enumerate(node.input):
            if name in large and (node.op_type not in ("Gemm", "MatMul") or position != 1):
                large.discard(name)
    return large


def constant_producers(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """The first outputs of the nodes that compute the constant tensors ``names``."""
    needed, found = set(names), set()
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            found.add(node.output[0])
            needed.update(i for i in node.input if i)
    return found


def _array_to_float64(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    if array.dtype == np.float32:
        array = array.astype(np.float64)
    return numpy_helper.from_array(array, tensor.name)


def _to_float64(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attr in copy.attribute:
        # LayerNormalization's stash_type would otherwise keep its statistics in float32.
        if attr.name in ("to", "dtype", "stash_type") and attr.i == onnx.TensorProto.FLOAT:
            attr.i = onnx.TensorProto.DOUBLE
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
            attr.t.CopyFrom(_array_to_float64(attr.t))
    return copy
