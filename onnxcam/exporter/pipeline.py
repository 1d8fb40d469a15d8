"""``export()``: source model in, verified bundle out, as a visible chain of passes."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxcam._version import __version__
from onnxcam.bundle import (
    OUTPUT_GUIDED_INPUT_GRADIENTS,
    OUTPUT_INPUT_GRADIENTS,
    BundleInfo,
    LayerEntry,
)
from onnxcam.errors import ExportError, UnsupportedModelError
from onnxcam.exporter.batch import set_batch_dim
from onnxcam.exporter.draft import Draft, Options
from onnxcam.exporter.frontends import SourceModel
from onnxcam.exporter.layers import LayerInfo
from onnxcam.exporter.passes import Pass, run_passes
from onnxcam.exporter.passes.add_cam import add_cam
from onnxcam.exporter.passes.cut_at_layers import cut_at_layers
from onnxcam.exporter.passes.differentiate import differentiate
from onnxcam.exporter.passes.embed_preprocessing import embed_preprocessing
from onnxcam.exporter.passes.expose_activation import expose_activation
from onnxcam.exporter.passes.expose_detections import expose_detections
from onnxcam.exporter.passes.expose_logits import expose_logits
from onnxcam.exporter.passes.free_reserved_names import free_reserved_names
from onnxcam.exporter.passes.guard_padded_pools import guard_padded_pools
from onnxcam.exporter.passes.linearize_logits import linearize_logits
from onnxcam.exporter.passes.local_heads import local_heads
from onnxcam.exporter.passes.probe_head import probe_head
from onnxcam.exporter.passes.tidy import tidy
from onnxcam.exporter.shapes import check_model
from onnxcam.exporter.verify import Report, verify_bundle
from onnxcam.files import atomic_write
from onnxcam.graph import serialized_in_parts
from onnxcam.layout import ActivationLayout, TokenGrid

log = logging.getLogger(__name__)

# A source model becomes a bundle by these passes, in this order.
PASSES: tuple[Pass, ...] = (
    free_reserved_names,  # source tensors called logits, cam, ... step aside
    guard_padded_pools,  # zero Pad -> MaxPool, safe from onnxruntime's Pad fusion
    expose_activation,  # activations, activations.1, ...
    expose_logits,  # the classifier output as logits
    linearize_logits,  # ... taken from before a terminal softmax or sigmoid
    expose_detections,  # a detector's logits: its class scores per anchor; and boxes
    embed_preprocessing,  # uint8 NHWC image in
    tidy,  # pruned and sorted: the passes below read a sorted graph
    probe_head,  # the head's shapes and the class count (changes nothing)
    differentiate,  # gradients by the VJP rules, or fd channel weights
    add_cam,  # weights and cam for every layer
    tidy,
    cut_at_layers,  # where many targets of one image share the trunk (changes nothing)
    local_heads,  # a detector's levels, each anchor's score from a crop of its layer
)


@dataclass
class ExportResult:
    path: Path
    info: BundleInfo
    report: Report | None
    batch_reason: str = ""  # why ``info.batch_size`` is fixed, in a few words


# What ``export`` and ``load_source`` accept, for the error a wrong object gets.
ACCEPTED = ("a path (.onnx, .keras, .h5 or a SavedModel folder), a keras.Model, an "
            "onnx.ModelProto, or a torch.nn.Module with example=<an NCHW input tensor>")


def load_source(
    src: Any,
    layer: str | Sequence[str] | None = None,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
    opset: int = 17,
    example: Any = None,
    logits: str | None = None,
) -> SourceModel:
    """Pick the frontend for ``src``: a file by its type, or a model in memory.

    ``example`` is the input a ``torch.nn.Module`` is exported on (required there,
    refused elsewhere); torch modules get layers by module path (``layer4.1``).
    ``logits`` names the output holding the class scores, which a model with several
    outputs needs (a torch module's tuple gives ``output.0``, ``output.1``, ...).
    """
    if example is not None and not is_torch_module(src):
        raise UnsupportedModelError("example= is for torch modules only")
    if isinstance(src, (str, Path)):
        return load_path(Path(src), layer, layout, input_size, opset, logits)
    if isinstance(src, onnx.ModelProto):
        from onnxcam.exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.load(src, layer, layout, input_size, opset, logits)
    if is_torch_module(src):
        if example is None:
            raise UnsupportedModelError(
                "a torch module needs an example input to be exported on: "
                "export(model, out, example=torch.randn(1, 3, H, W))")
        from onnxcam.exporter.frontends import torch as torch_frontend

        return torch_frontend.load(src, example, layer, opset, logits)
    if is_keras_model(src):
        return load_keras_model(src, layer, opset, logits)
    raise UnsupportedModelError(f"cannot export a {type(src).__module__}."
                                f"{type(src).__qualname__}; expected {ACCEPTED}")


def load_path(
    path: Path, layer: str | Sequence[str] | None, layout: str | None,
    input_size: tuple[int, int] | None, opset: int, logits: str | None = None,
) -> SourceModel:
    """Pick the frontend by file type: .onnx, or a Keras file / SavedModel folder."""
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        from onnxcam.exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.load(path, layer, layout, input_size, opset, logits)
    if path.is_dir() or path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        from onnxcam.exporter.frontends import keras as keras_frontend

        return keras_frontend.load(path, layer, opset, logits)
    raise UnsupportedModelError(
        f"{path}: unsupported model type; expected .onnx, .keras, .h5 or a SavedModel folder"
    )


def is_torch_module(obj: object) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module``, without importing torch."""
    return any(cls.__name__ == "Module" and cls.__module__.startswith("torch.nn")
               for cls in type(obj).__mro__)


def is_keras_model(obj: object) -> bool:
    """Whether ``obj`` is a Keras model (Keras 3 or tf.keras), without importing it."""
    return any(cls.__name__ == "Model" and cls.__module__.split(".")[0] in ("keras", "tf_keras")
               for cls in type(obj).__mro__)


def load_keras_model(model: Any, layer: str | Sequence[str] | None, opset: int,
                     logits: str | None = None) -> SourceModel:
    """A Keras model in memory, through the Keras frontend by way of a .keras file."""
    from onnxcam.exporter.frontends import keras as keras_frontend

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(str(path))
        return keras_frontend.load(path, layer, opset, logits)


def list_layers(
    src: str | Path,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
    logits: str | None = None,
) -> list[LayerInfo]:
    """Candidate target layers of a model, in order, for ``onnxcam layers``: those
    feeding the ``logits`` output (needed where the model has several)."""
    path = Path(src)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        from onnxcam.exporter.frontends import onnx as onnx_frontend

        return onnx_frontend.prepare(path, layout, input_size, 17, logits).layers
    if path.is_dir():
        return load_source(path, logits=logits).layers
    from onnxcam.exporter.frontends import keras as keras_frontend

    return keras_frontend.list_layers(path, logits)


def choose_preprocess(asked: str | None, source: SourceModel) -> str:
    """``asked``, or when None the known family's mode (keras.applications), else
    ``unit``. A mode that differs from the family's is kept, with a warning: the model
    may have been trained another way, but usually it was not."""
    family = source.family
    if asked is None:
        if family is None:
            return "unit"
        log.warning("the model is keras.applications' %s: --preprocess %s, as its "
                    "preprocess_input (pass --preprocess to choose another)",
                    family.name, family.preprocess)
        return family.preprocess
    if family is not None and asked != family.preprocess:
        log.warning("the model is keras.applications' %s, whose preprocess_input is "
                    "--preprocess %s, not %s: predictions and maps will be wrong unless it "
                    "was trained on %s input", family.name, family.preprocess, asked, asked)
    return asked


def read_labels(labels: str | Path | list[str] | None) -> list[str]:
    """The labels, one a line, from a file; a list is taken as it is."""
    if labels is None or isinstance(labels, list):
        return labels or []
    try:
        text = Path(labels).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read labels file {labels}: {exc}") from exc
    found = [line.strip() for line in text.splitlines() if line.strip()]
    if not found:
        raise ExportError(f"labels file {labels} holds no labels (one class label a line)")
    return found


def build_bundle(
    source: SourceModel, preprocess: str, labels: list[str], gradient: str = "auto",
    input_gradients: bool = False, guided: bool = False, head: str | None = None,
) -> tuple[onnx.ModelProto, BundleInfo]:
    """Run ``PASSES`` on a draft of ``source``; return the bundle and its metadata.

    ``input_gradients`` and ``guided`` add the whole-network gradient outputs; ``head``
    (None: as the graph ends) is how the bundle's logits become probabilities.
    """
    options = Options(preprocess, tuple(labels), gradient, input_gradients, guided, head)
    draft = run_passes(Draft.from_source(source, options), PASSES)
    if draft.batch_size:
        set_batch_dim(draft.model, draft.batch_size)
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
        all_layers=layer_entries(draft), batch_size=draft.batch_size,
        activation_grid=grid_of(primary.layout), head=draft.head, output=draft.output,
        head_inputs=draft.head_inputs, levels=draft.levels,
        weighted=draft.gradient == "analytic",
        resize=draft.detection.resize if draft.detection is not None else BundleInfo.resize,
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
    check_model(model)
    return model


def export(
    src: Any,
    out: str | Path,
    *,
    example: Any = None,
    layer: str | Sequence[str] | None = None,
    preprocess: str | None = None,
    labels: str | Path | list[str] | None = None,
    gradient: str = "auto",
    input_size: tuple[int, int] | None = None,
    layout: str | None = None,
    opset: int = 17,
    verify: bool = True,
    input_gradients: bool = False,
    guided: bool = False,
    logits: str | None = None,
    head: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Turn a classifier into a verified Grad-CAM bundle at ``out``.

    ``src`` is a path (.onnx, .keras, .h5, SavedModel folder), a ``keras.Model``, an
    ``onnx.ModelProto`` or a ``torch.nn.Module``; a torch module also needs
    ``example``, an NCHW input tensor (its size becomes the bundle's; the batch is
    exported dynamic), and takes layers by module path (``layer4.1``).
    ``layer`` may name several layers: the first is the primary one. With
    ``input_gradients`` the bundle also returns d logit / d model input, and with
    ``guided`` the guided-backprop version of it. ``logits`` names the output holding
    the class scores; a model with several outputs is refused without it (a torch
    module's tuple gives ``output.0``, ``output.1``, ...; a dict its keys).
    ``head`` (``softmax``, ``sigmoid`` or ``none``) is how the bundle turns logits into
    probabilities; None takes it from the op the graph ends in (Sigmoid: ``sigmoid``,
    else ``softmax``), and a head that contradicts that op is refused. Give it for a
    model whose sigmoid is applied outside the graph. ``preprocess`` None means the
    model family's own for keras.applications models (with a warning), else ``unit``.
    Nothing is written unless the bundle passes verification (or ``verify`` is off).
    ``on_stage`` is told each step's name as it starts, for a progress line; each
    step is also logged at INFO (logger ``onnxcam.exporter.pipeline``).
    """
    started = time.monotonic()

    def stage(name: str) -> None:
        # Logged as well as told: a Python caller sees a long export (a ViT's takes
        # most of a minute) move on with nothing more than logging at INFO.
        log.info("export: %s (%.1f s so far)", name, time.monotonic() - started)
        if on_stage is not None:
            on_stage(name)

    Options(head=head)  # an unknown head fails before the model loads
    label_list = read_labels(labels)
    stage("loading the model")
    source = load_source(src, layer, layout, input_size, opset, example, logits)
    preprocess = choose_preprocess(preprocess, source)
    stage("building the bundle")
    bundle, info = build_bundle(source, preprocess, label_list, gradient, input_gradients,
                                guided, head)
    if verify:
        stage("verifying the bundle against the model")
    report = verify_bundle(bundle, info, source) if verify else None
    stage("writing the bundle")
    atomic_write(Path(out), serialized_in_parts(bundle))
    log.info("export: wrote %s in %.1f s", out, time.monotonic() - started)
    return ExportResult(Path(out), info, report, source.batch_reason)
