"""Candidate target layers and the default choice, shared by both frontends.

Candidates are 4-D maps and transformers' token layers on their grid. The default
is the last map with a real spatial extent that the classifier pools or flattens
(``default_layer`` gives the details): ResNet50 picks ``conv5_block3_out``, VGG its
last pool, DenseNet121 its final ReLU, ViT and Swin their last block's first
LayerNormalization. A segmenter's is the last map before it first upsamples one:
FCN's and DeepLabV3's head features, LR-ASPP's gated high branch, a U-Net's bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from onnxcam.errors import LayerNotFoundError, UnsupportedModelError
from onnxcam.exporter.transformer_graph import MAX_LEADING_TOKENS
from onnxcam.layout import TokenGrid

CONV, MERGE, ACTIVATION, OTHER = "conv", "merge", "activation", "other"
# Ops that only move values around, and ops that pass them through at inference.
VIEWS = frozenset({"Transpose", "Reshape", "Permute"})
PASS_THROUGH = frozenset({"Dropout", "Identity", "SpatialDropout2D"})
# Ops an adaptive average pool is exported as (dynamo: Transpose, GatherND, ReduceMean).
RESAMPLING = VIEWS | {"GatherND", "Gather", "ReduceMean", "AveragePool", "Unsqueeze", "Squeeze"}
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalAveragePooling2D",
                          "GlobalMaxPooling2D"})
# Ops that can make a map larger (ONNX's and Keras's names).
UPSAMPLING = frozenset({"Resize", "Upsample", "ConvTranspose", "DepthToSpace",
                        "UpSampling2D", "Conv2DTranspose", "Resizing"})


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op: str
    shape: tuple[int | None, ...]
    role: str
    source: str | None  # the candidate layer feeding this one's main input, if any
    tensor: str = ""  # ONNX frontend: the output tensor
    grid: TokenGrid | None = None  # a token layer [N, T, C]: where its tokens lie
    # Files torch wrote: the module paths whose output this is, outermost first.
    modules: tuple[str, ...] = ()
    # Queries, keys, values split into heads, scores, weights: never a default target.
    attention: bool = False
    # The default the source model's family sets (a detector's, which the generic rule
    # below cannot find): taken over that rule, by the export and ``onnxcam layers``.
    default: bool = False

    @property
    def spatial(self) -> bool:
        """A 4-D map or a token layer on its grid; global pooling's 4-D output (kept
        dims) collapses space, so it is not."""
        return (len(self.shape) == 4 and self.op not in GLOBAL_POOLS) or self.grid is not None

    @property
    def extended(self) -> bool:
        """A map with a real spatial extent: over 1x1, batch first (not windows or heads)."""
        if not self.spatial or self.shape[0] not in (1, None):
            return False
        if self.grid is not None:
            return self.grid.height * self.grid.width > 1
        return sum(1 for d in self.shape[1:] if d is None or d > 1) >= 2


def default_layer(layers: list[LayerInfo]) -> LayerInfo:
    """Pick the default target among ``layers`` (topological order, all feeding the head).

    The last map with a real spatial extent (over 1x1), which the classifier then
    pools or flattens: nothing after pooling, and not a class-score map (SqueezeNet's
    last convolution gives one score map per class, then pools: the map it reads is
    taken). Where that map is a transformer's normalised tokens (ViT, Swin), the
    tokens after the last attention barely reach the scores (ViT reads its class
    token only), so the last block's first LayerNormalization is taken, as
    pytorch-grad-cam advises. A model whose maps are all 1x1 gets its last map.
    Attention's own tensors are never taken, whatever their shape. A segmenter (its
    output is a map) is read as a classifier that ends where it first upsamples a map
    (``before_upsampling``). A layer flagged ``default`` is taken before all that.
    """
    flagged = next((layer for layer in layers if layer.default), None)
    if flagged is not None:
        return flagged
    maps = [layer for layer in layers if layer.spatial and not layer.attention]
    if not maps:
        raise UnsupportedModelError("the model has no 4-D spatial layer to explain")
    extended = [layer for layer in maps if layer.extended]
    if not extended:
        return maps[-1]
    by_name = {layer.name: layer for layer in layers}
    if layers[-1].extended and len(layers[-1].shape) == 4:  # per-pixel class scores
        extended = before_upsampling(layers, extended, by_name)
    pooled = extended[-1]
    while pooled.op in PASS_THROUGH and pooled.source in by_name:  # Keras keeps Dropout
        pooled = by_name[pooled.source]
    pooled = before_resampling(pooled, by_name)
    norm = behind_views(pooled, by_name)
    if norm.op == "LayerNormalization":
        return last_block_norm(layers, norm) or pooled
    # A segmenter's classes lie on axis 1 (NCHW) or last (NHWC); a classifier's are both.
    shape = layers[-1].shape
    return before_class_scores(pooled, by_name, {*shape[1:2], *shape[-1:]})


def with_default(layers: list[LayerInfo], *names: str) -> list[LayerInfo]:
    """``layers`` with those called ``names`` flagged as the default (a detector has
    one per level; none when no layer is called so)."""
    return [replace(layer, default=layer.name in names) for layer in layers]


def before_upsampling(layers: list[LayerInfo], extended: list[LayerInfo],
                      by_name: dict[str, LayerInfo]) -> list[LayerInfo]:
    """The ``extended`` maps before the first layer that upsamples one (a Resize, a
    transposed convolution), in ``layers``' topological order: the encoder, whose last
    map has the coarsest grid and the most context, as a classifier's last map. A
    Resize of a 1x1 map (DeepLabV3's image pooling branch) only broadcasts it, and does
    not count. All of ``extended`` when nothing upsamples."""
    first = next((index for index, layer in enumerate(layers)
                  if layer.op in UPSAMPLING and layer.source in by_name
                  and by_name[layer.source].extended), len(layers))
    before = {layer.name for layer in layers[:first]}
    return [layer for layer in extended if layer.name in before] or extended


def behind_views(layer: LayerInfo, by_name: dict[str, LayerInfo]) -> LayerInfo:
    """The layer ``layer`` is a transpose or reshape of (itself if none)."""
    while layer.op in VIEWS and layer.source in by_name:
        layer = by_name[layer.source]
    return layer


def before_resampling(layer: LayerInfo, by_name: dict[str, LayerInfo]) -> LayerInfo:
    """The map an adaptive average pool resampled to the same size or larger (AlexNet
    and VGG pool to 6x6 and 7x7 before Flatten, whatever their maps' size): it adds
    nothing but repeats, so the map it read is taken. A pool that shrinks is kept, and
    so is a map made by views alone: MaxViT's last block reshapes its grid-partitioned
    tokens back into the image's map, which is the one to explain."""
    if layer.op not in RESAMPLING:
        return layer
    current, resampled = layer, False
    while current.op in RESAMPLING and current.source in by_name:
        resampled |= current.op not in VIEWS
        current = by_name[current.source]
    if resampled and current.extended and not current.attention \
            and size(current) <= size(layer):
        return current
    return layer


def size(layer: LayerInfo) -> int:
    """Values per image (unknown dimensions count as 1)."""
    total = 1
    for d in layer.shape[1:]:
        total *= d or 1
    return total


def before_class_scores(layer: LayerInfo, by_name: dict[str, LayerInfo],
                        classes: set[int | None]) -> LayerInfo:
    """The map a class-score convolution reads, when ``layer`` is (an activation of)
    one: a convolution with one output channel per class; else ``layer``."""
    current = layer
    while current.role == ACTIVATION and current.source in by_name:
        current = by_name[current.source]
    # ONNX's Conv is channels-first; Keras' Conv2D channels-last.
    channels = current.shape[1] if current.op == "Conv" else current.shape[-1]
    if current.role != CONV or channels not in classes:
        return layer
    while current.source in by_name:
        current = by_name[current.source]
        if current.op not in PASS_THROUGH:
            break
    return current if current.extended else layer


def last_block_norm(layers: list[LayerInfo], norm: LayerInfo) -> LayerInfo | None:
    """The last transformer block's first LayerNormalization, or None if not found.

    The block starts at the last residual sum (an Add of two branches, not a bias,
    on ``norm``'s tokens) before the last attention that updates the grid's tokens;
    its first LayerNormalization shaped like that sum is the one pytorch-grad-cam
    targets (pre-norm blocks: before the attention, as ViT's ``ln_1``, Swin's and
    PVT's ``norm1``; Swin v2's post-norm: after it). Class attention (CaiT's last
    blocks) updates only the class token, which the head reads: its queries are the
    leading tokens alone, and the block taken is the last one before it.
    """
    before = layers[: layers.index(norm)]
    attention = [i for i, layer in enumerate(before)
                 if layer.op == "Softmax" and not class_attention(layer)]
    if not attention:
        return None
    sums = [layer for layer in before[: attention[-1]]
            if layer.op == "Add" and layer.role == MERGE and same_tokens(layer, norm)]
    if not sums:
        # A single block: no residual sum comes before its attention (the position
        # embedding is added as a constant), so its first norm on the tokens is taken.
        return next((layer for layer in before[: attention[-1]]
                     if layer.op == "LayerNormalization" and same_tokens(layer, norm)), None)
    start = layers.index(sums[-1])
    return next((layer for layer in layers[start + 1 :]
                 if layer.op == "LayerNormalization" and layer.shape == sums[-1].shape), None)


def class_attention(softmax: LayerInfo) -> bool:
    """Attention whose queries are only the leading tokens (at most two: class and
    distillation) over more keys: it updates those tokens, never the grid's."""
    if len(softmax.shape) < 2:
        return False
    queries, keys = softmax.shape[-2], softmax.shape[-1]
    return queries is not None and keys is not None and queries <= MAX_LEADING_TOKENS < keys


def same_tokens(layer: LayerInfo, norm: LayerInfo) -> bool:
    """``layer`` has ``norm``'s shape, or lies on its grid with its channels (CaiT's
    blocks run on the grid's tokens; its class token joins them only for the norm)."""
    if layer.shape == norm.shape:
        return True
    return (layer.grid is not None and norm.grid is not None
            and (layer.grid.height, layer.grid.width) == (norm.grid.height, norm.grid.width)
            and layer.shape[-1] == norm.shape[-1])


def find_layer(layers: list[LayerInfo], name: str) -> LayerInfo:
    """The layer (or, for ONNX, node or tensor) called ``name``; else the layer that is
    the output of the torch module at path ``name`` (``layer4.1``)."""
    for layer in layers:
        if name in (layer.name, layer.tensor) and layer.spatial:
            return layer
    named = next((layer for layer in layers if name in (layer.name, layer.tensor)), None)
    found = named or module_output(layers, name)
    if found is None:
        raise LayerNotFoundError(name, candidate_names(layers))
    if not found.spatial:
        raise UnsupportedModelError(
            f"layer {name!r} has output shape {list(found.shape)}; Grad-CAM needs a 4-D map"
        )
    return found


def module_output(layers: list[LayerInfo], path: str) -> LayerInfo | None:
    """The layer that is the output of the module at ``path``, or None if none is."""
    made = [layer for layer in layers if path in layer.modules]
    if len(made) > 1:
        raise UnsupportedModelError(
            f"module {path!r} has {len(made)} outputs (it runs more than once, or returns "
            f"several tensors): {', '.join(layer.tensor for layer in made)}; pass one of "
            "these tensors instead")
    return made[0] if made else None


def candidate_names(layers: list[LayerInfo]) -> list[str]:
    """What ``--layer`` may name among the spatial layers: names, then module paths."""
    names = dict.fromkeys(layer.name for layer in layers if layer.spatial)
    for layer in layers:
        if layer.spatial:
            names.update(dict.fromkeys(layer.modules))
    return list(names)


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
    chosen = {layer.name for layer in layers if layer.default} or {default_layer(layers).name}
    lines = []
    for layer in layers:
        if not layer.spatial:
            continue
        mark = "*" if layer.name in chosen else " "
        shape = "x".join("?" if d is None else str(d) for d in layer.shape[1:])
        line = f"{mark} {layer.name:<40} {layer.op:<24} {shape}"
        if layer.grid is not None:  # after the shape, so the columns read as before
            grid = layer.grid
            line += f"  (tokens: {grid.leading} + {grid.height}x{grid.width} grid)"
        if layer.modules:  # last, for the same reason
            line = f"{line:<84}  {', '.join(layer.modules)}"
        lines.append(line)
    return lines
