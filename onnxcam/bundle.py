"""The bundle format: the one contract between the exporter and the worker.

A bundle is a single ONNX file. Its graph takes ``image`` (uint8, NHWC), ``target``
(int64, -1 = top-1) and, optionally, ``target_weights`` (the backward pass's seed
over the logits) and returns the outputs named below. Everything a
worker needs to run it is stored in ``metadata_props`` under ``onnxcam.*`` keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnxcam.bundle_checks import check_detector, check_ops, graphs
from onnxcam.errors import BadTargetError, BundleError, nearest
from onnxcam.layout import ActivationLayout, Layout, TokenGrid
from onnxcam.words import clipped

# The newest format this onnxcam reads. Bundles are written as version 1 unless their
# logits are per pixel or per anchor (version 2), so that an older reader refuses only those.
FORMAT_VERSION = 2

# Graph inputs.
INPUT_IMAGE = "image"
INPUT_TARGET = "target"
# float32, the logits' rank and non-batch sizes: a weighting of the logits that seeds
# the backward pass. An initializer of batch 0 stands in when it is not fed.
INPUT_TARGET_WEIGHTS = "target_weights"
# The seed tensor itself, where the engine cuts the graph to run many targets per image.
SEED = "onnxcam/seed"

# Graph outputs.
OUTPUT_LOGITS = "logits"
OUTPUT_ACTIVATIONS = "activations"
OUTPUT_GRADIENTS = "gradients"
OUTPUT_CAM = "cam"
OUTPUT_WEIGHTS = "weights"  # Grad-CAM channel weights [N, C]; the only gradient an fd bundle has
# Whole-network gradients, NHWC [N, H, W, C], with respect to the model input.
OUTPUT_INPUT_GRADIENTS = "input_gradients"
OUTPUT_GUIDED_INPUT_GRADIENTS = "guided_input_gradients"  # guided backprop's ReLU rule
# A detector's boxes before suppression, [N, A, 4]: x0, y0, x1, y1 in input pixels.
OUTPUT_BOXES = "boxes"
# A detector that decodes its own detections (``output = detections``): its final boxes
# [1, D, 4] (x0, y0, x1, y1 in input pixels), scores [1, D], int64 labels [1, D], and
# each one's entry of the flattened logits it was picked from, int64 [1, D].
OUTPUT_DETECTION_BOXES = "detection_boxes"
OUTPUT_DETECTION_SCORES = "detection_scores"
OUTPUT_DETECTION_LABELS = "detection_labels"
OUTPUT_DETECTION_SOURCE = "detection_source"
DECODED_OUTPUTS = (OUTPUT_DETECTION_BOXES, OUTPUT_DETECTION_SCORES, OUTPUT_DETECTION_LABELS,
                   OUTPUT_DETECTION_SOURCE)
INPUT_GRADIENT_OUTPUTS = (OUTPUT_INPUT_GRADIENTS, OUTPUT_GUIDED_INPUT_GRADIENTS)
# The per-layer outputs; the first layer has them unsuffixed, layer i > 0 as ``cam.i``.
LAYER_OUTPUTS = (OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS, OUTPUT_WEIGHTS, OUTPUT_CAM)
RESERVED_NAMES = (
    INPUT_IMAGE, INPUT_TARGET, INPUT_TARGET_WEIGHTS, OUTPUT_LOGITS, OUTPUT_ACTIVATIONS,
    OUTPUT_GRADIENTS, OUTPUT_CAM, OUTPUT_WEIGHTS, OUTPUT_INPUT_GRADIENTS,
    OUTPUT_GUIDED_INPUT_GRADIENTS, OUTPUT_BOXES, *DECODED_OUTPUTS,
)

# Metadata keys.
PREFIX = "onnxcam."
KEY_FORMAT = PREFIX + "format_version"
KEY_VERSION = PREFIX + "version"
KEY_HEIGHT = PREFIX + "input_height"
KEY_WIDTH = PREFIX + "input_width"
KEY_CHANNELS = PREFIX + "input_channels"
KEY_PREPROCESS = PREFIX + "preprocess"
KEY_LAYOUT = PREFIX + "layout"
KEY_ACTIVATION_LAYOUT = PREFIX + "activation_layout"
KEY_LAYER = PREFIX + "target_layer"
KEY_LABELS = PREFIX + "labels"
KEY_NUM_CLASSES = PREFIX + "num_classes"
KEY_SOURCE_FORMAT = PREFIX + "source_format"
KEY_SOURCE_SHA256 = PREFIX + "source_sha256"
KEY_GRADIENT = PREFIX + "gradient"
KEY_FD_EPSILON = PREFIX + "fd_epsilon"
KEY_FD_CHUNK = PREFIX + "fd_chunk"
KEY_RESIZE = PREFIX + "resize"
KEY_REMOVED_HEAD = PREFIX + "removed_activation"
KEY_MODEL_INPUT = PREFIX + "model_input"  # the preprocessed tensor the model itself reads
KEY_HEAD = PREFIX + "head"  # how logits become probabilities; absent in older bundles: softmax
# Written only when the bundle has them, so older bundles read the same:
KEY_INPUT_GRADIENTS = PREFIX + "input_gradients"  # JSON list of the input-gradient outputs
KEY_LAYERS = PREFIX + "layers"  # JSON list of every exported layer, early to late
KEY_BATCH_SIZE = PREFIX + "batch_size"  # the one batch size a fixed-batch bundle runs at
# What the logits are: classes ([N, K], absent in older bundles) or pixels ([N, K, h, w]).
KEY_OUTPUT = PREFIX + "output"
# Where the part of the graph after the layer begins: JSON list of {name, batched, type}
# (the seed among them); only in bundles with ``target_weights`` and a free batch.
KEY_HEAD_INPUTS = PREFIX + "head_inputs"
# A detector's levels (JSON list of ``Level``): each explained at its own layer.
KEY_LEVELS = PREFIX + "levels"
# A token layer's grid ({"leading_tokens", "height", "width"}); its activation_layout is "ntc".
KEY_ACTIVATION_GRID = PREFIX + "activation_grid"

PREPROCESS_MODES = ("unit", "none", "caffe", "tf", "torch")
LAYOUTS = ("nhwc", "nchw")
TOKEN_LAYOUT = TokenGrid.value  # a token tensor [N, T, C] with its grid in metadata

# What metadata may claim. A bundle is input an attacker may control (anyone who can
# publish one to the store): these bounds stop a claim from sizing an allocation, and
# they sit far above any classifier's (the largest exported here: 1024x1024, 21k classes).
MAX_INPUT_SIDE = 8192
# How far a detector level's local head may read around a cell: a YOLO head's stack
# reads 2 cells; a hostile bundle must not make crops the size of images.
MAX_RADIUS = 32
MAX_INPUT_CHANNELS = 64
MAX_BATCH_SIZE = 4096
MAX_CLASSES = 1_000_000
GRADIENT_MODES = ("analytic", "fd")
# How a bundle's logits become class probabilities (``scores.probabilities``): one
# softmax over the classes, a sigmoid per class (multi-label), or none (the scores are
# the model's outputs as they are).
HEAD_SOFTMAX, HEAD_SIGMOID, HEAD_NONE = "softmax", "sigmoid", "none"
HEADS = (HEAD_SOFTMAX, HEAD_SIGMOID, HEAD_NONE)
# What the logits are: [N, K] class scores; a segmenter's [N, K, h, w] per pixel; a
# detector's [N, K, A] per anchor (box) before suppression, with ``boxes`` beside them.
OUTPUT_CLASSES, OUTPUT_PIXELS, OUTPUT_ANCHORS = "classes", "pixels", "anchors"
# A detector that decodes (and suppresses) in its own graph, as torchvision's do.
OUTPUT_DETECTIONS = "detections"
OUTPUT_KINDS = (OUTPUT_CLASSES, OUTPUT_PIXELS, OUTPUT_ANCHORS, OUTPUT_DETECTIONS)
DETECTOR_OUTPUTS = (OUTPUT_ANCHORS, OUTPUT_DETECTIONS)
# How callers bring an image to the bundle's size: stretched by one of Pillow's filters,
# or letterboxed as ultralytics' predict does (aspect kept by half-pixel bilinear as
# cv2.resize, centred, grey 114 around it).
RESIZE_LETTERBOX = "letterbox"
RESIZE_MODES = ("bilinear", "nearest", "bicubic", "lanczos", RESIZE_LETTERBOX)


@dataclass(frozen=True)
class HeadInput:
    """A tensor the part of the graph after the layer reads from before it: ``batched``
    when its first axis is the image batch (rows are gathered from it per target)."""

    name: str
    batched: bool
    elem_type: int  # onnx.TensorProto data type

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "batched": self.batched, "type": self.elem_type}


@dataclass(frozen=True)
class Level:
    """One level of a detector's head: the exported layer (``layer``, its output
    index, ``LayerEntry.index``) whose map its anchors' scores read, and those anchors:
    ``first`` to ``first + height * width``, one per cell of the layer's grid, row
    by row. Where the scores read that map through convolutions alone, ``local``:
    the bundle has a local head for the level (``crop_inputs``, ``crop_gradients``),
    and ``radius`` is how far from its cell the map reaches an anchor's score."""

    layer: int
    first: int
    height: int
    width: int
    radius: int = 0
    local: bool = False

    @property
    def side(self) -> int:
        """The side of a local head's square crop: the cell and ``radius`` around it."""
        return 2 * self.radius + 1

    def holds(self, anchor: int) -> bool:
        return self.first <= anchor < self.first + self.height * self.width

    def to_json(self) -> dict[str, int | bool]:
        return {"layer": self.layer, "first": self.first, "height": self.height,
                "width": self.width, "radius": self.radius, "local": self.local}


