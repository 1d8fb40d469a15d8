"""The ONNX frontend: any single-input image classifier, from any framework."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import helper

from onnxcam.bundle import PREFIX, BundleInfo
from onnxcam.errors import BundleError, OnnxcamError, UnsupportedModelError
from onnxcam.exporter.batch import BATCH_SYMBOL, BatchPlan, free_batch, static_batch
from onnxcam.exporter.detectors import BOX_ROWS, Detection, find_detection, ultralytics_metadata
from onnxcam.exporter.frontends import (
    OutputShape,
    Reference,
    SourceModel,
    Tap,
    check_scores,
    choose_output,
    pixels_layout,
    sha256_of,
    sha256_of_bytes,
)
from onnxcam.exporter.layers import (
    ACTIVATION,
    CONV,
    MERGE,
    OTHER,
    LayerInfo,
    choose_layers,
    with_default,
)
from onnxcam.exporter.module_paths import TORCH_PRODUCER, module_outputs, paths_by_tensor
from onnxcam.exporter.shapes import lean_session, run_with_outputs
from onnxcam.exporter.torchvision_detectors import (
    add_batch_axis,
    decoded_outputs,
    expose_decoded,
    torchvision_detection,
)
from onnxcam.exporter.transformer_graph import (
    TokenGrids,
    attention_tensors,
    is_residual_sum,
)
from onnxcam.graph import (
    backward_reachable,
    forward_reachable,
    opset_version,
    producers,
    real_inputs,
    toposort,
)
from onnxcam.layout import ActivationLayout, Layout
from onnxcam.runtime import cpu_session, run_each_in_copies

log = logging.getLogger(__name__)

ROLES = {
    "Conv": CONV, "ConvTranspose": CONV, "ConvInteger": CONV, "QLinearConv": CONV,
    "Add": MERGE, "Sum": MERGE, "Concat": MERGE, "Mul": MERGE, "Max": MERGE,
    "Relu": ACTIVATION, "Clip": ACTIVATION, "LeakyRelu": ACTIVATION, "PRelu": ACTIVATION,
    "Elu": ACTIVATION, "Selu": ACTIVATION, "Sigmoid": ACTIVATION, "Tanh": ACTIVATION,
    "HardSwish": ACTIVATION, "HardSigmoid": ACTIVATION, "Gelu": ACTIVATION,
}
# Ops whose 4-D output is always NCHW, whatever the model's input layout.
NCHW_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "BatchNormalization",
            "GlobalAveragePool", "GlobalMaxPool", "LRN", "InstanceNormalization"}


def load_proto(path: Path) -> onnx.ModelProto:
    try:
        # Checked from the file, before loading: checking the loaded proto would
        # serialize it and parse it again, two more copies of the weights at once.
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    return model


def refuse_bundle(model: onnx.ModelProto, name: str) -> None:
    """Refuse a bundle onnxcam already made: its inputs (image, target) would read as
    "two inputs", where the user only needs to explain images with it."""
    props = {p.key: p.value for p in model.metadata_props}
    if not any(key.startswith(PREFIX) for key in props):
        return
    try:
        layers = ", ".join(entry.name for entry in BundleInfo.from_metadata(props).layers)
    except BundleError:  # a damaged or future bundle: still not a model to export
        layers = ""
    exported = f" (exported layers: {layers})" if layers else ""
    raise UnsupportedModelError(
        f"{name} is already an onnxcam bundle{exported}; explain images with it: "
        f"onnxcam explain {name} IMAGE... --out DIR")


@functools.cache
def runtime_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads, found by trying: its
    releases do not say it anywhere a program can read."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    for version in range(onnx.IR_VERSION, 3, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  ir_version=version)
        try:
            cpu_session(probe.SerializeToString())
        except Exception:  # noqa: BLE001 - too new for this onnxruntime: try the one before
            continue
        return version
    return 3


def fit_ir_version(model: onnx.ModelProto, name: str) -> None:
    """Lower ``model``'s IR version to what onnxruntime loads, when its opsets allow it.

    A newer onnx writes a newer IR version by default, though the graph uses nothing
    the older one lacks; the opsets say which IR version the ops need.
    """
    newest = runtime_ir_version()
    if model.ir_version <= newest:
        return
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if needed > newest:
        raise UnsupportedModelError(
            f"{name}: the model's IR version {model.ir_version} (its opset needs at least "
            f"{needed}) is newer than onnxruntime {onnxruntime.__version__} reads "
            f"(IR version {newest}); upgrade onnxruntime")
    log.info("%s: IR version %d lowered to %d, the newest onnxruntime %s reads", name,
             model.ir_version, newest, onnxruntime.__version__)
    model.ir_version = newest


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Bring the default domain up to ``opset``; the gradient rules assume >= 17."""
    if opset_version(model) >= opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as exc:
        raise UnsupportedModelError(f"cannot convert the model to opset {opset}: {exc}") from exc


