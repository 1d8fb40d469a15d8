"""``export()``: source model in, verified bundle out, as a visible chain of passes."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from exporter.frontends import SourceModel
from exporter.graph import prune_unused, real_inputs, rename_tensors, tensor_names, toposort
from exporter.layers import LayerInfo
from exporter.passes.add_cam import add_cam
from exporter.passes.add_fd_weights import add_fd_weights
from exporter.passes.add_gradients import add_gradients, head_tensors, source_of, unsupported_ops
from exporter.passes.embed_preprocessing import embed_preprocessing
from exporter.passes.expose_activation import expose_activation
from exporter.passes.linearize_logits import linearize_logits
from exporter.shapes import probe_shapes
from exporter.verify import Report, verify_bundle
from worker import __version__
from worker.bundle import GRADIENT_MODES, OUTPUT_LOGITS, RESERVED_NAMES, BundleInfo
from worker.errors import ExportError, UnsupportedModelError, UnsupportedOpError

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    info: BundleInfo
    report: Report | None


def load_source(
    src: str | Path,
    layer: str | None = None,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
    opset: int = 17,
) -> SourceModel:
    """Pick the frontend by file type: .onnx, or a Keras file / SavedModel folder."""
    path = Path(src)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        from exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.load(path, layer, layout, input_size, opset)
    if path.is_dir() or path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        from exporter.frontends import keras as keras_frontend

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
        from exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.prepare(path, layout, input_size, 17).layers
    if path.is_dir():
        return load_source(path).layers
    from exporter.frontends import keras as keras_frontend

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
    source: SourceModel, preprocess: str, labels: list[str], gradient: str = "auto"
) -> tuple[onnx.ModelProto, BundleInfo]:
    """Run the passes: expose, linearize, embed preprocessing, differentiate, add the cam."""
    if gradient not in ("auto", *GRADIENT_MODES):
        raise ExportError(f"unknown gradient mode {gradient!r}")
    model = onnx.ModelProto()
    model.CopyFrom(source.model)
    activation = free_reserved_names(model.graph).get(source.activation, source.activation)
    expose_activation(model, activation)
    _, removed = linearize_logits(model)
    model_input = real_inputs(model.graph)[0].name
    embed_preprocessing(model, preprocess, source.layout, source.height, source.width,
                        source.channels)
    prune_unused(model.graph)
    toposort(model.graph)
    shapes = probe_shapes(model, head_tensors(model.graph), source.height, source.width,
                          source.channels)
    logits_shape = shapes[source_of(model.graph, OUTPUT_LOGITS)]
    if logits_shape.rank != 2:
        raise UnsupportedModelError(
            f"the classifier output has shape {list(logits_shape.dims)}; expected [N, K]"
        )
    num_classes = logits_shape.dims[1]
    if labels and len(labels) != num_classes:
        raise ExportError(f"the labels file has {len(labels)} labels; the model has "
                          f"{num_classes} classes")
    mode, fd_step, fd_chunk = differentiate(model, shapes, source.activation_layout, gradient)
    add_cam(model, source.activation_layout)
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


def differentiate(
    model: onnx.ModelProto, shapes: dict, layout: str, gradient: str
) -> tuple[str, float, int]:
    """Add gradients analytically when every head op has a rule, else by fd.

    Returns the mode used, and the fd step and chunk (zero for analytic).
    """
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


def save_atomic(model: onnx.ModelProto, out: Path) -> None:
    """Write to a temporary file beside ``out`` and rename: no partial bundle, ever."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(model.SerializeToString())
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def export(
    src: str | Path,
    out: str | Path,
    *,
    layer: str | None = None,
    preprocess: str = "unit",
    labels: str | Path | list[str] | None = None,
    gradient: str = "auto",
    input_size: tuple[int, int] | None = None,
    layout: str | None = None,
    opset: int = 17,
    verify: bool = True,
) -> ExportResult:
    """Turn a classifier into a verified Grad-CAM bundle at ``out``."""
    label_list = labels if isinstance(labels, list) else read_labels(labels)
    source = load_source(src, layer, layout, input_size, opset)
    bundle, info = build_bundle(source, preprocess, label_list, gradient)
    report = verify_bundle(bundle, info, source) if verify else None
    save_atomic(bundle, Path(out))
    return ExportResult(Path(out), info, report)
