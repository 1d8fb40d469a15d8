"""A detector's levels, and a local head for each: its anchors' scores from a crop of
the level's layer around their cell, with their gradients, so that each detection
costs a few small convolutions instead of the whole part after the layers.

A YOLO head scores each level's anchors by a stack of stride-1 convolutions and
pointwise ops over the map its branch reads, reshaped to [N, K, h*w], concatenated
over the levels and squashed (a Sigmoid). An anchor's score then reads the map only
within ``radius`` cells of its own (the sum of the convolutions' reach), so the same
stack run on that square of the map, with the map's zero padding kept by a mask
before each convolution, gives the same score and, by the VJP rules, the same
gradient, which is zero outside the square. The pass checks exactly that against
the whole bundle; a level whose head is not such a stack, or fails the check, is
recorded without one (radius 0), and the engine runs the whole head for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS,
    Level,
    crop_gradients,
    crop_inputs,
    layer_output,
)
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.head import layer_tensors
from onnxcam.exporter.passes.add_gradients import backpropagate
from onnxcam.exporter.shapes import lean_session, random_images
from onnxcam.exporter.vjp.context import TensorShape, VjpContext
from onnxcam.graph import (
    FLOAT,
    GraphBuilder,
    attrs,
    constant_tensors,
    initializer_values,
    opset_version,
    producers,
)
from onnxcam.head_cut import extract

log = logging.getLogger(__name__)

# Ops that act on each cell alone (their other inputs constants, broadcast per
# channel); with stride-1 "same" convolutions, the ops a level's stack may hold.
POINTWISE = frozenset({"Sigmoid", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh",
                       "Elu", "Selu", "Softplus", "Identity", "Mul", "Add", "Sub", "Div",
                       "BatchNormalization", "Clip"})
SQUASHING = frozenset({"Sigmoid", "Identity"})
TOLERANCE = 1e-4  # the same kernels on the same numbers: rounding only
CHECKED_CELLS = 6  # per level: the four corners and two random cells


@dataclass
class Stack:
    """One level's branch: the nodes from the layer ``start`` to the class-score map
    ``end`` [N, K, h, w], in graph order, and how far a cell of ``end`` reads."""

    start: str
    end: str
    nodes: list[onnx.NodeProto]
    radius: int


def local_heads(draft: Draft) -> bool:
    """Record ``draft.levels`` for a detector whose layers are its head's level maps,
    and add a checked local head for each level whose branch is a convolution stack.
    False (nothing added) for any other bundle.

    Preconditions: ``cut_at_layers`` has run (sorted graph, target outputs, shapes).
    """
    detection = draft.detection
    if detection is None or draft.gradient != "analytic" or draft.batch_size:
        return False
    graph = draft.graph
    layers = layer_tensors(graph)
    ends = level_ends(graph, detection.scores)
    stacks = [stack_of(graph, end, layers) for end in ends]
    starts = [stack.start if stack else "" for stack in stacks]
    if not ends or starts != layers[:len(ends)] or len(ends) != len(layers):
        return False  # the layers are not the levels' maps: one layer for every anchor
    levels, first = [], 0
    for index, end in enumerate(ends):
        _, _, height, width = draft.shapes[end].dims
        stack = stacks[index]
        levels.append(Level(index, first, height, width, stack.radius if stack else 0,
                            local=stack is not None))
        first += height * width
    snapshot = onnx.ModelProto()
    snapshot.CopyFrom(draft.model)
    local = [level for level in levels if level.local]
    for level, stack in zip(levels, stacks):
        if stack is not None:
            add_local_head(draft, level, stack)
    problem = local_problem(draft, levels, local) if local else ""
    if problem:
        log.warning("the detector's local heads do not hold (%s): each detection will run "
                    "the whole head", problem)
        draft.model.CopyFrom(snapshot)
        levels = [Level(lv.layer, lv.first, lv.height, lv.width, lv.radius) for lv in levels]
        local = []
    draft.levels = tuple(levels)
    return bool(local)


def level_ends(graph: onnx.GraphProto, scores: str) -> list[str]:
    """The class-score maps [N, K, h, w] that ``scores`` [N, K, A] squashes after
    reshaping each to [N, K, h*w] and concatenating them on the anchors, in order;
    [] for any other head."""
    made = producers(graph)
    node = made.get(scores)
    while node is not None and node.op_type in SQUASHING:
        node = made.get(node.input[0])
    if node is None or node.op_type != "Concat" or attrs(node).get("axis") not in (2, -1):
        return []
    ends = []
    for part in node.input:
        reshape = made.get(part)
        if reshape is None or reshape.op_type != "Reshape":
            return []
        ends.append(reshape.input[0])
    return ends


def stack_of(graph: onnx.GraphProto, end: str, layers: list[str]) -> Stack | None:
    """The convolution stack from one of ``layers`` to ``end``, or None where ``end``
    reads anything else than one layer through stride-1 "same" convolutions and
    pointwise ops (a node's other inputs must be constants)."""
    made = producers(graph)
    constants = constant_tensors(graph)
    reach: dict[str, int] = {}
    starts: set[str] = set()
    kept: dict[int, onnx.NodeProto] = {}
    position = {id(node): index for index, node in enumerate(graph.node)}

    def visit(name: str) -> int | None:
        if name in reach:
            return reach[name]
        if name in layers:
            starts.add(name)
            reach[name] = 0
            return 0
        node = made.get(name)
        if node is None or (node.op_type != "Conv" and node.op_type not in POINTWISE):
            return None
        extent = conv_extent(node) if node.op_type == "Conv" else 0
        inner = [visit(i) for i in node.input[:1 if node.op_type == "Conv" else None]
                 if i and i not in constants]
        if extent is None or not inner or any(r is None for r in inner):
            return None
        kept[position[id(node)]] = node
        reach[name] = max(r for r in inner if r is not None) + extent
        return reach[name]

    radius = visit(end)
    if radius is None or len(starts) != 1:
        return None
    return Stack(starts.pop(), end, [kept[i] for i in sorted(kept)], radius)


def conv_extent(node: onnx.NodeProto) -> int | None:
    """How many cells a Conv reads on each side: stride 1, zero padding that keeps the
    map's size, the same on both axes; None otherwise."""
    found = attrs(node)
    kernel = list(found.get("kernel_shape", []))
    dilations = list(found.get("dilations", [1] * len(kernel)))
    if len(kernel) != 2 or any(s != 1 for s in found.get("strides", [1, 1])) or \
            found.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or \
            len(node.input) < 2 or kernel[0] != kernel[1] or dilations[0] != dilations[1] \
            or kernel[0] % 2 == 0:
        return None
    extent = dilations[0] * (kernel[0] - 1) // 2
    pads = list(found.get("pads", [0, 0, 0, 0]))
    return extent if pads == [extent] * 4 else None


def add_local_head(draft: Draft, level: Level, stack: Stack) -> None:
    """Add level ``level``'s local head: its inputs (``crop_inputs``, defaults of one
    row) and output (``crop_gradients``)."""
    graph = draft.graph
    crop, mask, seed = crop_inputs(level.layer)
    b = GraphBuilder(graph, f"onnxcam/local.{level.layer}")
    _, channels, _, _ = draft.shapes[stack.start].dims
    _, classes, _, _ = draft.shapes[stack.end].dims
    side = level.side
    renamed = {stack.start: crop}
    shapes = {crop: TensorShape((1, channels, side, side), (True, False, False, False))}
    for node in stack.nodes:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = b.fresh(node.op_type)
        inputs = [renamed.get(i, i) for i in node.input]
        if node.op_type == "Conv":  # the map's zero padding, where the crop passes its edge
            inputs[0] = b.op("Mul", [inputs[0], mask])
            shapes[inputs[0]] = shapes[renamed[node.input[0]]]
        del clone.input[:]
        clone.input.extend(inputs)
        del clone.output[:]
        out = b.fresh("local")
        clone.output.append(out)
        renamed[node.output[0]] = out
        width = draft.shapes[node.output[0]].dims[1]
        shapes[out] = TensorShape((1, width, side, side), (True, False, False, False))
        b.nodes.append(clone)
    centre = b.op("Slice", [renamed[stack.end], b.const([level.radius] * 2, "at"),
                            b.const([level.radius + 1] * 2, "to"), b.const([2, 3], "axes")])
    score = b.op("Flatten", [centre], axis=1)
    row = TensorShape((1, classes), (True, False))
    shapes[centre] = TensorShape((1, classes, 1, 1), (True, False, False, False))
    shapes[score] = row
    for node in squashing_ops(graph, draft.detection.scores if draft.detection else ""):
        score = b.op(node.op_type, [score], **attrs(node))
        shapes[score] = row
    shapes[seed] = row
    shapes[mask] = TensorShape((1, 1, side, side), (True, False, False, False))
    forward = list(b.nodes)
    sizes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in forward:
        for name in node.input:
            if name in sizes and name not in shapes:
                shapes[name] = TensorShape(sizes[name], (False,) * len(sizes[name]))
    ctx = VjpContext(b, shapes, initializer_values(graph), opset_version(draft.model),
                     needed={crop, *renamed.values(), *shapes} - {mask, seed})
    (gradient,) = backpropagate(ctx, forward, score, seed, [crop])
    b.nodes.append(helper.make_node("Identity", [gradient], [crop_gradients(level.layer)],
                                    name=b.fresh("Identity")))
    b.commit()
    for name, shape in ((crop, (1, channels, side, side)), (mask, (1, 1, side, side)),
                        (seed, (1, classes))):
        default = np.ones(shape, np.float32) if name == mask else np.zeros(shape, np.float32)
        graph.initializer.append(numpy_helper.from_array(default, name))
        graph.input.append(helper.make_tensor_value_info(name, FLOAT, [None, *shape[1:]]))
    graph.output.append(helper.make_tensor_value_info(
        crop_gradients(level.layer), FLOAT, [None, channels, side, side]))


def squashing_ops(graph: onnx.GraphProto, scores: str) -> list[onnx.NodeProto]:
    """The pointwise ops between the levels' Concat and ``scores``, first to last."""
    made = producers(graph)
    found = []
    node = made.get(scores)
    while node is not None and node.op_type in SQUASHING:
        found.append(node)
        node = made.get(node.input[0])
    return list(reversed(found))


def local_problem(draft: Draft, every: list[Level], levels: list[Level]) -> str:
    """Why the local heads disagree with the whole bundle, or "" when they agree: per
    level, one row seeded at a few cells of the level (the grid's corners, where the
    crop passes the map's edge, and random ones), each for a random class, on one of
    two images. Gradients add up over the seeds, and a level's cells reach its layer
    through its own stack alone, so the whole bundle's gradient at the layer is the
    sum of the local heads' for those cells: one run of the whole bundle checks them."""
    rng = np.random.default_rng(0)
    images = random_images(2, draft.height, draft.width, draft.channels, seed=11)
    classes = draft.shapes[draft.detection.scores].dims[1] if draft.detection else 1
    total = sum(level.height * level.width for level in every)
    weights = np.zeros((len(levels), classes, total), np.float32)
    checked = []  # per level: (cells, classes)
    for row, level in enumerate(levels):
        h, w = level.height, level.width
        cells = sorted({0, w - 1, (h - 1) * w, h * w - 1,
                        *(int(c) for c in rng.integers(0, h * w, CHECKED_CELLS - 4))})
        kinds = [int(k) for k in rng.integers(0, classes, len(cells))]
        weights[row, kinds, [level.first + cell for cell in cells]] = 1.0
        checked.append((cells, kinds))
    index = np.arange(len(levels)) % 2
    wanted = [layer_output(name, level.layer) for level in levels
              for name in (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS)]
    try:
        whole = dict(zip(wanted, lean_session(draft.model).run(wanted, {
            INPUT_IMAGE: images[index], INPUT_TARGET: np.zeros(len(levels), np.int64),
            INPUT_TARGET_WEIGHTS: weights})))
        worst = 0.0
        for row, (level, (cells, kinds)) in enumerate(zip(levels, checked)):
            got = local_gradients(draft.model, level,
                                  whole[layer_output(OUTPUT_ACTIVATIONS, level.layer)],
                                  np.full(len(cells), row), cells,
                                  np.eye(classes, dtype=np.float32)[kinds]).sum(axis=0)
            want = whole[layer_output(OUTPUT_GRADIENTS, level.layer)][row]
            worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() or 1.0)))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors too: the heads fail
        return str(exc).splitlines()[0] if str(exc) else repr(exc)
    return f"their gradients differ by {worst:.1e}" if worst > TOLERANCE else ""


def local_gradients(model: onnx.ModelProto, level: Level, maps: np.ndarray, images: np.ndarray,
                    cells: list[int], seeds: np.ndarray) -> np.ndarray:
    """The local head's gradients [R, C, h, w] at ``level``'s layer for rows of
    ``images`` (their maps ``maps[images]``), placed in the map."""
    from onnxcam.crops import crops, placed

    inputs = crop_inputs(level.layer)
    head = extract(model, dict.fromkeys(inputs, FLOAT), [crop_gradients(level.layer)])
    crop, mask = crops(maps, images, cells, level)
    (gradients,) = lean_session(head).run(None, dict(zip(inputs, (crop, mask, seeds))))
    return placed(gradients, cells, level)
