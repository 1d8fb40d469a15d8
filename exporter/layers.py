"""Candidate target layers and the default choice, shared by both frontends.

The default is the last 4-D spatial map feeding the classifier, read as: walking
back from the last 4-D output, the first convolution or merge (add, concat, ...),
or an activation applied directly to one. Normalisation, pooling and dropout in
between are skipped, so DenseNet121 picks ``conv5_block16_concat`` (its trailing
``bn``/``relu`` pair is skipped) and ResNet50 picks ``conv5_block3_out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from onnxcam.errors import LayerNotFoundError, UnsupportedModelError

CONV, MERGE, ACTIVATION, OTHER = "conv", "merge", "activation", "other"
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalAveragePooling2D",
                          "GlobalMaxPooling2D"})


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    shape: tuple[int | None, ...]
    role: str
    source: str | None  # the candidate layer feeding this one's main input, if any
    tensor: str = ""  # ONNX frontend: the output tensor

    @property
    def spatial(self) -> bool:
        """A 4-D map; global pooling's 4-D output (kept dims) collapses space, so it is not."""
        return len(self.shape) == 4 and self.op not in GLOBAL_POOLS


def default_layer(layers: list[LayerInfo]) -> LayerInfo:
    """Pick the default target among ``layers`` (topological order, all feeding the head)."""
    maps = [layer for layer in layers if layer.spatial]
    if not maps:
        raise UnsupportedModelError("the model has no 4-D spatial layer to explain")
    by_name = {layer.name: layer for layer in layers}
    current: LayerInfo | None = maps[-1]
    while current is not None:
        if current.role in (CONV, MERGE):
            return current
        source = by_name.get(current.source) if current.source else None
        if current.role == ACTIVATION and source is not None and source.role in (CONV, MERGE):
            return current
        current = source if source is not None and source.spatial else None
    return maps[-1]


def find_layer(layers: list[LayerInfo], name: str) -> LayerInfo:
    """The layer (or, for ONNX, node or tensor) called ``name``."""
    for layer in layers:
        if name in (layer.name, layer.tensor) and layer.spatial:
            return layer
    for layer in layers:
        if name in (layer.name, layer.tensor):
            raise UnsupportedModelError(
                f"layer {name!r} has output shape {list(layer.shape)}; Grad-CAM needs a 4-D map"
            )
    raise LayerNotFoundError(name, [layer.name for layer in layers if layer.spatial])


def choose_layers(layers: list[LayerInfo], names: str | Sequence[str] | None) -> list[LayerInfo]:
    """The layers called ``names`` (the first is the primary one), or the default; no repeats."""
    if names is None or isinstance(names, str):
        names = [names] if names else []
    if not names:
        return [default_layer(layers)]
    chosen: list[LayerInfo] = []
    for name in names:
        layer = find_layer(layers, name)
        if layer not in chosen:
            chosen.append(layer)
    return chosen


def describe(layers: list[LayerInfo]) -> list[str]:
    """Lines for ``onnxcam layers``: spatial candidates, the default marked with '*'."""
    chosen = default_layer(layers).name
    lines = []
    for layer in layers:
        if not layer.spatial:
            continue
        mark = "*" if layer.name == chosen else " "
        shape = "x".join("?" if d is None else str(d) for d in layer.shape[1:])
        lines.append(f"{mark} {layer.name:<40} {layer.op:<24} {shape}")
    return lines
