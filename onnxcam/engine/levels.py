"""A detector explained per level (``BundleInfo.levels``): each detection's map is the
method's map at the layer its own level of the head reads, resized to the finest
level's grid (levels differ in resolution; that grid is the raw maps' one). Where
the bundle has a local head for every level, a detection's gradients come from a
crop of that layer around its anchor's cell (``onnxcam.crops``), a few small
convolutions instead of the whole head.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from onnxcam.bundle import (
    OUTPUT_ACTIVATIONS,
    OUTPUT_CAM,
    OUTPUT_GRADIENTS,
    OUTPUT_WEIGHTS,
    BundleInfo,
    LayerEntry,
    Level,
    crop_inputs,
)
from onnxcam.crops import crop_sums, crops, placed
from onnxcam.engine.maps import resize_maps
from onnxcam.engine.sessions import Sessions
from onnxcam.engine.targets import Row
from onnxcam.errors import BundleError


def level_of(info: BundleInfo, anchor: int) -> Level:
    """The level an anchor belongs to."""
    found = next((level for level in info.levels if level.holds(anchor)), None)
    if found is None:
        raise BundleError(f"anchor {anchor} lies in none of the bundle's levels")
    return found


def entry_of(info: BundleInfo, level: Level) -> LayerEntry:
    return next(entry for entry in info.layers if entry.index == level.layer)


def check_coverage(info: BundleInfo, anchors: int) -> None:
    """Refuse levels that do not hold every one of the logits' ``anchors`` exactly
    once (the metadata checks that they do not overlap)."""
    covered = sum(level.height * level.width for level in info.levels)
    if info.levels and (covered != anchors or info.levels[0].first != 0):
        raise BundleError(f"the bundle's levels hold {covered} anchors; its logits have "
                          f"{anchors}")


def has_local_heads(info: BundleInfo) -> bool:
    return bool(info.levels) and all(level.local for level in info.levels)


def finest_grid(info: BundleInfo) -> tuple[int, int]:
    """The raw maps' grid: the finest level's."""
    finest = max(info.levels, key=lambda level: level.height * level.width)
    return finest.height, finest.width


def rows_of(level: Level, rows: list[Row]) -> list[int]:
    """The positions of the rows whose detection's anchor is in ``level``."""
    return [i for i, row in enumerate(rows)
            if row.detection is not None and level.holds(row.detection.anchor)]


def own_level_maps(layer_maps: dict[str, np.ndarray], rows: list[Row], info: BundleInfo
                   ) -> np.ndarray:
    """[M, h, w] on ``finest_grid``: each row's map at its own level's layer
    (``layer_maps``: every row's map at every layer, by layer name)."""
    raw = np.zeros((len(rows), *finest_grid(info)), np.float32)
    for level in info.levels:
        mine = rows_of(level, rows)
        if mine:
            raw[mine] = resize_maps(layer_maps[entry_of(info, level).name][mine], *raw.shape[1:])
    return raw


def local_outputs(sessions: Sessions, level: Level, maps: np.ndarray, rows: list[Row],
                  needed: Collection[str]) -> dict[str, np.ndarray]:
    """The ``needed`` layer outputs a method reads (activations, gradients, Grad-CAM's
    weights and cam; NCHW) for ``rows`` of ``level``, from their images' ``maps`` at
    the level's layer ([N, C, h, w], by ``Row.image``) and the local head's gradients.
    Grad-CAM's weights and cam need no map of gradients, nor a copy of the maps."""
    if maps.ndim != 4 or maps.shape[2:] != (level.height, level.width):
        raise BundleError(f"the bundle's level {level.layer} claims a {level.height}x"
                          f"{level.width} grid; its layer's map is {list(maps.shape[1:])}")
    cells = [row.detection.anchor - level.first for row in rows if row.detection is not None]
    images = np.array([row.image for row in rows])
    seeds = np.zeros((len(rows), sessions.info.num_classes), np.float32)
    seeds[np.arange(len(rows)), [row.cls for row in rows]] = 1.0
    crop, mask = crops(maps, images, cells, level)
    (gradients,) = sessions.local(level).run(None, dict(zip(crop_inputs(level.layer),
                                                             (crop, mask, seeds))))
    weights = crop_sums(gradients, mask) / (level.height * level.width)
    # Plain einsum loops, not BLAS (see ``maps.resize_maps``); rows read their image's map.
    cam = np.empty((len(rows), level.height, level.width), np.float32)
    for image in np.unique(images):
        mine = images == image
        cam[mine] = np.einsum("rk,khw->rhw", weights[mine], maps[image])
    outputs = {OUTPUT_WEIGHTS: weights, OUTPUT_CAM: np.maximum(cam, 0)}
    if {OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS} & set(needed):
        outputs[OUTPUT_ACTIVATIONS] = maps[images]
        outputs[OUTPUT_GRADIENTS] = placed(gradients, cells, level)
    return outputs
