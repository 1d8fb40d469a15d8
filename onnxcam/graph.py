"""Small helpers for reading and growing an ONNX graph in place."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class GraphBuilder:
    """Appends nodes and constants to a graph with collision-free names.

    New nodes go to ``self.nodes``; call ``commit()`` to append them to the graph.
    """

    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._taken = tensor_names(graph) | {n.name for n in graph.node}
        self._counter = itertools.count()

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{self.prefix}/{hint}_{next(self._counter)}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attributes: Any) -> str:
        """Add one node; return its (first) output name."""
        return self.op_multi(op_type, inputs, n_out, **attributes)[0]

    def op_multi(
        self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attributes: Any
    ) -> list[str]:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), outputs, name=self.fresh(op_type), **attributes
            )
        )
        return outputs

    def const(
        self, value: np.ndarray | float | int | Sequence[int] | Sequence[float], hint: str = "c"
    ) -> str:
        """Add an initializer; ints become int64 and floats float32 unless already typed."""
        array = np.asarray(value)
        if array.dtype.kind in "iu" and not isinstance(value, np.ndarray):
            array = array.astype(np.int64)
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, value: float) -> str:
        """A float32 scalar constant."""
        return self.const(np.asarray(value, np.float32), "k")

    def commit(self) -> None:
        self.graph.node.extend(self.nodes)
        self.nodes = []

    def child(self, graph: onnx.GraphProto, prefix: str) -> GraphBuilder:
        """A builder for a subgraph of this one (a Loop body, say).

        The two share one set of taken names, so nothing either makes, before or
        after, can shadow a name of the other: a body must not redefine an outer
        tensor it reads.
        """
        inner = GraphBuilder(graph, prefix)
        self._taken |= inner._taken
        inner._taken = self._taken
        return inner


def reduce(
    b: GraphBuilder, op_type: str, x: str, axes: Sequence[int], keepdims: bool, opset: int
) -> str:
    """A Reduce* node in the form the opset wants (axes moved to an input in 18)."""
    axes = [int(a) for a in axes]
    if op_type != "ReduceSum" and opset < 18:
        return b.op(op_type, [x], axes=axes, keepdims=int(keepdims))
    return b.op(op_type, [x, b.const(axes, "axes")], keepdims=int(keepdims))


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


# Initializers at least this large (bytes) are weights: worth not copying.
LARGE_TENSOR_BYTES = 1 << 16


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The size of a numeric tensor's values, from its shape (0 for strings): cheaper
    than ``ByteSize``, which encodes the whole tensor to count it."""
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


