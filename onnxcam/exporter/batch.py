"""Free the batch size a model was exported with, or prove that it cannot be freed.

``torch.onnx.export`` with an example of batch B (the default exporter, and the
legacy one without ``dynamic_axes``) writes B into the input's shape and into
constant shape operands, so the file runs at batch B only. The rule, applied
where ONNX shape inference sees the batch (the input's first axis, made the
symbol ``N``) reach a node:

* a ``Reshape`` whose constant target starts with B, whose data has the batch on
  axis 0 and every other axis of a fixed size, gets 0 in place of B (copy the
  batch; -1 when ``allowzero`` is set and no other entry is -1). The other
  entries, fixed numbers and copies of fixed axes, keep each sample's own
  elements together, so the new target says the same thing at any batch. With
  ``allowzero`` (the dynamo exporter sets it) 0 is no copy: the batch becomes -1
  and another -1 is worked out from the data's fixed axes;
* a ``Concat`` along another axis than 0 of batched tensors and a constant of
  batch 1 (ViT's class token) gets that constant expanded to the batch: every
  sample read the one copy before, and reads its own copy now.
* a ``Resize`` whose constant ``sizes`` start with B, resizing data that has the
  batch on axis 0, gets sizes built at run time from the data's own batch and the
  constant's other entries (the dynamo exporter's bilinear upsampling of a
  segmenter's logits): the batch axis was not resized before, and is not now.

A ``Resize`` by constant ``scales`` whose first is 1 (ultralytics' nearest
upsampling in the neck) needs no rewrite, but ONNX shape inference loses the batch
symbol there (it multiplies N by 1.0), and with it every shape downstream, the
Detect head's Reshapes to [1, C, -1] among them: its output is declared to keep the
batch, so the rule above reaches them.

Nothing else is touched. The rewritten model is then *proved*: it runs at
batches 2 and 3 and each sample's outputs must equal the original model's run
on that sample alone (in groups of B when B > 1), within float32 noise. Where
the proof fails (a batch-mixing op, a shape operand this rule does not read), the
model keeps its own batch size and the bundle records it (``batch_size``); the
engine then runs it in chunks of exactly that size.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcam.exporter.shapes import write_weights_apart
from onnxcam.graph import SKELETON_MAX_ELEMENTS, forward_reachable, real_inputs
from onnxcam.graph import skeleton as skeleton_of
from onnxcam.runtime import cpu_session

log = logging.getLogger(__name__)

BATCH_SYMBOL = "N"
PROOF_BATCHES = (2, 3)
# Relative to each output's largest magnitude: another batch size may pick another
# convolution algorithm, which moves float32 results by a few ulps, no more.
PROOF_TOLERANCE = 1e-4

# float images in the model's layout, [n, ...] -> for the proof
ImagesFn = Callable[[int], np.ndarray]
# Rewrites one node, by its index, in a graph (the skeleton's or the model's).
Edit = Callable[[onnx.GraphProto, int], None]


@dataclass(frozen=True)
class BatchPlan:
    """What ``free_batch`` decided: the model to export and its batch.

    ``fixed`` is 0 when ``model`` runs at any batch, else the one batch it runs at.
    """

    model: onnx.ModelProto
    fixed: int
    rewritten: tuple[str, ...] = ()
    reason: str = ""
    brief: str = ""  # the reason in a few words, for a summary line


class NotProved(Exception):
    """The rewritten model does not run per sample; the message says where, ``brief``
    says it in a few words."""

    def __init__(self, message: str, brief: str) -> None:
        super().__init__(message)
        self.brief = brief


def static_batch(model: onnx.ModelProto) -> int:
    """The input's fixed batch size, or 0 when it is symbolic (or unknown)."""
    dim = real_inputs(model.graph)[0].type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else 0


