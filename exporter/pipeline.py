"""``export()``: source model in, verified bundle out, as a visible chain of passes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxcam import __version__
from onnxcam.bundle import (
    GRADIENT_MODES,
    OUTPUT_ACTIVATIONS,
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    OUTPUT_LOGITS,
    RESERVED_NAMES,
    BundleInfo,
    LayerEntry,
    layer_output,
)
from onnxcam.errors import ExportError, UnsupportedModelError, UnsupportedOpError
from onnxcam.exporter.frontends import SourceModel
from onnxcam.exporter.layers import LayerInfo
from onnxcam.exporter.passes.add_cam import add_cam
from onnxcam.exporter.passes.add_fd_weights import add_fd_weights
from onnxcam.exporter.passes.add_gradients import (
    add_gradients,
    add_guided_gradients,
    head_tensors,
    layer_tensors,
    source_of,
    unsupported_ops,
)
from onnxcam.exporter.passes.embed_preprocessing import embed_preprocessing
from onnxcam.exporter.passes.expose_activation import expose_activation
from onnxcam.exporter.passes.linearize_logits import linearize_logits
from onnxcam.exporter.shapes import probe_shapes
from onnxcam.exporter.verify import Report, verify_bundle
from onnxcam.files import atomic_write
from onnxcam.graph import prune_unused, real_inputs, rename_tensors, tensor_names, toposort

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    info: BundleInfo
    report: Report | None


@dataclass(frozen=True)
class InputGradients:
    """Which whole-network gradients to add, at the model input (in ``layout``)."""

    model_input: str
    layout: str
    plain: bool = True
    guided: bool = False

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name, wanted in ((OUTPUT_INPUT_GRADIENTS, self.plain),
                                               (OUTPUT_GUIDED_INPUT_GRADIENTS, self.guided))
                     if wanted)


def load_source(
    src: str | Path,
    layer: str | Sequence[str] | None = None,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
    opset: int = 17,
) -> SourceModel:
    """Pick the frontend by file type: .onnx, or a Keras file / SavedModel folder."""
    path = Path(src)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        from onnxcam.exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.load(path, layer, layout, input_size, opset)
    if path.is_dir() or path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        from onnxcam.exporter.frontends import keras as keras_frontend

        return keras_frontend.load(path, layer, opset)
    raise UnsupportedModelError(
        f"{path}: unsupported model type; expected .onnx, .keras, .h5 or a SavedModel folder"
    )


def list_layers(
    src: str | Path,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
) -> list[LayerInfo]:
    """Candidate target layers of a model, in order, for ``onnxcam layers``."""
    path = Path(src)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        from onnxcam.exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.prepare(path, layout, input_size, 17).layers
    if path.is_dir():
        return load_source(path).layers
    from onnxcam.exporter.frontends import keras as keras_frontend

    return keras_frontend.list_layers(path)


def read_labels(path: str | Path | None) -> list[str]:
    if path is None:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read labels file {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_bundle(
    source: SourceModel, preprocess: str, labels: list[str], gradient: str = "auto",
    input_gradients: bool = False, guided: bool = False,
) -> tuple[onnx.ModelProto, BundleInfo]:
    """Run the passes: expose, linearize, embed preprocessing, differentiate, add the cam.

    ``input_gradients`` and ``guided`` add the whole-network gradient outputs.
    """
    if gradient not in ("auto", *GRADIENT_MODES):
        raise ExportError(f"unknown gradient mode {gradient!r}")
    model = onnx.ModelProto()
    model.CopyFrom(source.model)
    renamed = free_reserved_names(model.graph)
    tensors = [source.activation, *(tap.tensor for tap in source.more_layers)]
    for index, tensor in enumerate(tensors):
        expose_activation(model, renamed.get(tensor, tensor),
                          layer_output(OUTPUT_ACTIVATIONS, index))
    _, removed = linearize_logits(model)
    model_input = real_inputs(model.graph)[0].name
    embed_preprocessing(model, preprocess, source.layout, source.height, source.width,
                        source.channels)
    prune_unused(model.graph)
    toposort(model.graph)
    whole = InputGradients(model_input, source.layout, input_gradients, guided) \
        if input_gradients or guided else None
    shapes = probe_shapes(model, head_tensors(model.graph, model_input if whole else ""),
                          source.height, source.width, source.channels)
    logits_shape = shapes[source_of(model.graph, OUTPUT_LOGITS)]
    if logits_shape.rank != 2:
        raise UnsupportedModelError(
            f"the classifier output has shape {list(logits_shape.dims)}; expected [N, K]"
        )
    num_classes = logits_shape.dims[1]
    if labels and len(labels) != num_classes:
        raise ExportError(f"the labels file has {len(labels)} labels; the model has "
                          f"{num_classes} classes")
    mode, fd_step, fd_chunk = differentiate(model, shapes, source.activation_layout, gradient,
                                            whole)
    layouts = [source.activation_layout, *(tap.layout for tap in source.more_layers)]
    for index, layout in enumerate(layouts):
        add_cam(model, layout, index)
    prune_unused(model.graph)
    toposort(model.graph)
    info = BundleInfo(
        height=source.height, width=source.width, channels=source.channels,
        preprocess=preprocess, layout=source.layout,
        activation_layout=source.activation_layout, target_layer=source.layer,
        num_classes=num_classes, labels=labels, gradient=mode,
        source_format=source.source_format, source_sha256=source.source_sha256,
        version=__version__, removed_activation=removed or source.removed_activation,
        fd_epsilon=fd_step, fd_chunk=fd_chunk, model_input=model_input,
        input_gradients=whole.outputs if whole else (), all_layers=layer_entries(source),
    )
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "onnxcam"
    model.producer_version = __version__
    onnx.checker.check_model(model)
    return model, info


def free_reserved_names(graph: onnx.GraphProto) -> dict[str, str]:
    """Rename source tensors that would collide with the bundle's input/output names."""
    taken = tensor_names(graph) | {o.name for o in graph.output}
    mapping = {name: f"{name}__source" for name in RESERVED_NAMES if name in taken}
    rename_tensors(graph, mapping)
    return mapping