def infer_layout(dims: list[int | str], layout: str | None) -> Layout:
    """NHWC or NCHW from a rank-4 input shape; ``layout`` decides when both fit."""
    if layout:
        return Layout.of(layout)
    looks_nchw = dims[1] in (1, 3, 4)
    looks_nhwc = dims[3] in (1, 3, 4)
    if looks_nchw and not looks_nhwc:
        return Layout.NCHW
    if looks_nhwc and not looks_nchw:
        return Layout.NHWC
    raise UnsupportedModelError(f"cannot tell the layout of input shape {dims}; pass --layout")


def fix_input(
    model: onnx.ModelProto, layout: str | None, input_size: tuple[int, int] | None
) -> tuple[Layout, int, int, int]:
    """Check the single rank-4 input and pin its spatial size. Returns layout, H, W, C.

    A symbolic batch becomes ``N``; a fixed one is left for ``free_batch``.
    """
    graph = model.graph
    inputs = real_inputs(graph)
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "onnxcam needs one image input"
        )
    dims_proto = inputs[0].type.tensor_type.shape.dim
    if len(dims_proto) != 4:
        raise UnsupportedModelError(f"the input has rank {len(dims_proto)}; onnxcam needs rank 4")
    dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                             for d in dims_proto]
    found = infer_layout(dims, layout)
    hw_axes = found.spatial_axes
    channels = dims[found.channel_axis]
    if not isinstance(channels, int) or channels < 1:
        raise UnsupportedModelError(f"the input's channel count is not fixed: {dims}")
    static = [dims[a] for a in hw_axes]
    if input_size is not None:
        if all(isinstance(s, int) and s > 0 for s in static) and tuple(static) != input_size:
            raise UnsupportedModelError(
                f"--input-size {input_size[0]} {input_size[1]} does not match the model's "
                f"fixed size {static[0]}x{static[1]}"
            )
        height, width = input_size
    elif all(isinstance(s, int) and s > 0 for s in static):
        height, width = int(static[0]), int(static[1])
    else:
        raise UnsupportedModelError("the input's size is dynamic; pass --input-size H W")
    for axis, value in zip(hw_axes, (height, width)):
        dims_proto[axis].Clear()
        dims_proto[axis].dim_value = value
    if not static_batch(model):  # a fixed batch is free_batch's to judge
        dims_proto[0].Clear()
        dims_proto[0].dim_param = BATCH_SYMBOL
    return found, height, width, int(channels)


def layer_layout(graph: onnx.GraphProto, layer: LayerInfo, input_layout: Layout
                 ) -> ActivationLayout:
    """How ``layer``'s activations lie: its token grid, or a 4-D tensor's layout."""
    if layer.grid is not None:
        return layer.grid
    return tensor_layout(graph, layer.tensor, input_layout)


def tensor_layout(graph: onnx.GraphProto, name: str, input_layout: Layout) -> Layout:
    """The layout of a 4-D tensor: NCHW after ONNX's spatial ops, else traced back."""
    made_by = producers(graph)
    inputs = real_inputs(graph)
    live = forward_reachable(graph, inputs[0].name) if inputs else set()
    seen = set()
    while name in made_by and name not in seen:
        seen.add(name)
        node = made_by[name]
        if node.op_type in NCHW_OPS:
            return Layout.NCHW
        if node.op_type == "Transpose":
            perm = list(helper.get_attribute_value(node.attribute[0])) if node.attribute else []
            if perm == [0, 2, 3, 1]:
                return Layout.NHWC
            if perm == [0, 3, 1, 2]:
                return Layout.NCHW
        # The first input computed from the image: the legacy torch exporter writes a
        # Linear's bias first (Add(bias, MatMul)), which Swin V2's post-norm norm1 reads.
        name = next((i for i in node.input if i in live), node.input[0] if node.input else "")
    return input_layout


