"""The bundle being built: the model the passes rewrite, and what they share and record.

A pass reads what it needs from the draft (options, layout, taps, shapes), rewrites
``draft.model`` in place and records what the bundle's metadata will say
(``removed_activation``, ``gradient``, ``fd_step``...). The metadata is assembled
once, from the finished draft.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import onnx

from onnxcam.bundle import (
    GRADIENT_MODES,
    HEAD_SOFTMAX,
    HEADS,
    OUTPUT_CLASSES,
    HeadInput,
    Level,
)
from onnxcam.errors import ExportError
from onnxcam.exporter.detectors import Detection
from onnxcam.exporter.frontends import SourceModel, Tap
from onnxcam.exporter.vjp.context import TensorShape
from onnxcam.layout import Layout, TokenGrid


@dataclass(frozen=True)
class Options:
    """What the user asked for, as ``onnxcam export`` takes it."""

    preprocess: str = "unit"
    labels: tuple[str, ...] = ()
    gradient: str = "auto"  # auto, analytic or fd
    input_gradients: bool = False
    guided: bool = False
    head: str | None = None  # None: as the graph ends (see linearize_logits)

    def __post_init__(self) -> None:
        if self.gradient not in ("auto", *GRADIENT_MODES):
            raise ExportError(f"unknown gradient mode {self.gradient!r}")
        if self.head is not None and self.head not in HEADS:
            raise ExportError(f"unknown head {self.head!r}; choose {', '.join(HEADS)}")

    @property
    def whole_body(self) -> bool:
        """Whether the backward pass must reach the model input."""
        return self.input_gradients or self.guided


@dataclass
class Draft:
    """A model on its way to a bundle.

    ``layout`` is the model input's; ``taps`` are the layers to explain, the
    primary one first, each with its tensor and activation layout.
    """

    model: onnx.ModelProto
    layout: Layout
    height: int
    width: int
    channels: int
    taps: list[Tap]
    options: Options = field(default_factory=Options)
    source_format: str = ""
    source_sha256: str = ""
    layer_order: tuple[str, ...] = ()  # every candidate layer's name, in graph order
    batch_size: int = 0  # 0: any batch; else the model's own, which the bundle keeps
    pixels_layout: Layout | None = None  # a segmenter's output layout; None: a classifier
    detection: Detection | None = None  # a detector's scores and boxes (expose_detections)
    # Recorded by the passes:
    removed_activation: str = ""  # a squashing op linearize_logits (or the frontend) removed
    head: str = HEAD_SOFTMAX  # how the logits become probabilities (linearize_logits)
    model_input: str = ""  # the float tensor the model read before embed_preprocessing
    shapes: dict[str, TensorShape] = field(default_factory=dict)
    num_classes: int = 0
    gradient: str = ""  # analytic or fd, once differentiate has run
    fd_step: float = 0.0
    fd_chunk: int = 0
    output: str = OUTPUT_CLASSES  # what the logits are (probe_head)
    head_inputs: tuple[HeadInput, ...] = ()  # where the graph is cut (cut_at_layers)
    levels: tuple[Level, ...] = ()  # a detector's levels (local_heads)

    @classmethod
    def from_source(cls, source: SourceModel, options: Options) -> Draft:
        """A draft of ``source``'s model (a copy: the source stays as it is for verify)."""
        model = onnx.ModelProto()
        model.CopyFrom(source.model)
        layout = source.activation_layout
        primary = Tap(source.layer, source.activation,
                      layout if isinstance(layout, TokenGrid) else Layout.of(layout))
        return cls(
            model=model, layout=Layout.of(source.layout), height=source.height,
            width=source.width, channels=source.channels,
            taps=[primary, *source.more_layers], options=options,
            source_format=source.source_format, source_sha256=source.source_sha256,
            layer_order=tuple(layer.name for layer in source.layers),
            removed_activation=source.removed_activation, batch_size=source.batch_size,
            pixels_layout=source.pixels_layout, detection=source.detection,
        )

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @contextmanager
    def undone_on_error(self) -> Iterator[None]:
        """Run the block; should it raise, take back what it added to the graph.

        For passes that only add (nodes, initializers, inputs, outputs; an output to an
        existing node, as the MaxPool rule adds its indices), as ``add_gradients`` does:
        trying one on a copy of the model would copy the weights (VGG's 500 MB).
        """
        graph = self.graph
        parts = ("node", "initializer", "input", "output", "value_info")
        sizes = {part: len(getattr(graph, part)) for part in parts}
        outputs = [list(node.output) for node in graph.node]
        try:
            yield
        except BaseException:
            for part, size in sizes.items():
                del getattr(graph, part)[size:]
            for node, names in zip(graph.node, outputs):
                if list(node.output) != names:
                    del node.output[:]
                    node.output.extend(names)
            raise