def free_batch(model: onnx.ModelProto, images: ImagesFn) -> BatchPlan:
    """Make a fixed-batch model run at any batch, where that can be proved.

    Preconditions: one rank-4 graph input whose spatial size is fixed, the graph
    topologically sorted. ``images(n)`` gives n different float inputs in the
    model's layout. Where the batch is freed, ``model`` itself is rewritten (and
    returned in the plan); else it is left as it is. The weights are never copied:
    the rewrite and the proof work on a copy without them, which reads them from a
    file (``write_weights_apart``); VGG's would otherwise be held three times over.
    """
    batch = static_batch(model)
    if not batch:
        return BatchPlan(model, 0)
    with tempfile.TemporaryDirectory() as folder:
        original = Path(folder) / "original.onnx"
        write_weights_apart(model, [], original)
        candidate = onnx.load(str(original), load_external_data=False)
        set_batch_dim(candidate, BATCH_SYMBOL)
        rewritten = rewrite_shape_operands(candidate, batch)
        freed = original.with_name("freed.onnx")  # beside the weights it reads
        freed.write_bytes(candidate.SerializeToString())
        try:
            prove(original, freed, batch, images)
        except NotProved as exc:
            log.info("the model keeps its batch size %d: %s", batch, exc)
            return BatchPlan(model, batch, (), str(exc), exc.brief)
    take_structure(model, candidate)
    log.info("the model's batch size %d is freed (%d shape operands rewritten; "
             "proved at batches %s)", batch, len(rewritten), PROOF_BATCHES)
    return BatchPlan(model, 0, tuple(rewritten))


