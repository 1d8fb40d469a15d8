"""One image's entry in a job's ``targets``, read for the engine: checked against the
bundle, region masks fetched and decoded as images are (same sources, same limits).

Anything wrong with an entry is a BadTargetError (or the mask's own image error): it
ends that image only. An entry old messages could hold (null, a class number, a label)
means what it always meant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from onnxcam.bundle import BundleInfo
from onnxcam.engine.images import Limits, decode, decoding
from onnxcam.engine.targets import (
    ALL_POSITIVE,
    MAX_TARGETS_PER_IMAGE,
    TOP,
    TOP_1,
    Target,
    checked,
    target_from_json,
)
from onnxcam.errors import BadTargetError
from onnxcam.words import clipped
from onnxcam.worker.message import MAX_LABEL_CHARS


def image_targets(entry: Any, info: BundleInfo,
                  mask_of: Callable[[str], np.ndarray] | None = None) -> list[Target]:
    """``entry`` (None, one target in ``target_from_json``'s form, or a list of them) as
    the engine's checked targets for one image; ``mask_of`` reads a region's mask."""
    if entry is None:
        return [TOP_1]
    items = entry if isinstance(entry, list) else [entry]
    if not items:
        raise BadTargetError("an empty list of targets (null means the top-1 class)")
    if len(items) > MAX_TARGETS_PER_IMAGE:
        raise BadTargetError(f"{len(items)} targets for one image; at most "
                             f"{MAX_TARGETS_PER_IMAGE}")
    return [one for item in items for one in _checked(item, info, mask_of)]


def _checked(item: Any, info: BundleInfo,
             mask_of: Callable[[str], np.ndarray] | None) -> list[Target]:
    if isinstance(item, str) and len(item) > MAX_LABEL_CHARS:
        raise BadTargetError(f"{clipped(item)!r}: a label is at most {MAX_LABEL_CHARS} "
                             "characters")
    if _is_class(item, info):
        # As before words existed: -1 is no class (not top-1), and a label, even one
        # spelt "top:3", is the bundle's class.
        return [info.class_index(item)]
    if isinstance(item, dict) and info.detector:
        # Contrasts, regions and weightings: refused before a region's mask is read.
        raise BadTargetError(f"{clipped(repr(item))}: a detection bundle explains "
                             "detections; give a class (its detections), 'top:k' (the k "
                             "best) or null (every one)")
    return checked(target_from_json(item, info, mask_of), info)


def _is_class(item: Any, info: BundleInfo) -> bool:
    if isinstance(item, bool):
        return False
    if isinstance(item, int):
        return True
    return isinstance(item, str) and (item in info.labels or not is_word(item))


def is_word(item: Any) -> bool:
    """``"all-positive"`` or ``"top:k"``: classes picked from each image's scores."""
    return isinstance(item, str) and (item == ALL_POSITIVE or TOP.match(item) is not None)


def one_class(targets: list[Target]) -> bool:
    """Whether an image's checked targets are one class (or the top-1) and nothing else:
    the request old messages make, whose files and records keep today's names and keys."""
    return len(targets) == 1 and isinstance(targets[0], int)


def decode_mask(data: bytes, limits: Limits, name: str) -> np.ndarray:
    """A mask image as bool [H, W] (nonzero: inside), decoded as images are: the formats
    allow-list and the bomb guard hold."""
    image = decode(data, limits, name)
    with decoding(name):
        return np.asarray(image.convert("L")) > 0