def layer_entries(source: SourceModel) -> tuple[LayerEntry, ...]:
    """With several layers, all of them early to late (graph order); else nothing."""
    if not source.more_layers:
        return ()
    order = {layer.name: position for position, layer in enumerate(source.layers)}
    entries = [LayerEntry(source.layer, 0, source.activation_layout)]
    entries += [LayerEntry(tap.layer, index, tap.layout)
                for index, tap in enumerate(source.more_layers, start=1)]
    return tuple(sorted(entries, key=lambda entry: order.get(entry.name, 0)))


def differentiate(
    model: onnx.ModelProto, shapes: dict, layout: str, gradient: str,
    whole: InputGradients | None = None,
) -> tuple[str, float, int]:
    """Add gradients analytically when every head op has a rule, else by fd.

    Whole-network gradients and several layers have no fd fallback. Returns the
    mode used, and the fd step and chunk (zero for analytic).
    """
    if whole is not None or len(layer_tensors(model.graph)) > 1:
        differentiate_exactly(model, shapes, gradient, whole)
        return "analytic", 0.0, 0
    if gradient != "fd":
        missing = unsupported_ops(model.graph)
        if not missing:
            attempt = onnx.ModelProto()
            attempt.CopyFrom(model)
            try:
                add_gradients(attempt, shapes)
            except UnsupportedOpError as exc:
                if gradient == "analytic":
                    raise
                log.warning("falling back to finite differences: %s", exc)
            else:
                model.CopyFrom(attempt)
                return "analytic", 0.0, 0
        elif gradient == "analytic":
            raise UnsupportedOpError(", ".join(missing))
        else:
            log.warning("no gradient rule for %s in the head; using finite differences",
                        ", ".join(missing))
    _, step, chunk = add_fd_weights(model, shapes, layout)
    return "fd", step, chunk


def differentiate_exactly(
    model: onnx.ModelProto, shapes: dict, gradient: str, whole: InputGradients | None
) -> None:
    """One backward pass for every layer (and the model input), then the guided one."""
    if gradient == "fd":
        raise ExportError("input gradients, --guided and several layers need analytic "
                          "gradients; drop --gradient fd")
    start = whole.model_input if whole else ""
    missing = unsupported_ops(model.graph, start)
    if missing:
        raise UnsupportedOpError(", ".join(missing))
    plain_input = start if whole and whole.plain else ""
    add_gradients(model, shapes, plain_input, whole.layout if whole else "nhwc")
    if whole and whole.guided:
        add_guided_gradients(model, shapes, start, whole.layout)


def export(
    src: str | Path,
    out: str | Path,
    *,
    layer: str | Sequence[str] | None = None,
    preprocess: str = "unit",
    labels: str | Path | list[str] | None = None,
    gradient: str = "auto",
    input_size: tuple[int, int] | None = None,
    layout: str | None = None,
    opset: int = 17,
    verify: bool = True,
    input_gradients: bool = False,
    guided: bool = False,
) -> ExportResult:
    """Turn a classifier into a verified Grad-CAM bundle at ``out``.

    ``layer`` may name several layers: the first is the primary one. With
    ``input_gradients`` the bundle also returns d logit / d model input, and with
    ``guided`` the guided-backprop version of it.
    """
    label_list = labels if isinstance(labels, list) else read_labels(labels)
    source = load_source(src, layer, layout, input_size, opset)
    bundle, info = build_bundle(source, preprocess, label_list, gradient, input_gradients,
                                guided)
    report = verify_bundle(bundle, info, source) if verify else None
    atomic_write(Path(out), bundle.SerializeToString())
    return ExportResult(Path(out), info, report)