# Initializers of up to this many elements stay in a skeleton: shape operands, axes.
SKELETON_MAX_ELEMENTS = 64


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its large initializers replaced by inputs of the same type and
    shape: what shape inference needs, without a copy of the weights (which
    ``infer_shapes`` on the model itself makes twice over)."""
    light = helper.make_model(skeleton_graph(model.graph),
                              opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    light.functions.extend(model.functions)
    return light


def skeleton_graph(graph: onnx.GraphProto) -> onnx.GraphProto:
    """``graph``'s nodes, inputs and outputs; its small initializers, and its large ones
    as typed inputs (``skeleton``)."""
    small = [t for t in graph.initializer if int(np.prod(t.dims)) <= SKELETON_MAX_ELEMENTS]
    large = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if int(np.prod(t.dims)) > SKELETON_MAX_ELEMENTS]
    return helper.make_graph(list(graph.node), graph.name,
                             [*real_inputs(graph), *large], list(graph.output), small)


def shell_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` but for its initializers, which it does not hold: cheap
    where a copy of the whole model would copy the weights."""
    shell = onnx.ModelProto()
    copy_fields(model, shell, skip="graph")
    copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def copy_fields(source: Any, target: Any, skip: str) -> None:
    """Every field of the message ``source`` that is set, but ``skip``, into ``target``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else \
            descriptor.label == descriptor.LABEL_REPEATED  # protobuf before 5.28
        if repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


# Wire-format tags (field number << 3 | length-delimited) of ModelProto.graph and
# GraphProto.initializer.
GRAPH_TAG, INITIALIZER_TAG = b"\x3a", b"\x2a"


def serialized_in_parts(model: onnx.ModelProto) -> Iterator[bytes]:
    """``model`` serialized, in parts to be written one after another: the model and
    graph but for the weights, then each initializer. What protobuf reads back is
    the same model; what it holds at once is one initializer's bytes, where
    ``SerializeToString`` holds the whole model twice over (1 GB for VGG)."""
    shell = shell_of(model)
    graph = shell.graph.SerializeToString()
    sizes = [tensor.ByteSize() for tensor in model.graph.initializer]
    graph_size = len(graph) + sum(len(INITIALIZER_TAG) + len(varint(size)) + size
                                  for size in sizes)
    shell.ClearField("graph")
    yield shell.SerializeToString() + GRAPH_TAG + varint(graph_size) + graph
    for tensor, size in zip(model.graph.initializer, sizes):
        yield INITIALIZER_TAG + varint(size)
        yield tensor.SerializeToString()


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def initializer_values(graph: onnx.GraphProto) -> ConstantValues:
    """Constant tensors: initializers and the outputs of Constant nodes, by name."""
    return ConstantValues(graph)


class ConstantValues(Mapping[str, np.ndarray]):
    """A graph's constant tensors as arrays, each made when first read: the passes read
    shapes, pads and axes, and converting every weight up front copied them all (VGG's
    500 MB) while a pass ran. Like a dict made at the start, it holds the constants the
    graph had then."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.tensors: dict[str, onnx.TensorProto | onnx.AttributeProto] = {
            init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name in ("value", "value_ints", "value_int", "value_floats",
                                     "value_float"):
                        self.tensors[node.output[0]] = attr
        self.made: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.made:
            self.made[name] = constant_array(self.tensors[name])
        return self.made[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def constant_array(value: onnx.TensorProto | onnx.AttributeProto) -> np.ndarray:
    """An initializer, or a Constant node's value attribute, as an array."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if value.name == "value":
        return numpy_helper.to_array(value.t)
    dtype = np.int64 if value.name in ("value_ints", "value_int") else np.float32
    return np.asarray(helper.get_attribute_value(value), dtype)


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose value depends on no graph input: initializers, Constant nodes and
    what is computed from them alone (a parameter shared through Identity, a Cast)."""
    constant = {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        if node.op_type not in ("Loop", "If", "Scan") and "Random" not in node.op_type \
                and all(i in constant for i in node.input):
            constant.update(node.output)
    return constant


def source_of(graph: onnx.GraphProto, output: str) -> str:
    """The tensor an Identity node copies into ``output`` (every bundle output is made so)."""
    return producers(graph)[output].input[0]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                result.setdefault(name, []).append(node)
    return result


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (older exporters list weights as inputs)."""
    init = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in init]


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


# Ops whose outputs carry no gradient: shapes, indices, booleans, rounding.
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "Sign", "Floor", "Ceil",
    "Round", "IsNaN", "IsInf", "ConstantOfShape", "EyeLike", "RandomNormalLike",
    "RandomUniformLike", "NonMaxSuppression",
})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                         TensorProto.BFLOAT16})


def carries_gradient(node: onnx.NodeProto) -> bool:
    if node.op_type in NON_DIFFERENTIABLE:
        return False
    if node.op_type == "Cast":
        return int(attrs(node)["to"]) in FLOAT_TYPES
    return True


def forward_reachable(
    graph: onnx.GraphProto, start: str, differentiable_only: bool = True
) -> set[str]:
    """Tensors computed from ``start`` (inclusive).

    Graph must be topologically sorted. With ``differentiable_only``, paths through
    shape or index computations are cut, since no gradient flows along them.
    """
    reached = {start}
    for node in graph.node:
        if not differentiable_only and any(i in reached for i in read_by(node)):
            reached.update(o for o in node.output if o)
        elif carries_gradient(node) and any(i in reached for i in node.input if i):
            reached.update(o for o in node.output[:1] if o)
            if node.op_type == "Split":
                reached.update(o for o in node.output if o)
    return reached


def backward_reachable(graph: onnx.GraphProto, targets: Iterable[str]) -> set[str]:
    """Tensors that ``targets`` depend on (inclusive). Graph must be topologically sorted."""
    needed = set(targets)
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            needed.update(i for i in read_by(node) if i)
    return needed


# The standard ops whose attributes hold graphs.
WITH_SUBGRAPHS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def read_by(node: onnx.NodeProto) -> Sequence[str]:
    """The tensors ``node`` reads: its inputs (an optional one left out is "") and
    what its subgraphs (an If's branches, a Loop's body) read from the outer scope."""
    if node.op_type not in WITH_SUBGRAPHS:
        return node.input
    return sorted({i for i in node.input if i} | outer_references(node))


def on_path(
    graph: onnx.GraphProto, starts: Sequence[str], end: str, differentiable_only: bool = True
) -> set[str]:
    """Tensors on a path from any of ``starts`` to ``end``. Graph must be sorted."""
    reached: set[str] = set()
    for start in starts:
        reached |= forward_reachable(graph, start, differentiable_only)
    return reached & backward_reachable(graph, [end])


def head_nodes(
    graph: onnx.GraphProto, start: str | Sequence[str], end: str,
    differentiable_only: bool = True,
) -> list[onnx.NodeProto]:
    """Nodes on a path from ``start`` (or any of several) to ``end``, in graph order.

    With ``differentiable_only`` the shape computations along the way are left out.
    Graph must be sorted.
    """
    starts = [start] if isinstance(start, str) else list(start)
    tensors = on_path(graph, starts, end, differentiable_only)
    return [n for n in graph.node
            if any(o in tensors for o in n.output) and any(i in tensors for i in n.input)]


def op_types(graph: onnx.GraphProto) -> set[str]:
    """The ops of ``graph`` and of the graphs inside its nodes."""
    return {op for node in graph.node for op in node_ops(node)}


def node_ops(node: onnx.NodeProto) -> set[str]:
    """``node``'s op and those of the graphs inside it (an If's branches: the legacy
    exporter puts torchvision's NonMaxSuppression in one)."""
    found = {node.op_type}
    if node.op_type not in WITH_SUBGRAPHS:
        return found
    for attribute in node.attribute:
        for inner in [attribute.g, *attribute.graphs]:
            found |= op_types(inner)
    return found


# Ops whose output's size depends on the values they read.
DATA_SIZED = frozenset({"NonZero", "NonMaxSuppression", "Compress", "Unique"})


def sized_by_data(graph: onnx.GraphProto, tensor: str) -> bool:
    """Whether ``tensor`` is computed from an op whose output's size depends on values
    (its count of rows then changes from image to image): one of ``DATA_SIZED``, or a
    branch op holding one."""
    made = producers(graph)
    for name in backward_reachable(graph, [tensor]):
        node = made.get(name)
        if node is not None and node_ops(node) & DATA_SIZED:
            return True
    return False


def data_sized_tensors(graph: onnx.GraphProto) -> set[str]:
    """The tensors computed from the output of an op of ``DATA_SIZED`` (or of a branch
    op holding one): those whose sizes may change with the values (the
    proposals of a two-stage detector). Graph must be sorted."""
    reached: set[str] = set()
    for node in graph.node:
        if node_ops(node) & DATA_SIZED or any(i in reached for i in read_by(node)):
            reached.update(o for o in node.output if o)
    return reached


def toposort(graph: onnx.GraphProto) -> None:
    """Sort ``graph.node`` topologically in place (stable for already sorted graphs)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    produced = {o for node in pending for o in node.output}
    deps = {id(n): set(n.input) | (outer_references(n) & produced) for n in pending}
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if deps[id(node)] <= available:
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = {i for n in remaining for i in deps[id(n)] if i not in available}
            raise ValueError(f"graph is not a DAG or misses inputs: {sorted(missing)[:5]}")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def prune_unused(graph: onnx.GraphProto) -> int:
    """Drop nodes and initializers no graph output depends on; return how many nodes went.

    Tensors that subgraphs (Loop bodies) read from the outer scope count as used.
    """
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(outer_references(node))
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)
    return removed


def outer_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read but do not define themselves."""
    names: set[str] = set()
    for attr in node.attribute:
        if attr.type != onnx.AttributeProto.GRAPH:
            continue
        body = attr.g
        defined = {i.name for i in body.input} | {i.name for i in body.initializer}
        for inner in body.node:
            defined.update(inner.output)
        for inner in body.node:
            names.update(i for i in inner.input if i and i not in defined)
            names.update(outer_references(inner) - defined)
        names.update(o.name for o in body.output if o.name not in defined)
    return names


def rename_tensors(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere they appear, subgraphs included."""
    if not mapping:
        return
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        info.name = mapping.get(info.name, info.name)
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = mapping.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = mapping.get(name, name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                rename_tensors(attr.g, mapping)


def float_output(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float value-info with batch axis ``N`` and the other axes left symbolic."""
    dims: list[str | int] = ["N", *(f"{name}_{i}" for i in range(1, rank))]
    return helper.make_tensor_value_info(name, FLOAT, dims)