def list_layers(
    model: onnx.ModelProto, input_name: str, sample: np.ndarray
) -> list[LayerInfo]:
    """Every node output feeding the classifier, with its shape at batch 1."""
    graph = model.graph
    feeding = backward_reachable(graph, [graph.output[0].name])
    nodes = [n for n in graph.node if n.output and n.output[0] in feeding
             and n.op_type not in ("Constant", "Shape")]
    values = run_with_outputs(model, [n.output[0] for n in nodes], {input_name: sample},
                              lean=True)
    made_by = producers(graph)
    floats = {name for name, value in values.items() if value.dtype.kind == "f"}
    modules = paths_by_tensor(module_outputs(
        graph, model.producer_name == TORCH_PRODUCER, floats))
    live = forward_reachable(graph, input_name)
    attention = attention_tensors(graph, live)
    layers = []
    grids = TokenGrids()
    for node in nodes:
        data = node.input[0] if node.input else ""
        source = made_by.get(data)
        shape = tuple(int(d) for d in values[node.output[0]].shape)
        grids.see(node.op_type, shape)
        # An Add of a constant (a Linear's bias) is no merge of two branches.
        merge = node.op_type not in ("Add", "Sum") or is_residual_sum(node, live)
        layers.append(LayerInfo(
            name=node.name or node.output[0],
            op=node.op_type,
            shape=shape,
            role=ROLES.get(node.op_type, OTHER) if merge else OTHER,
            source=(source.name or source.output[0]) if source is not None else None,
            tensor=node.output[0],
            grid=grids.grid(shape),
            modules=modules.get(node.output[0], ()),
            attention=node.output[0] in attention,
        ))
    return layers


def output_shapes(model: onnx.ModelProto, input_name: str, sample: np.ndarray
                  ) -> dict[str, OutputShape]:
    """Every graph output's shape on ``sample``, in graph order."""
    names = [o.name for o in model.graph.output]
    values = run_with_outputs(model, names, {input_name: sample}, lean=True)
    return {name: tuple(int(d) for d in values[name].shape) for name in names}


def keep_output(graph: onnx.GraphProto, name: str) -> None:
    """Make ``name`` the graph's only output; ``tidy`` later prunes what fed the others."""
    kept = [o for o in graph.output if o.name == name]
    del graph.output[:]
    graph.output.extend(kept)


def check_layers_output(graph: onnx.GraphProto, layers: list[LayerInfo], layout: Layout
                        ) -> Layout | None:
    """Refuse an output that holds no class scores, and return the layout of per-pixel
    ones (None for a score vector); ``layers`` holds its shape (its producer is listed)."""
    output = graph.output[0].name
    shape = next((layer.shape for layer in layers if layer.tensor == output), None)
    if shape is None:
        return None
    check_scores(output, shape)
    return pixels_layout(shape, layout)


@contextmanager
def runtime_errors(name: str) -> Iterator[None]:
    """onnxruntime's failures as one line naming the model; onnxcam's own pass through."""
    try:
        yield
    except OnnxcamError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(f"{name}: onnxruntime cannot run the model ({exc})") from exc


@dataclass
class Prepared:
    model: onnx.ModelProto
    input_name: str
    layout: Layout
    height: int
    width: int
    channels: int
    layers: list[LayerInfo]
    batch_size: int = 0  # 0: any batch; else the one the model runs at (free_batch)
    batch_reason: str = ""  # why the batch stays fixed, in a few words
    pixels_layout: Layout | None = None  # a segmenter's output layout (SourceModel's)
    detection: Detection | None = None  # a detector's scores and boxes (SourceModel's)


def prepare(
    path: Path | onnx.ModelProto, layout: str | None, input_size: tuple[int, int] | None,
    opset: int, logits: str | None = None,
) -> Prepared:
    """Load (or copy), upgrade, check the input, free its batch, keep the class scores'
    output (``logits``, or the only one) and list the layers that feed it."""
    if isinstance(path, onnx.ModelProto):
        name, loaded = "the model", onnx.ModelProto()
        loaded.CopyFrom(path)  # the caller's model stays as it is
    else:
        name, loaded = str(path), load_proto(path)
    refuse_bundle(loaded, name)
    ultralytics = ultralytics_metadata(loaded)
    decoded = None if ultralytics is not None else decoded_outputs(loaded)
    fit_ir_version(loaded, name)
    model = upgrade_opset(loaded, max(opset, 17))
    toposort(model.graph)
    if decoded is not None:
        add_batch_axis(model)
    found, height, width, channels = fix_input(model, layout, input_size)
    input_name = real_inputs(model.graph)[0].name

    def samples(count: int) -> np.ndarray:
        nhwc = np.random.default_rng(count).uniform(0, 1, (count, height, width, channels))
        return to_layout(nhwc.astype(np.float32), found)

    if decoded is not None:
        with runtime_errors(name):
            return prepare_decoded(model, decoded, input_name, found, height, width,
                                   channels, samples(1))
    with runtime_errors(name):
        plan = free_batch(model, samples)
        sample = samples(plan.fixed or 1)
        if len(plan.model.graph.output) > 1 or logits is not None:
            shapes = output_shapes(plan.model, input_name, sample)
            keep_output(plan.model.graph, choose_output(shapes, logits))
        layers = list_layers(plan.model, input_name, sample)
    if ultralytics is not None:
        detection = find_detection(plan.model, layers, ultralytics)
        # Its default, starred by ``onnxcam layers`` too (not the output's Concat).
        return Prepared(plan.model, input_name, found, height, width, channels,
                        with_default(layers, *detection.layers), plan.fixed, plan.brief,
                        detection=detection)
    pixels = check_layers_output(plan.model.graph, layers, found)
    return Prepared(plan.model, input_name, found, height, width, channels, layers, plan.fixed,
                    plan.brief, pixels)


