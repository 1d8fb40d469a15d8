"""Frontends bring a source model to ONNX plus what the passes and verification need."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx as onnx_lib

from onnxcam.errors import UnsupportedModelError
from onnxcam.exporter.detectors import Detection
from onnxcam.exporter.known_models import Family
from onnxcam.exporter.layers import LayerInfo
from onnxcam.layout import ActivationLayout, Layout


@dataclass
class Reference:
    """The source's own answer on a probe batch, for verification."""

    logits: np.ndarray  # what the source outputs (probabilities if it ends in softmax)
    activations: np.ndarray | None = None  # gradient-capable sources (Keras) fill these
    gradients: np.ndarray | None = None
    linear: bool = False  # True when ``logits`` are already pre-activation scores
    # The other tapped layers' (activations, gradients), in ``more_layers`` order.
    more: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    input_gradients: np.ndarray | None = None  # NHWC, when asked for and the source can


# (preprocessed float NHWC images, targets with -1 resolved, *, input_gradients=False)
# -> Reference
ReferenceFn = Callable[..., Reference]


@dataclass(frozen=True)
class Tap:
    """A further layer to explain: its name, output tensor and activation layout
    (a ``TokenGrid`` for a transformer's token layer)."""

    layer: str
    tensor: str
    layout: ActivationLayout


@dataclass
class SourceModel:
    """A classifier in ONNX form with its target layer chosen.

    ``model`` has one float input in ``layout`` and the classifier's output as its
    first graph output; ``activation`` names the target layer's output tensor.
    """

    model: onnx_lib.ModelProto
    activation: str
    layer: str
    layout: Layout
    activation_layout: ActivationLayout
    height: int
    width: int
    channels: int
    source_format: str
    source_sha256: str
    layers: list[LayerInfo]
    reference: ReferenceFn
    removed_activation: str = ""  # a squashing activation the frontend already dropped
    more_layers: list[Tap] = field(default_factory=list)  # further --layer choices, in order
    batch_size: int = 0  # 0: the model runs at any batch; else the only batch it runs at
    batch_reason: str = ""  # why ``batch_size`` could not be freed, in a few words
    # A model family whose input preprocessing is known (keras.applications), or None.
    family: Family | None = None
    # A segmenter's per-pixel scores: the layout of its [N, K, h, w] (NCHW) or
    # [N, h, w, K] (NHWC) output; None for a classifier's [N, K].
    pixels_layout: Layout | None = None
    # A detector's class scores per anchor and its boxes (``exporter.detectors``).
    detection: Detection | None = None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode())
            digest.update(item.read_bytes())
    else:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_of_bytes(data: bytes) -> str:
    """The sha256 of a model handed over in memory, as its serialised bytes."""
    return hashlib.sha256(data).hexdigest()


# A model output's shape at batch 1; None where the model leaves a dimension open.
OutputShape = tuple[int | None, ...]


def shape_text(shape: OutputShape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def choose_output(outputs: dict[str, OutputShape], logits: str | None) -> str:
    """The output holding the class scores: ``logits``, or the model's only output.

    A model with several outputs (boxes and scores, logits and features) must be told
    which one: taking the first would explain whatever happens to come first.
    """
    listed = ", ".join(f"{name} {shape_text(shape)}" for name, shape in outputs.items())
    if logits is None and len(outputs) > 1:
        raise UnsupportedModelError(
            f"the model has {len(outputs)} outputs: {listed}; choose the class scores "
            "with --logits NAME (logits=NAME in Python)")
    name = next(iter(outputs)) if logits is None else logits
    if name not in outputs:
        raise UnsupportedModelError(f"no output named {name!r}; the model's outputs: {listed}")
    check_scores(name, outputs[name])
    return name


def check_scores(name: str, shape: OutputShape) -> None:
    """Refuse an output that is neither a score vector [N, classes] nor a segmenter's
    scores per pixel (rank 4, the class axis where the model's layout puts channels):
    Grad-CAM explains class scores, and other outputs have no class axis to pick from."""
    if len(shape) not in (2, 4):
        raise UnsupportedModelError(
            f"the model's output {name} has shape {shape_text(shape)}, neither a score "
            "vector [N, classes] nor per-pixel scores [N, classes, h, w] (segmentation); "
            "other dense outputs cannot be explained by this version")


def pixels_layout(shape: OutputShape, layout: Layout) -> Layout | None:
    """The layout of a per-pixel output (rank 4): the model's own, as its input's;
    None for a score vector."""
    return layout if len(shape) == 4 else None