def take_structure(model: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """Make ``model`` what ``candidate`` (a copy of it whose weights are external
    stubs, since rewritten) says: its nodes, inputs, outputs and inline initializers,
    and ``model``'s own data for the weights."""
    graph, done = model.graph, candidate.graph
    for part in ("node", "input", "output", "value_info"):
        del getattr(graph, part)[:]
        getattr(graph, part).extend(getattr(done, part))
    external = {t.name for t in done.initializer if t.data_location == TensorProto.EXTERNAL}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in external:
            del graph.initializer[index]
    graph.initializer.extend(t for t in done.initializer if t.name not in external)


def set_batch_dim(model: onnx.ModelProto, value: str | int) -> None:
    """Make the first axis of the inputs and outputs ``value``: a symbol to free it, or
    the fixed batch of a bundle (which then refuses other batch sizes up front
    instead of misreading them)."""
    graph = model.graph
    for info in [*real_inputs(graph), *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if not dims:
            continue
        dims[0].Clear()
        if isinstance(value, str):
            dims[0].dim_param = value
        else:
            dims[0].dim_value = value
    del graph.value_info[:]  # stale shapes at the old batch would mislead inference


# --------------------------------------------------------------------------- rewrite


def rewrite_shape_operands(model: onnx.ModelProto, batch: int) -> list[str]:
    """Apply the module's rule until nothing more changes; the rewritten node names.

    Each round infers shapes once and rewrites every node that already sees the
    batch; what that frees downstream is found by the next round.
    """
    skeleton = skeleton_of(model)
    rewritten: list[str] = []
    for _ in range(len(model.graph.node) + 1):
        dims = _inferred_dims(skeleton)
        constants = _constants(skeleton)
        from_input = forward_reachable(skeleton.graph, real_inputs(model.graph)[0].name,
                                       differentiable_only=False)
        shape_values = ShapeValues(dims, constants, batch)
        edits: list[tuple[int, Edit]] = []
        for index, node in enumerate(skeleton.graph.node):
            edit = None
            if node.op_type == "Reshape":
                edit = _free_reshape(node, dims, constants, batch)
            elif node.op_type == "Concat":
                edit = _free_concat(node, dims, from_input)
            elif node.op_type == "Resize":
                edit = _free_resize(node, dims, constants, batch)
            if edit is not None:
                rewritten.append(node.name or node.output[0])
            elif node.op_type == "Resize":  # a hint for inference, no rewrite
                edit = _keep_batch_through_scales(node, dims, constants)
            else:
                edit = shape_values.fold(node)
            if edit is not None:
                edits.append((index, edit))
        if not edits:
            break
        for index, edit in reversed(edits):  # back to front: inserted nodes shift no index
            for graph in (skeleton.graph, model.graph):
                edit(graph, index)
    del model.graph.value_info[:]  # the hints for inference; typeless, so not kept
    return rewritten


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - no inference: nothing is rewritten
        log.debug("shape inference failed: %s", exc)
        return {}
    graph = inferred.graph
    dims: dict[str, list[int | str | None]] = {t.name: list(t.dims) for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims[info.name] = [d.dim_value if d.HasField("dim_value")
                           else (d.dim_param or None) for d in tensor_type.shape.dim]
    return dims


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _fixed_after_batch(shape: list[int | str | None] | None) -> bool:
    """The batch on axis 0 and every other axis of a known, fixed size."""
    return (shape is not None and len(shape) > 0 and shape[0] == BATCH_SYMBOL
            and all(isinstance(d, int) and d > 0 for d in shape[1:]))


def _free_reshape(node: onnx.NodeProto, dims: dict[str, list[int | str | None]],
                  constants: dict[str, np.ndarray], batch: int) -> Edit | None:
    """The edit that frees a Reshape's constant target baking the batch in, if the
    rule allows it."""
    if len(node.input) < 2 or node.input[1] not in constants:
        return None
    target = constants[node.input[1]]
    if target.ndim != 1 or len(target) == 0 or int(target[0]) != batch:
        return None
    if not _fixed_after_batch(dims.get(node.input[0])):
        return None
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    freed = target.astype(np.int64).copy()
    if not allowzero:
        freed[0] = 0  # copy the data's axis 0: the batch
    elif 0 not in freed[1:]:
        # 0 is a literal zero here: the other entries become sizes, the batch -1.
        freed = np.array([-1, *_resolved(target, dims[node.input[0]])], np.int64)
    else:
        return None
    name = f"{node.input[1]}__any_batch"
    # ONNX shape inference drops a symbolic dim that a 0 copies: say it outright.
    output = helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED,
                                           [BATCH_SYMBOL, *_resolved(target, dims[node.input[0]])])

    def edit(graph: onnx.GraphProto, index: int) -> None:
        if not any(t.name == name for t in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(freed, name))
        graph.node[index].input[1] = name
        graph.value_info.append(output)

    return edit


def _resolved(target: np.ndarray, data: list[int | str | None]) -> list[int]:
    """The target's entries after the first as sizes: 0 copied, -1 worked out.

    Precondition: ``data`` has every axis after the first fixed (the batch is
    target[0]'s, so it cancels out of the -1).
    """
    sizes = [int(data[i]) if t == 0 else int(t)  # type: ignore[arg-type]
             for i, t in enumerate(target.tolist()) if i > 0]
    if -1 in sizes:
        known = int(np.prod([d for d in sizes if d != -1]))
        per_sample = int(np.prod([int(d) for d in data[1:]]))  # type: ignore[arg-type]
        sizes[sizes.index(-1)] = per_sample // max(known, 1)
    return sizes


def _free_concat(node: onnx.NodeProto, dims: dict[str, list[int | str | None]],
                 from_input: set[str]) -> Edit | None:
    """The edit that expands batch-1 constants (tensors that do not depend on the
    input) concatenated, along another axis than 0, with batched tensors."""
    shapes = [dims.get(name) or [] for name in node.input]
    if any(not shape for shape in shapes):
        return None
    rank = len(shapes[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    batched = [name for name, shape in zip(node.input, shapes) if shape[0] == BATCH_SYMBOL]
    loose = [i for i, shape in enumerate(shapes) if shape[0] != BATCH_SYMBOL]
    if not batched or not loose or rank < 2 or axis % rank == 0:
        return None
    if any(node.input[i] in from_input or shapes[i][0] != 1 for i in loose):
        return None
    like = batched[0]

    def edit(graph: onnx.GraphProto, index: int) -> None:
        concat = graph.node[index]
        for i in loose:
            expanded = f"{concat.input[i]}__per_sample"
            extra = _expand_to_batch(concat.input[i], like, expanded, rank)
            concat.input[i] = expanded
            for offset, new_node in enumerate(extra):
                graph.node.insert(index + offset, new_node)

    return edit


def _free_resize(node: onnx.NodeProto, dims: dict[str, list[int | str | None]],
                 constants: dict[str, np.ndarray], batch: int) -> Edit | None:
    """The edit that builds a Resize's constant ``sizes`` baking the batch in from
    its data's batch at run time, if the data has the batch on axis 0."""
    if len(node.input) < 4 or node.input[3] not in constants:
        return None
    sizes = constants[node.input[3]]
    if sizes.ndim != 1 or len(sizes) < 2 or int(sizes[0]) != batch:
        return None
    if any(a.name == "axes" for a in node.attribute):
        return None  # sizes name only the listed axes, so entry 0 may be no batch
    shape = dims.get(node.input[0])
    if not shape or shape[0] != BATCH_SYMBOL or len(shape) != len(sizes):
        return None
    out = f"{node.input[3]}__{node.name or node.output[0]}__any_batch"
    batch_name, rest = f"{out}__n", f"{out}__rest"
    # Shape inference sees no sizes past the Concat: say the output's shape outright.
    output = helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED,
                                           [BATCH_SYMBOL, *[int(d) for d in sizes[1:]]])

    def edit(graph: onnx.GraphProto, index: int) -> None:
        resize = graph.node[index]
        # An initializer, not a Constant node: a cut at the layers then shares it
        # instead of passing it from the trunk to the head.
        graph.initializer.append(numpy_helper.from_array(sizes[1:].astype(np.int64), rest))
        extra = [helper.make_node("Shape", [resize.input[0]], [batch_name], start=0, end=1),
                 helper.make_node("Concat", [batch_name, rest], [out], axis=0)]
        resize.input[3] = out
        for offset, new_node in enumerate(extra):
            graph.node.insert(index + offset, new_node)
        graph.value_info.append(output)

    return edit


def _keep_batch_through_scales(node: onnx.NodeProto, dims: dict[str, list[int | str | None]],
                               constants: dict[str, np.ndarray]) -> Edit | None:
    """The edit that declares a Resize by constant scales, the first 1, to keep its
    data's batch symbol (shape inference leaves it unknown); the node is untouched."""
    if len(node.input) < 3 or node.input[2] not in constants:
        return None
    scales = constants[node.input[2]]
    if scales.ndim != 1 or len(scales) < 2 or float(scales[0]) != 1.0:
        return None
    if any(a.name == "axes" for a in node.attribute):
        return None
    data, out = dims.get(node.input[0]), dims.get(node.output[0])
    if not data or data[0] != BATCH_SYMBOL or not out or out[0] == BATCH_SYMBOL:
        return None
    if len(out) != len(data) or not all(isinstance(d, int) and d > 0 for d in out[1:]):
        return None
    output = helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED,
                                           [BATCH_SYMBOL, *out[1:]])

    def edit(graph: onnx.GraphProto, index: int) -> None:
        graph.value_info.append(output)

    return edit


class ShapeValues:
    """Shape arithmetic that does not depend on the batch, folded to constants.

    The legacy exporter splits channels with bounds computed from ``Shape``
    (``Shape -> Gather(1) -> Div -> Slice``), and lowers ``F.pad`` to pads built by
    ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast``
    (from constants, or from the input's spatial size for TensorFlow-style "same"
    padding, as EfficientNet-Lite's); shape inference cannot see through them, so
    the batch would be lost there, and with it every shape downstream. Each small
    integer element is evaluated at the fixed batch with a flag saying whether it
    comes from the batch; a node whose every output element is free of it becomes
    a Constant, valid at any batch. A node whose output's *shape* depends on the
    batch (``ConstantOfShape`` or ``Reshape`` of a batch-bearing shape) is wholly
    flagged. Precondition: nodes are visited in topological order.
    """

    FOLDABLE = ("Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast",
                "Identity", "Add", "Sub", "Mul", "Div", "ConstantOfShape", "Reshape",
                "Transpose")

    def __init__(self, dims: dict[str, list[int | str | None]],
                 constants: dict[str, np.ndarray], batch: int) -> None:
        self.dims = dims
        self.batch = batch
        # name -> (value, taint): taint marks elements that carry the batch.
        self.known: dict[str, tuple[np.ndarray, np.ndarray]] = {
            name: (value, np.zeros(value.shape, bool)) for name, value in constants.items()
            if value.dtype.kind in "iu" and value.size <= SKELETON_MAX_ELEMENTS}

    def fold(self, node: onnx.NodeProto) -> Edit | None:
        """Evaluate ``node`` if it is shape arithmetic; the edit that folds it, if it
        is free of the batch and reads a Shape somewhere upstream."""
        if node.op_type not in self.FOLDABLE or len(node.output) != 1:
            return None
        try:
            result = self._evaluate(node)
        except (KeyError, ValueError, IndexError, TypeError):
            return None
        if result is None:
            return None
        value, taint = result
        self.known[node.output[0]] = (value, taint)
        if node.op_type == "Shape" or taint.any():
            return None  # a bare Shape folds with its reader; a batch element never
        folded = helper.make_node("Constant", [], [node.output[0]],
                                  value=numpy_helper.from_array(value.astype(value.dtype)))

        def edit(graph: onnx.GraphProto, index: int) -> None:
            graph.node[index].CopyFrom(folded)

        return edit

    def _evaluate(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Shape":
            shape = self.dims.get(node.input[0])
            if shape is None or any(not isinstance(d, int) and d != BATCH_SYMBOL
                                    for d in shape):
                return None
            full = np.array([self.batch if d == BATCH_SYMBOL else d for d in shape], np.int64)
            taint = np.array([d == BATCH_SYMBOL for d in shape], bool)
            cut = slice(attributes.get("start", 0), attributes.get("end", len(shape)))
            return full[cut], taint[cut]
        if any(name not in self.known for name in node.input if name):
            return None
        args = [self.known[name] for name in node.input if name]
        values = [a[0] for a in args]
        taints = [a[1] for a in args]
        op = node.op_type
        if op in ("Identity", "Cast"):
            dtype = (helper.tensor_dtype_to_np_dtype(attributes["to"]) if op == "Cast"
                     else values[0].dtype)
            return values[0].astype(dtype), taints[0]
        if op == "Gather":
            axis = attributes.get("axis", 0)
            return (np.take(values[0], values[1], axis=axis),
                    np.take(taints[0], values[1], axis=axis))
        if op == "Slice":
            return _slice(values, taints) if len(values) == len(node.input) else None
        if op in ("ConstantOfShape", "Reshape", "Transpose"):
            return _rearranged(op, values, taints, attributes)
        if op == "Concat":
            axis = attributes.get("axis", 0)
            return np.concatenate(values, axis=axis), np.concatenate(taints, axis=axis)
        if op in ("Unsqueeze", "Squeeze"):
            axes = [int(a) for a in (values[1] if len(values) > 1 else attributes.get("axes", []))]
            if op == "Unsqueeze":
                return (np.expand_dims(values[0], axes), np.expand_dims(taints[0], axes))
            return (np.squeeze(values[0], tuple(axes) or None),
                    np.squeeze(taints[0], tuple(axes) or None))
        left, right = values
        taint = np.broadcast_to(taints[0] | taints[1] if taints[0].shape == taints[1].shape
                                else np.logical_or(taints[0], taints[1]),
                                np.broadcast_shapes(left.shape, right.shape))
        if op == "Add":
            return left + right, taint
        if op == "Sub":
            return left - right, taint
        if op == "Mul":
            return left * right, taint
        if left.dtype.kind in "iu":  # ONNX integer Div truncates toward zero
            return (np.trunc(left / right).astype(left.dtype), taint)
        return left / right, taint


Known = tuple[np.ndarray, np.ndarray]  # a value and its batch taint, element by element


def _slice(values: list[np.ndarray], taints: list[np.ndarray]) -> Known | None:
    """ONNX Slice on any axes (numpy's slicing clamps the bounds as ONNX does); None
    when a bound comes from the batch."""
    if any(taint.any() for taint in taints[1:]):
        return None
    data, starts, ends = values[0], values[1], values[2]
    axes = values[3] if len(values) > 3 else np.arange(len(starts))
    steps = values[4] if len(values) > 4 else np.ones(len(starts), np.int64)
    cut = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        cut[int(axis) % data.ndim] = slice(int(start), int(end), int(step))
    return data[tuple(cut)], taints[0][tuple(cut)]


def _rearranged(op: str, values: list[np.ndarray], taints: list[np.ndarray],
                attributes: dict[str, Any]) -> Known | None:
    """ConstantOfShape, Reshape or Transpose of small values (the pads ``F.pad``
    builds); None past ``SKELETON_MAX_ELEMENTS``, as an activation-sized
    ConstantOfShape would be."""
    if op == "Transpose":
        perm = attributes.get("perm") or list(reversed(range(values[0].ndim)))
        return np.transpose(values[0], perm), np.transpose(taints[0], perm)
    shape = [int(d) for d in values[-1]]
    batch_shaped = bool(taints[-1].any())  # the output's size follows the batch
    if op == "Reshape":
        if any(a == 0 for a in shape) and not attributes.get("allowzero"):
            shape = [values[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        value, taint = values[0].reshape(shape), taints[0].reshape(shape)
    else:
        if int(np.prod(shape)) > SKELETON_MAX_ELEMENTS:
            return None
        fill = attributes.get("value")
        scalar = (numpy_helper.to_array(fill) if isinstance(fill, TensorProto)
                  else np.zeros(1, np.float32))
        value = np.full(shape, scalar.reshape(-1)[0], scalar.dtype)
        taint = np.zeros(shape, bool)
    return value, (taint | batch_shaped)


def _expand_to_batch(constant: str, like: str, out: str, rank: int) -> list[onnx.NodeProto]:
    """Nodes: ``out`` = ``constant`` (batch 1) expanded to the batch of ``like``."""
    batch, ones, target = (f"{out}__{part}" for part in ("n", "ones", "shape"))
    return [
        helper.make_node("Shape", [like], [batch], start=0, end=1),
        helper.make_node("Constant", [], [ones], value=numpy_helper.from_array(
            np.ones(rank - 1, np.int64))),
        helper.make_node("Concat", [batch, ones], [target], axis=0),
        helper.make_node("Expand", [constant, target], [out]),
    ]


# --------------------------------------------------------------------------- proof


def prove(original: Path, candidate: Path, batch: int, images: ImagesFn) -> None:
    """Raise ``NotProved`` unless the model in ``candidate`` at batches 2 and 3 gives,
    sample by sample, the outputs the one in ``original`` gives at its own batch."""
    groups = -(-max(PROOF_BATCHES) // batch)
    inputs = images(groups * batch).astype(np.float32)
    session = cpu_session(str(original), lean=True)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {input_name: inputs[start : start + batch]})
             for start in range(0, len(inputs), batch)]
    expected = [np.concatenate([part[k] for part in parts]) for k in range(len(names))]
    del session  # a large model is held once at a time
    try:
        # Quiet: a failure here is the answer (the batch stays fixed), and onnxruntime
        # would print it in red on stderr as if the export had failed.
        freed = cpu_session(str(candidate), lean=True, quiet=True)
    except Exception as exc:  # noqa: BLE001 - any load failure means not proved
        raise NotProved(f"onnxruntime cannot load it at a free batch ({_first_line(exc)})",
                        "the graph does not load at another batch size") from exc
    for size in PROOF_BATCHES:
        try:
            got = freed.run(names, {input_name: inputs[:size]})
        except Exception as exc:  # noqa: BLE001 - a shape error: the batch is still baked in
            raise NotProved(f"it does not run at batch size {size} ({_first_line(exc)})",
                            f"the graph does not run at batch size {size}") from exc
        mixed = f"at batch size {size} the graph mixes the samples"
        for name, value, want in zip(names, got, expected):
            want = want[:size]
            if value.shape != want.shape:
                raise NotProved(f"output {name!r} has shape {list(value.shape)} at batch "
                                f"{size}, expected {list(want.shape)}", mixed)
            scale = max(float(np.abs(want).max(initial=0.0)), 1e-12)
            error = float(np.abs(value.astype(np.float64) - want).max(initial=0.0)) / scale
            if not error <= PROOF_TOLERANCE:
                raise NotProved(f"at batch size {size} output {name!r} differs from "
                                f"per-sample runs by {error:.2e} (relative)", mixed)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