def level_from_json(entry: Mapping[str, Any]) -> Level:
    return Level(int(entry["layer"]), int(entry["first"]), int(entry["height"]),
                 int(entry["width"]), int(entry["radius"]), entry["local"] is True)


def crop_inputs(level: int) -> tuple[str, str, str]:
    """A local head's inputs: the crop [R, C, side, side] of the layer around each row's
    cell (zero outside the map), its mask [R, 1, side, side] (1 inside the map), and
    the row's class weights [R, K] at that cell."""
    return (f"onnxcam/crop.{level}", f"onnxcam/crop_mask.{level}",
            f"onnxcam/crop_seed.{level}")


def crop_gradients(level: int) -> str:
    """A local head's output: d (seed . scores at the cell) / d crop, [R, C, side, side]."""
    return f"onnxcam/crop_gradients.{level}"


def layer_output(name: str, index: int) -> str:
    """The output ``name`` (activations, gradients, weights, cam) of exported layer ``index``."""
    return name if index == 0 else f"{name}.{index}"


def grid_to_json(grid: TokenGrid) -> dict[str, int]:
    return {"leading_tokens": grid.leading, "height": grid.height, "width": grid.width}


def grid_from_json(value: Any) -> TokenGrid | None:
    """The grid stored as ``grid_to_json`` wrote it; None for no grid (a 4-D layer)."""
    if not value:
        return None
    return TokenGrid(int(value["leading_tokens"]), int(value["height"]), int(value["width"]))


