"""What a bundle's graph may hold, and what it needs to run: the op allow-list and the
memory estimate from its shapes. ``read_bundle`` checks the ops; a worker (or an
``Explainer`` given a budget) checks the estimate before any session is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from onnxcam.errors import BundleError

# The ops a bundle may use, all in ONNX's default domain. The exporter writes a few
# dozen of them, but an exported graph keeps its source model's ops, so this is every
# standard op a classifier could hold. Left out: ops that decode untrusted bytes
# (ImageDecoder), size a tensor from one scalar with no use in a classifier (the
# window functions, MelWeightMatrix), draw random numbers, work on strings, sequences
# or optionals, or belong to training (losses) or detection (NonMaxSuppression,
# Unique). Any other domain (com.microsoft, ai.onnx.ml, a model's own functions) is
# refused. Ops that size tensors from constants (ConstantOfShape, Expand, Tile, Range,
# Resize, Pad) stay: the exporter writes them, and the memory estimate sizes them.
ALLOWED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh",
    "Atan", "Atanh", "Attention", "AveragePool", "BatchNormalization", "BitShift",
    "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Cast", "CastLike", "Ceil", "Celu",
    "CenterCropPad", "Clip", "Col2Im", "Compress", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvInteger", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv",
    "DepthToSpace", "DequantizeLinear", "Det", "Div", "Dropout", "DynamicQuantizeLinear",
    "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU",
    "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool",
    "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If",
    "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization",
    "LpPool", "MatMul", "MatMulInteger", "Max", "MaxPool", "MaxRoiPool", "MaxUnpool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonZero", "Not",
    "OneHot", "Or", "PRelu", "Pad", "Pow", "QLinearConv", "QLinearMatMul", "QuantizeLinear",
    "RMSNormalization", "RNN", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign",
    "RotaryEmbedding", "Round", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu",
    "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax",
    "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Swish",
    "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze",
    "Upsample", "Where", "Xor",
})
ALLOWED_DOMAINS = ("", "ai.onnx")
# A detector that decodes its own detections (``output = detections``) suppresses them in
# its graph; its candidates are bounded there (TopK), at the bundle's fixed image size.
DETECTION_OPS = frozenset({"NonMaxSuppression"})

# Bytes per element by ONNX TensorProto type; strings and unknown types count 0.
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
             14: 8, 15: 16, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1, 23: 1}
# Initializers up to this many bytes stay constants for shape inference: shapes, axes
# and the like, which sizes depend on; larger ones are weights, which they never do.
_SMALL = 4096


def graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph (Loop, If, Scan bodies) inside it, at any depth."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from graphs(subgraph)


def nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of the subgraphs inside it."""
    for each in graphs(graph):
        yield from each.node


def check_ops(model: Any, name: str = "bundle", detector: bool = False) -> None:
    """Refuse a model with an op outside ``ALLOWED_OPS`` (subgraphs included), naming it;
    a ``detector`` that decodes its own detections may also use ``DETECTION_OPS``."""
    allowed = ALLOWED_OPS | DETECTION_OPS if detector else ALLOWED_OPS
    for node in nodes(model.graph):
        if node.domain not in ALLOWED_DOMAINS:
            raise BundleError(f"{name}: op {node.domain}.{node.op_type} (node {node.name!r}) "
                              "is from a domain bundles may not use")
        if node.op_type not in allowed:
            raise BundleError(f"{name}: op {node.op_type} (node {node.name!r}) is not one "
                              "bundles may use")


def check_detector(model: Any, num_classes: int, name: str = "bundle") -> None:
    """Refuse a detection bundle (``onnxcam.output`` ``anchors``) whose graph is not the
    one its metadata describes: float ``logits`` [N, K, A] and ``boxes`` [N, A, 4] as
    graph outputs, with a declared rank, K the metadata's class count and the anchors
    one count, wherever the graph fixes those sizes (``target_weights`` [M, K, A] among
    them). Sizes the graph leaves free are checked when the bundle runs
    (``engine.detections.check_outputs``)."""
    from onnx import TensorProto

    outputs = {value.name: value for value in model.graph.output}
    inputs = {value.name: value for value in model.graph.input}
    shapes = {}
    for tensor, rank in (("logits", 3), ("boxes", 3)):
        if tensor not in outputs:
            raise BundleError(f"{name}: a detection bundle (output anchors) without a "
                              f"{tensor} output")
        shapes[tensor] = _declared(outputs[tensor], f"{name}: its {tensor} output")
        if outputs[tensor].type.tensor_type.elem_type != TensorProto.FLOAT:
            raise BundleError(f"{name}: a detection bundle's {tensor} output is not float32")
        if len(shapes[tensor]) != rank:
            raise BundleError(f"{name}: a detection bundle's {tensor} output has "
                              f"{len(shapes[tensor])} axes, not {rank}")
    seeds = ([None] * 3 if "target_weights" not in inputs else  # an older bundle's
             _declared(inputs["target_weights"], f"{name}: its target_weights input"))
    logits, boxes = shapes["logits"], shapes["boxes"]
    if len(seeds) != 3:
        raise BundleError(f"{name}: a detection bundle's target_weights input has "
                          f"{len(seeds)} axes, not 3")
    agree = (("the boxes' last axis", boxes[2], 4),
             ("the logits' classes", logits[1], num_classes),
             ("target_weights' classes", seeds[1], num_classes),
             ("the logits' anchors", logits[2], boxes[1]),
             ("target_weights' anchors", seeds[2], boxes[1]),
             ("target_weights' anchors", seeds[2], logits[2]))
    for what, found, want in agree:
        if found is not None and want is not None and found != want:
            raise BundleError(f"{name}: a detection bundle whose graph and metadata "
                              f"disagree: {what}: {found}, not {want} (metadata: "
                              f"{num_classes} classes)")


