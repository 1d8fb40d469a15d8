"""``export()``: source model in, verified bundle out, as a visible chain of passes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxcam import __version__
from onnxcam.bundle import (
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    BundleInfo,
    LayerEntry,
)
from onnxcam.errors import ExportError, UnsupportedModelError
from onnxcam.exporter.draft import Draft, Options
from onnxcam.exporter.frontends import SourceModel
from onnxcam.exporter.layers import LayerInfo
from onnxcam.exporter.passes import Pass, run_passes
from onnxcam.exporter.passes.add_cam import add_cam
from onnxcam.exporter.passes.differentiate import differentiate
from onnxcam.exporter.passes.embed_preprocessing import embed_preprocessing
from onnxcam.exporter.passes.expose_activation import expose_activation
from onnxcam.exporter.passes.expose_logits import expose_logits
from onnxcam.exporter.passes.free_reserved_names import free_reserved_names
from onnxcam.exporter.passes.linearize_logits import linearize_logits
from onnxcam.exporter.passes.probe_head import probe_head
from onnxcam.exporter.passes.tidy import tidy
from onnxcam.exporter.verify import Report, verify_bundle
from onnxcam.files import atomic_write
from onnxcam.layout import ActivationLayout, TokenGrid

log = logging.getLogger(__name__)

# A source model becomes a bundle by these passes, in this order.
PASSES: tuple[Pass, ...] = (
    free_reserved_names,  # source tensors called logits, cam, ... step aside
    expose_activation,  # activations, activations.1, ...
    expose_logits,  # the classifier output as logits
    linearize_logits,  # ... taken from before a terminal softmax or sigmoid
    embed_preprocessing,  # uint8 NHWC image in
    tidy,  # pruned and sorted: the passes below read a sorted graph
    probe_head,  # the head's shapes and the class count (changes nothing)
    differentiate,  # gradients by the VJP rules, or fd channel weights
    add_cam,  # weights and cam for every layer
    tidy,
)


@dataclass
class ExportResult:
    path: Path
    info: BundleInfo
    report: Report | None


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


def read_labels(labels: str | Path | list[str] | None) -> list[str]:
    """The labels, one a line, from a file; a list is taken as it is."""
    if labels is None or isinstance(labels, list):
        return labels or []
    try:
        text = Path(labels).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read labels file {labels}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_bundle(
    source: SourceModel, preprocess: str, labels: list[str], gradient: str = "auto",
    input_gradients: bool = False, guided: bool = False,
) -> tuple[onnx.ModelProto, BundleInfo]:
    """Run ``PASSES`` on a draft of ``source``; return the bundle and its metadata.

    ``input_gradients`` and ``guided`` add the whole-network gradient outputs.
    """
    options = Options(preprocess, tuple(labels), gradient, input_gradients, guided)
    draft = run_passes(Draft.from_source(source, options), PASSES)
    info = bundle_info(draft)
    return seal(draft.model, info), info


def bundle_info(draft: Draft) -> BundleInfo:
    """What the finished draft's metadata will say."""
    options = draft.options
    wanted = ((OUTPUT_INPUT_GRADIENTS, options.input_gradients),
              (OUTPUT_GUIDED_INPUT_GRADIENTS, options.guided))
    primary = draft.taps[0]
    return BundleInfo(
        height=draft.height, width=draft.width, channels=draft.channels,
        preprocess=options.preprocess, layout=str(draft.layout),
        activation_layout=str(primary.layout), target_layer=primary.layer,
        num_classes=draft.num_classes, labels=list(options.labels), gradient=draft.gradient,
        source_format=draft.source_format, source_sha256=draft.source_sha256,
        version=__version__, removed_activation=draft.removed_activation,
        fd_epsilon=draft.fd_step, fd_chunk=draft.fd_chunk, model_input=draft.model_input,
        input_gradients=tuple(name for name, asked in wanted if asked),
        all_layers=layer_entries(draft),
        activation_grid=grid_of(primary.layout),
    )


def layer_entries(draft: Draft) -> tuple[LayerEntry, ...]:
    """With several layers, all of them early to late (graph order); else nothing."""
    if len(draft.taps) < 2:
        return ()
    order = {name: position for position, name in enumerate(draft.layer_order)}
    entries = [LayerEntry(tap.layer, index, str(tap.layout), grid_of(tap.layout))
               for index, tap in enumerate(draft.taps)]
    return tuple(sorted(entries, key=lambda entry: order.get(entry.name, 0)))


def grid_of(layout: ActivationLayout) -> TokenGrid | None:
    return layout if isinstance(layout, TokenGrid) else None


def seal(model: onnx.ModelProto, info: BundleInfo) -> onnx.ModelProto:
    """Write ``info`` into the model's metadata and check the model; return it."""
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "onnxcam"
    model.producer_version = __version__
    onnx.checker.check_model(model)
    return model


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
    ``guided`` the guided-backprop version of it. Nothing is written unless the
    bundle passes verification (or ``verify`` is off).
    """
    label_list = read_labels(labels)
    source = load_source(src, layer, layout, input_size, opset)
    bundle, info = build_bundle(source, preprocess, label_list, gradient, input_gradients,
                                guided)
    report = verify_bundle(bundle, info, source) if verify else None
    atomic_write(Path(out), bundle.SerializeToString())
    return ExportResult(Path(out), info, report)