def activation_layout(layout: str, grid: TokenGrid | None) -> ActivationLayout:
    """How a layer's activations lie: a ``Layout``, or the ``TokenGrid`` of a token layer."""
    if layout == TOKEN_LAYOUT:
        if grid is None:
            raise BundleError("a token layer (activation_layout ntc) without its grid")
        return grid
    return Layout.of(layout)


def is_activation_output(name: str) -> bool:
    base, _, index = name.partition(".")
    return base == OUTPUT_ACTIVATIONS and (not index or index.isdigit())


@dataclass(frozen=True)
class LayerEntry:
    """One exported layer: its name, output index (0: unsuffixed) and activation layout;
    a token layer (layout ``ntc``) also has its grid."""

    name: str
    index: int
    layout: str
    grid: TokenGrid | None = None

    def output(self, name: str) -> str:
        return layer_output(name, self.index)

    @property
    def activation_layout(self) -> ActivationLayout:
        """How ``activations`` and ``gradients`` lie; ``to_nchw`` makes them NCHW maps."""
        return activation_layout(self.layout, self.grid)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "index": self.index, "layout": self.layout,
                                 "outputs": {base: self.output(base) for base in LAYER_OUTPUTS}}
        if self.grid is not None:
            entry["grid"] = grid_to_json(self.grid)
        return entry


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle's metadata says about it."""

    height: int
    width: int
    channels: int
    preprocess: str
    layout: str
    activation_layout: str
    target_layer: str
    num_classes: int
    labels: list[str]
    gradient: str
    source_format: str = ""
    source_sha256: str = ""
    version: str = ""
    resize: str = "bilinear"
    removed_activation: str = ""
    fd_epsilon: float = 0.0
    fd_chunk: int = 0
    model_input: str = ""
    input_gradients: tuple[str, ...] = ()  # which of INPUT_GRADIENT_OUTPUTS the bundle has
    # With several exported layers: all of them, early to late (empty for one layer).
    all_layers: tuple[LayerEntry, ...] = ()
    # 0: any batch size; else the model's own batch, which callers must run it at.
    batch_size: int = 0
    activation_grid: TokenGrid | None = None  # the primary layer's grid, if a token layer
    head: str = HEAD_SOFTMAX  # one of HEADS
    output: str = OUTPUT_CLASSES  # one of OUTPUT_KINDS
    # Bundles that take ``target_weights``: the tensors the engine cuts the graph at
    # (``SEED`` among them) to run many targets per image; empty in older bundles.
    head_inputs: tuple[HeadInput, ...] = ()
    # A detector explained per level (``Level``), each anchor at its own level's layer;
    # empty: every row at the primary layer.
    levels: tuple[Level, ...] = ()
    # Whether the graph takes ``target_weights``; set by ``read_bundle``.
    weighted: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[LayerEntry]:
        """Every exported layer, early to late; index 0 is ``target_layer``."""
        if self.all_layers:
            return list(self.all_layers)
        return [LayerEntry(self.target_layer, 0, self.activation_layout, self.activation_grid)]

    @property
    def has_gradients(self) -> bool:
        """True when the bundle exposes full gradient maps, not just fd channel weights."""
        return self.gradient == "analytic"

    @property
    def detector(self) -> bool:
        """Whether the rows are detections (``anchors`` or ``detections`` logits)."""
        return self.output in DETECTOR_OUTPUTS

    @property
    def grey(self) -> bool:
        return self.channels == 1

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def class_index(self, target: int | str) -> int:
        """A class by number or by label (``"cat"``); a label wins over a number
        written as text, so a bundle labelled "0".."9" reads them as labels. Only ASCII
        digits make a number: ``"²"`` and ``"١"`` are labels, as any other text."""
        if isinstance(target, str):
            if target in self.labels:
                return self.labels.index(target)
            if not CLASS_NUMBER.match(target):
                raise BadTargetError(f"no class labelled {clipped(target)!r}"
                                     f"{_suggest(target, self.labels)}")
            target = int(target)
        if not 0 <= int(target) < self.num_classes:
            raise BadTargetError(f"target {int(target)} is outside [0, {self.num_classes})")
        return int(target)

    def to_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` entries that describe this bundle."""
        props = {
            KEY_FORMAT: "1" if self.output == OUTPUT_CLASSES else "2",
            KEY_VERSION: self.version,
            KEY_HEIGHT: str(self.height),
            KEY_WIDTH: str(self.width),
            KEY_CHANNELS: str(self.channels),
            KEY_PREPROCESS: self.preprocess,
            KEY_LAYOUT: self.layout,
            KEY_ACTIVATION_LAYOUT: self.activation_layout,
            KEY_LAYER: self.target_layer,
            KEY_NUM_CLASSES: str(self.num_classes),
            KEY_LABELS: json.dumps(self.labels),
            KEY_GRADIENT: self.gradient,
            KEY_SOURCE_FORMAT: self.source_format,
            KEY_SOURCE_SHA256: self.source_sha256,
            KEY_RESIZE: self.resize,
            KEY_REMOVED_HEAD: self.removed_activation,
            KEY_MODEL_INPUT: self.model_input,
            KEY_HEAD: self.head,
        }
        if self.gradient == "fd":
            props[KEY_FD_EPSILON] = repr(self.fd_epsilon)
            props[KEY_FD_CHUNK] = str(self.fd_chunk)
        if self.input_gradients:
            props[KEY_INPUT_GRADIENTS] = json.dumps(list(self.input_gradients))
        if self.all_layers:
            props[KEY_LAYERS] = json.dumps([e.to_json() for e in self.all_layers])
        if self.batch_size:
            props[KEY_BATCH_SIZE] = str(self.batch_size)
        if self.activation_grid is not None:
            props[KEY_ACTIVATION_GRID] = json.dumps(grid_to_json(self.activation_grid))
        if self.output != OUTPUT_CLASSES:
            props[KEY_OUTPUT] = self.output
        if self.head_inputs:
            props[KEY_HEAD_INPUTS] = json.dumps([each.to_json() for each in self.head_inputs])
        if self.levels:
            props[KEY_LEVELS] = json.dumps([each.to_json() for each in self.levels])
        props.update(self.extra)
        return props

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> BundleInfo:
        """Parse ``metadata_props``; raise BundleError if this is no onnxcam bundle."""
        if KEY_FORMAT not in props:
            raise BundleError("not an onnxcam bundle: no onnxcam.format_version metadata")
        if not props[KEY_FORMAT].isascii() or not props[KEY_FORMAT].isdigit():
            raise BundleError(f"onnxcam.format_version is {clipped(props[KEY_FORMAT])!r}, "
                              "not a number")
        if int(props[KEY_FORMAT]) > FORMAT_VERSION:
            raise BundleError(
                f"bundle format {props[KEY_FORMAT]} is newer than this onnxcam "
                f"understands ({FORMAT_VERSION})"
            )
        try:
            known = {
                KEY_FORMAT, KEY_VERSION, KEY_HEIGHT, KEY_WIDTH, KEY_CHANNELS, KEY_PREPROCESS,
                KEY_LAYOUT, KEY_ACTIVATION_LAYOUT, KEY_LAYER, KEY_NUM_CLASSES, KEY_LABELS,
                KEY_GRADIENT, KEY_SOURCE_FORMAT, KEY_SOURCE_SHA256, KEY_RESIZE,
                KEY_REMOVED_HEAD, KEY_FD_EPSILON, KEY_FD_CHUNK, KEY_MODEL_INPUT,
                KEY_INPUT_GRADIENTS, KEY_LAYERS, KEY_BATCH_SIZE, KEY_ACTIVATION_GRID,
                KEY_HEAD, KEY_OUTPUT, KEY_HEAD_INPUTS, KEY_LEVELS,
            }
            layers = tuple(LayerEntry(str(e["name"]), int(e["index"]), str(e["layout"]),
                                      grid_from_json(e.get("grid")))
                           for e in json.loads(props.get(KEY_LAYERS, "[]")))
            grid = grid_from_json(json.loads(props.get(KEY_ACTIVATION_GRID, "null")))
            activation_layout(props[KEY_ACTIVATION_LAYOUT], grid)  # a token layer has its grid
            info = cls(
                height=int(props[KEY_HEIGHT]),
                width=int(props[KEY_WIDTH]),
                channels=int(props[KEY_CHANNELS]),
                preprocess=props[KEY_PREPROCESS],
                layout=props[KEY_LAYOUT],
                activation_layout=props[KEY_ACTIVATION_LAYOUT],
                target_layer=props[KEY_LAYER],
                num_classes=int(props[KEY_NUM_CLASSES]),
                labels=list(json.loads(props.get(KEY_LABELS, "[]"))),
                gradient=props[KEY_GRADIENT],
                source_format=props.get(KEY_SOURCE_FORMAT, ""),
                source_sha256=props.get(KEY_SOURCE_SHA256, ""),
                version=props.get(KEY_VERSION, ""),
                resize=props.get(KEY_RESIZE, "bilinear"),
                removed_activation=props.get(KEY_REMOVED_HEAD, ""),
                fd_epsilon=float(props.get(KEY_FD_EPSILON, "0")),
                fd_chunk=int(props.get(KEY_FD_CHUNK, "0")),
                model_input=props.get(KEY_MODEL_INPUT, ""),
                input_gradients=tuple(json.loads(props.get(KEY_INPUT_GRADIENTS, "[]"))),
                all_layers=layers,
                batch_size=int(props.get(KEY_BATCH_SIZE, "0")),
                activation_grid=grid,
                head=props.get(KEY_HEAD, HEAD_SOFTMAX),
                output=props.get(KEY_OUTPUT, OUTPUT_CLASSES),
                head_inputs=tuple(HeadInput(str(e["name"]), bool(e["batched"]), int(e["type"]))
                                  for e in json.loads(props.get(KEY_HEAD_INPUTS, "[]"))),
                levels=tuple(level_from_json(e) for e in json.loads(props.get(KEY_LEVELS, "[]"))),
                extra={k: v for k, v in props.items() if k.startswith(PREFIX) and k not in known},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"onnxcam bundle metadata is incomplete or malformed: {exc}") from exc
        info.check_bounds()
        return info

    def check_bounds(self) -> None:
        """Refuse metadata whose numbers no exported bundle has (see ``MAX_INPUT_SIDE``),
        or whose modes and layouts this onnxcam does not know."""
        claims = (("input height", self.height, 1, MAX_INPUT_SIDE),
                  ("input width", self.width, 1, MAX_INPUT_SIDE),
                  ("input channels", self.channels, 1, MAX_INPUT_CHANNELS),
                  ("batch size", self.batch_size, 0, MAX_BATCH_SIZE),
                  ("number of classes", self.num_classes, 1, MAX_CLASSES))
        for what, value, low, high in claims:
            if not low <= value <= high:
                raise BundleError(f"onnxcam bundle metadata claims {what} {value}, "
                                  f"outside [{low}, {high}]")
        choices = [("preprocessing", self.preprocess, PREPROCESS_MODES),
                   ("layout", self.layout, LAYOUTS), ("gradient", self.gradient, GRADIENT_MODES),
                   ("head", self.head, HEADS), ("output", self.output, OUTPUT_KINDS),
                   ("resize", self.resize, RESIZE_MODES)]
        choices += [(f"for layer {clipped(layer.name)!r} activation layout", layer.layout,
                     (*LAYOUTS, TOKEN_LAYOUT)) for layer in self.layers]
        for name, mode, allowed in choices:
            if mode not in allowed:
                raise BundleError(f"onnxcam bundle metadata claims {name} {clipped(mode)!r}, "
                                  f"not one of {', '.join(allowed)}")
        if self.labels and len(self.labels) != self.num_classes:
            raise BundleError(f"onnxcam bundle metadata has {len(self.labels)} labels for "
                              f"{self.num_classes} classes")
        self.check_levels()

    def check_levels(self) -> None:
        """Refuse levels that no detector has: on another output, at no layer, on a grid
        or a crop larger than an input, or whose anchors overlap."""
        if self.levels and self.output != OUTPUT_ANCHORS:
            raise BundleError(f"onnxcam bundle metadata gives levels to a {self.output!r} "
                              "bundle; only detectors (output anchors) have them")
        end = 0
        for level in self.levels:
            if not 0 <= level.layer < len(self.layers) or level.first < end or \
                    not (1 <= level.height <= MAX_INPUT_SIDE and
                         1 <= level.width <= MAX_INPUT_SIDE) or \
                    not 0 <= level.radius <= MAX_RADIUS:
                raise BundleError(f"onnxcam bundle metadata claims a level {level.to_json()} "
                                  "that no detector has")
            end = level.first + level.height * level.width


@dataclass(frozen=True)
class Bundle:
    """A bundle read once: its bytes (for sessions) and its checked metadata."""

    data: bytes
    info: BundleInfo
    name: str  # the path, or "bundle" for bytes: how messages name it


def read_bundle(source: str | Path | bytes) -> Bundle:
    """The one bundle reader, for the engine and the client alike.

    ``source`` is a path or the file's bytes. A file that cannot be read, is not ONNX,
    lacks onnxcam metadata, has other inputs than ``image`` and ``target``, uses
    an op outside ``bundle_checks.ALLOWED_OPS``, or is a detection bundle whose graph
    is not what its metadata says (``bundle_checks.check_detector``) raises
    ``BundleError`` naming it, before any session is made.
    """
    import onnx

    name = "bundle" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BundleError(f"{name}: cannot read the bundle ({exc.strerror or exc})") from None
    try:
        model = onnx.load_from_string(data)
    except Exception:  # noqa: BLE001 - any parse failure: not an ONNX file
        raise BundleError(f"{name}: not an ONNX file") from None
    try:
        info = BundleInfo.from_metadata({p.key: p.value for p in model.metadata_props})
    except BundleError as exc:
        raise BundleError(f"{name}: {exc}") from None
    defaults = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - defaults
    if inputs != {INPUT_IMAGE, INPUT_TARGET}:
        raise BundleError(f"{name}: bundle inputs are {sorted(inputs)}, expected image and target")
    weighted = INPUT_TARGET_WEIGHTS in {i.name for i in model.graph.input}
    if info.head_inputs and not weighted:
        raise BundleError(f"{name}: the metadata names head inputs, but the graph takes no "
                          f"{INPUT_TARGET_WEIGHTS}")
    outside = external_data(model)
    if outside:
        raise BundleError(f"{name}: the bundle keeps tensor data outside its file (at "
                          f"{outside!r}); a bundle carries its weights inside, so it is refused")
    check_ops(model, name, info.output == OUTPUT_DETECTIONS)
    if info.output == OUTPUT_ANCHORS:
        check_detector(model, info.num_classes, name)
    image = next(i for i in model.graph.input if i.name == INPUT_IMAGE)
    _check_image_input(name, image, info)
    return Bundle(data, replace(info, weighted=weighted), name)


def external_data(model: Any) -> str | None:
    """Where the first tensor stored outside the file says it lies, or None. Every
    tensor is looked at: initializers, Constant nodes' values and subgraphs' (an
    onnxruntime session would read such a location relative to its working folder)."""
    from onnx import TensorProto

    def tensors(graph: Any) -> Any:
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors

    for tensor in (t for each in graphs(model.graph) for t in tensors(each)):
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            where = {entry.key: entry.value for entry in tensor.external_data}
            return where.get("location", tensor.name)
    return None


def _check_image_input(name: str, image: Any, info: BundleInfo) -> None:
    """The graph's image input agrees with the metadata: its fixed sizes are the
    metadata's height, width and channels, and its fixed batch the bundle's.
    Precondition: ``info`` passed ``check_bounds``."""
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in image.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise BundleError(f"{name}: the image input has {len(dims)} axes, not 4")
    # Images go in as uint8 [N, H, W, C] whatever the model's own layout; a fixed-batch
    # bundle's batch axis is that number (the exporter writes it so).
    expected = [info.batch_size or None, info.height, info.width, info.channels]
    for axis, (found, want) in enumerate(zip(dims, expected)):
        # The batch axis is free (None) unless the metadata fixes it; the others may be.
        if found != want and (axis == 0 or found is not None):
            raise BundleError(f"{name}: the image input's axis {axis} is {found}, but the "
                              f"metadata says {want}")


def read_bundle_info(source: str | Path | Any) -> BundleInfo:
    """Read a bundle's metadata from a path, an ``onnx.ModelProto`` or an ORT session."""
    if hasattr(source, "get_modelmeta"):
        return BundleInfo.from_metadata(source.get_modelmeta().custom_metadata_map)
    if hasattr(source, "metadata_props"):
        return BundleInfo.from_metadata({p.key: p.value for p in source.metadata_props})
    import onnx

    path = Path(source)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise BundleError(f"{path}: not an ONNX file ({exc.__class__.__name__})") from exc
    return BundleInfo.from_metadata({p.key: p.value for p in model.metadata_props})



# A class number written as text: ASCII digits only. (str.isdigit() also takes "²" and
# "١", which int() then refuses or reads as 1.)
CLASS_NUMBER = re.compile(r"^\s*-?[0-9]+\s*$", re.ASCII)


def _suggest(name: str, choices: list[str]) -> str:
    """"; did you mean ...?" for the nearest of ``choices``, or nothing."""
    close = nearest(name, choices)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return " (the bundle has no labels; give a class number)" if not choices else ""