def _declared(value: Any, what: str) -> list[int | None]:
    """The declared sizes of a graph input or output, None where free."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        raise BundleError(f"{what} declares no shape")
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


@dataclass(frozen=True)
class MemoryEstimate:
    """What a graph needs at one batch size, in bytes: its weights, its inputs, and the
    largest working set of one node (the tensors it reads and writes, weights aside),
    which must all be held at once while that node runs."""

    weights: int
    inputs: int
    working_set: int
    node: str  # the node with the largest working set, as "name (OpType)"

    @property
    def total(self) -> int:
        return self.weights + self.inputs + self.working_set


def check_memory(model: Any, batch: int, budget: int, name: str = "bundle") -> MemoryEstimate:
    """Refuse a model whose ``estimate_memory`` at ``batch`` is over ``budget`` bytes."""
    estimate = estimate_memory(model, batch)
    if estimate.total > budget:
        raise BundleError(
            f"{name}: needs at least {in_units(estimate.total)} to run {batch} image(s) at once "
            f"(weights {in_units(estimate.weights)}, inputs {in_units(estimate.inputs)}, node "
            f"{estimate.node[:100]} {in_units(estimate.working_set)}), over the memory "
            f"budget of {in_units(budget)}")
    return estimate


def in_units(size: int) -> str:
    """``size`` bytes for a message: "768 GiB", "5.59 GiB", "24 KiB"."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.3g} {unit}"
    return f"{size} bytes"


def tensor_bytes(value_type: Any) -> int:
    """Bytes of a tensor of ``value_type`` (a ``TypeProto``); unknown axes count 1, an
    unknown type 0."""
    tensor = value_type.tensor_type
    count = math.prod(max(d.dim_value, 1) if d.HasField("dim_value") else 1
                      for d in tensor.shape.dim)
    return count * _ITEMSIZE.get(tensor.elem_type, 0)


def estimate_memory(model: Any, batch: int, batched: tuple[str, ...] = ("image", "target")
                    ) -> MemoryEstimate:
    """The memory ``model`` needs with ``batch`` on axis 0 of its inputs ``batched``.

    Shapes come from onnx's shape inference, with constants propagated: a
    ``ConstantOfShape`` or an ``Expand`` whose shape is a constant is sized exactly. A
    size that depends on the inputs' values cannot be known before running, and
    counts 1 per unknown axis: the estimate is a lower bound, the per-job memory
    ceiling catches the rest. ``model`` is not changed.
    """
    import onnx

    light, weights = _without_weights(model)
    for value in light.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in batched and dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - any inference failure: a graph that cannot run
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"shapes of the bundle's graph cannot be inferred: {first}") from None
    graph = inferred.graph
    sizes = {v.name: tensor_bytes(v.type)
             for v in (*graph.input, *graph.value_info, *graph.output)}
    constant = {t.name for t in model.graph.initializer}
    inputs = sum(sizes.get(v.name, 0) for v in graph.input if v.name not in constant)
    largest, where = 0, ""
    for node in graph.node:
        held = sum(sizes.get(n, 0) for n in {*node.input, *node.output} - constant)
        if held > largest:
            largest, where = held, f"{node.name or node.output[0]} ({node.op_type})"
    return MemoryEstimate(weights, inputs, largest, where)


def _without_weights(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` whose large initializers are graph inputs of the same type
    (shape inference reads only small constants, and the weights are not copied), and
    the weights' bytes in all: initializers and Constant nodes' values."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    listed = {value.name for value in model.graph.input}
    weights = 0
    for tensor in model.graph.initializer:
        size = math.prod(tensor.dims) * _ITEMSIZE.get(tensor.data_type, 0)
        weights += size
        if size <= _SMALL:
            graph.initializer.append(tensor)
        elif tensor.name not in listed:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                             list(tensor.dims)))
    for node in nodes(model.graph):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                weights += math.prod(attribute.t.dims) * _ITEMSIZE.get(attribute.t.data_type, 0)
    return light, weights