# A graph with a rank-3 image input holds no batch axis to free (torchvision's detectors).
NO_BATCH_AXIS = "the model reads one image, with no batch axis"


def prepare_decoded(model: onnx.ModelProto, outputs: tuple[str, str, str], input_name: str,
                    layout: Layout, height: int, width: int, channels: int,
                    sample: np.ndarray) -> Prepared:
    """A detector that decodes its own detections (``torchvision_detectors``), its input
    given a batch axis of 1: its logits exposed, its layers listed, the batch fixed at 1."""
    classes, decoded = expose_decoded(model, outputs, lambda: {input_name: sample})
    layers = list_layers(model, input_name, sample)
    detection = torchvision_detection(model, layers, classes, decoded)
    plan = BatchPlan(model, 1, (), NO_BATCH_AXIS, "no batch axis")
    return Prepared(plan.model, input_name, layout, height, width, channels,
                    with_default(layers, *detection.layers), plan.fixed, plan.brief,
                    detection=detection)


def load(
    path: Path | onnx.ModelProto,
    layer: str | Sequence[str] | None = None,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
    opset: int = 17,
    logits: str | None = None,
) -> SourceModel:
    ready = prepare(path, layout, input_size, opset, logits)
    if layer is None and ready.detection is not None:
        layer = detector_layer(ready.detection)
    layers = choose_layers(ready.layers, layer)
    chosen = layers[0]
    log.info("target layers: %s", ", ".join(f"{c.name} ({c.op}, {c.tensor})" for c in layers))
    output = ready.model.graph.output[0].name

    def reference(images: np.ndarray, targets: np.ndarray, **_: object) -> Reference:
        # ``ready.model`` is the source's model, which the passes only ever read a copy
        # of (``Draft.from_source``): no second copy of its weights is kept for this.
        feeds = {ready.input_name: to_layout(images, ready.layout)}
        session = lean_session(ready.model)
        # Each image among copies of itself at a fixed batch, as verify runs the bundle.
        (logits,) = run_each_in_copies(session.run, [output], feeds, ready.batch_size) \
            if ready.batch_size else session.run([output], feeds)
        if ready.detection is not None and not ready.detection.decoded:
            logits = logits[:, BOX_ROWS:]  # the bundle's logits are the class rows
        return Reference(logits=logits)

    return SourceModel(
        model=ready.model,
        activation=chosen.tensor,
        layer=chosen.name,
        layout=ready.layout,
        activation_layout=layer_layout(ready.model.graph, chosen, ready.layout),
        height=ready.height,
        width=ready.width,
        channels=ready.channels,
        source_format="onnx",
        source_sha256=sha256_of(path) if isinstance(path, Path) else sha256_of_bytes(
            path.SerializeToString()),
        layers=ready.layers,
        reference=reference,
        more_layers=[Tap(c.name, c.tensor, layer_layout(ready.model.graph, c, ready.layout))
                     for c in layers[1:]],
        batch_size=ready.batch_size,
        batch_reason=ready.batch_reason,
        pixels_layout=ready.pixels_layout,
        detection=ready.detection,
    )


def detector_layer(detection: Detection) -> list[str]:
    """A detector's default layers, one per level; the generic default (the last map
    the output pools) means nothing for a detection head, so a graph whose names do
    not show them is refused."""
    if not detection.layers:
        example = ("the backbone's last block" if detection.decoded
                   else "the neck's stride-8 output")
        raise UnsupportedModelError(
            "cannot tell which maps the detector's head reads (its node names carry no "
            f"module paths); pass --layer, e.g. {example}")
    return list(detection.layers)


def to_layout(images_nhwc: np.ndarray, layout: Layout) -> np.ndarray:
    return np.ascontiguousarray(layout.from_nhwc(images_nhwc))
