"""What a map explains, and how that becomes the weighting of the logits a bundle's
backward pass is seeded with (``target_weights``).

A target is a class (its number or label), ``Contrast(a, b)`` (a's score minus b's),
``Region(c, mask)`` (segmentation: class c summed over a mask), ``Weighting(w)`` (any
weighting of the logits), or a word that picks classes from each image's scores:
``"all-positive"`` (probability, by the head, over ``threshold``) or ``"top:k"``.
Each image may have several; each (image, target) pair is one row of the result. A
detector's targets pick detections instead (``detection_rows``): a row per detection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcam.bundle import OUTPUT_PIXELS, BundleInfo
from onnxcam.engine.detections import MAX_DETECTIONS, Detection, detect
from onnxcam.errors import BadTargetError
from onnxcam.scores import probabilities
from onnxcam.words import clipped

ALL_POSITIVE = "all-positive"
TOP_1 = -1  # what parse_targets makes of None: each image's best class, once it is known
TOP = re.compile(r"^top:([0-9]{1,7})$", re.ASCII)
DEFAULT_THRESHOLD = 0.5
# More rows than this for one image is a mistake, not a request (a 21k-class "top:k").
MAX_TARGETS_PER_IMAGE = 1000


@dataclass(frozen=True)
class Contrast:
    """Why ``positive`` rather than ``negative``: the gradient of their score difference."""

    positive: int | str
    negative: int | str


@dataclass(frozen=True)
class Region:
    """Segmentation: class ``cls`` summed over ``mask`` (bool, at the output's size or
    the image's), as pytorch-grad-cam's ``SemanticSegmentationTarget``; None: over the
    pixels the model assigns to ``cls``."""

    cls: int | str
    mask: np.ndarray | None = field(default=None, compare=False)
    name: str = ""  # how rows and files call it; the class label by default


@dataclass(frozen=True)
class Weighting:
    """Any weighting of the logits, shaped as one image's logits ([K], or [K, h, w])."""

    weights: np.ndarray = field(compare=False)
    name: str = "weighted"


Target = int | str | Contrast | Region | Weighting


@dataclass(frozen=True)
class Row:
    """One map to make: an image, the class it is about (-1: a free weighting) and,
    unless it is a plain class of a classifier, the weighting of that image's logits;
    a detector's row, the detection (its seed: one-hot at its class and anchor)."""

    image: int
    cls: int
    name: str
    weights: np.ndarray | None = field(default=None, compare=False)
    detection: Detection | None = None


def parse_targets(targets: Any, count: int, info: BundleInfo) -> list[list[Target]]:
    """Each image's targets, checked: None (top-1), one target for all, or one entry per
    image, each a target, a list of targets, or None (its top-1). Labels are looked up
    now, so a misspelt one fails before any image is run."""
    if targets is None:
        return [[TOP_1] for _ in range(count)]
    if is_target(targets):
        return [checked(targets, info) for _ in range(count)]
    items = targets.tolist() if isinstance(targets, np.ndarray) else targets
    if not isinstance(items, Sequence) or len(items) != count:
        raise BadTargetError(f"targets must be None, a target for every image, or {count} "
                             "entries (one per image, each a target or a list of them)")
    if any(isinstance(each, (list, tuple)) and not each for each in items):
        raise BadTargetError("an image's list of targets is empty (give None for its top-1)")
    return [[TOP_1] if each is None else
            [t for one in (each if isinstance(each, (list, tuple)) else [each])
             for t in checked(one, info)] for each in items]


def is_target(value: Any) -> bool:
    return isinstance(value, (str, int, np.integer, Contrast, Region, Weighting)) and \
        not isinstance(value, bool)


def checked(target: Any, info: BundleInfo) -> list[Target]:
    """``target`` with its classes as numbers (a word stays a word); one item."""
    if not is_target(target):
        raise BadTargetError(f"{clipped(repr(target))} is not a target (a class number or "
                             "label, 'all-positive', 'top:k', Contrast, Region or Weighting)")
    if info.detector:
        return [detection_target(target, info)]
    if isinstance(target, str) and target not in info.labels:  # a label wins, as numbers do
        top = TOP.match(target)
        if top and not 1 <= int(top.group(1)) <= info.num_classes:
            raise BadTargetError(f"{target}: k must be 1 to {info.num_classes}")
        if top or target == ALL_POSITIVE:
            return [target]
    if isinstance(target, Contrast):
        pair = Contrast(info.class_index(target.positive), info.class_index(target.negative))
        if pair.positive == pair.negative:
            raise BadTargetError("a contrast needs two different classes")
        return [pair]
    if isinstance(target, Region):
        if info.output != OUTPUT_PIXELS:
            raise BadTargetError("Region targets are for segmentation bundles (per-pixel "
                                 "logits); this bundle classifies whole images")
        return [Region(info.class_index(target.cls), target.mask, target.name)]
    if isinstance(target, Weighting):
        weights = np.asarray(target.weights, np.float32)
        if not np.isfinite(weights).all():
            raise BadTargetError("a weighting must be finite")
        return [Weighting(weights, target.name)]
    return [info.class_index(target)]


def detection_target(target: Target, info: BundleInfo) -> Target:
    """A detector's target, checked: a class (its detections), ``top:k`` (the k best) or
    -1 (every detection, what None becomes)."""
    if isinstance(target, str) and target not in info.labels and (top := TOP.match(target)):
        if not 1 <= int(top.group(1)) <= MAX_TARGETS_PER_IMAGE:
            raise BadTargetError(f"{target}: k must be 1 to {MAX_TARGETS_PER_IMAGE}")
        return target
    if isinstance(target, (int, np.integer)) and target == TOP_1:
        return TOP_1
    if isinstance(target, (Contrast, Region, Weighting)) or target == ALL_POSITIVE:
        what = target if isinstance(target, str) else type(target).__name__
        raise BadTargetError(f"{what}: a detection bundle explains detections; give a class "
                             "(its detections), 'top:k' (the k best) or none (every one)")
    return info.class_index(target)


def plain(items: list[list[Target]], info: BundleInfo) -> bool:
    """Whether every image has exactly one plain class of a classifier (or top-1): the
    bundle's ``target`` input says it all, and one run of the whole graph does."""
    return info.output != OUTPUT_PIXELS and all(
        len(each) == 1 and isinstance(each[0], (int, np.integer)) for each in items)


def class_scores(logits: np.ndarray, info: BundleInfo) -> np.ndarray:
    """Per image and class, the score targets are ranked by: the logits of a classifier,
    and for a segmenter the share of pixels the class wins."""
    if info.output != OUTPUT_PIXELS:
        return logits
    winners = logits.argmax(axis=1)  # [N, h, w]
    counts = [np.bincount(each.ravel(), minlength=info.num_classes) for each in winners]
    return (np.stack(counts) / winners[0].size).astype(np.float32)


def resolve(items: list[list[Target]], logits: np.ndarray, info: BundleInfo,
            threshold: float = DEFAULT_THRESHOLD) -> list[Row]:
    """The rows for a batch whose logits are known: words become classes, and every
    target of a segmenter or other than a plain class gets its weighting."""
    scores = class_scores(logits, info)
    probable = probabilities(logits, info.head) if info.output != OUTPUT_PIXELS else scores
    rows: list[Row] = []
    for image, targets in enumerate(items):
        for target in targets:
            for one in expand(target, scores[image], probable[image], threshold):
                rows.append(row(image, one, logits[image], info))
        if sum(1 for r in rows if r.image == image) > MAX_TARGETS_PER_IMAGE:
            raise BadTargetError(f"over {MAX_TARGETS_PER_IMAGE} targets for one image")
    return rows


def expand(target: Target, scores: np.ndarray, probable: np.ndarray, threshold: float
           ) -> list[Target]:
    """A word as the classes it picks, best first; -1 as the top class; else itself."""
    if isinstance(target, str):
        if target == ALL_POSITIVE:
            picked = np.flatnonzero(probable > threshold)
            return [int(c) for c in picked[np.argsort(-scores[picked], kind="stable")]]
        k = int(TOP.match(target).group(1))  # type: ignore[union-attr]
        return [int(c) for c in np.argsort(-scores, kind="stable")[:k]]
    if isinstance(target, (int, np.integer)) and target == TOP_1:
        return [int(np.argmax(scores))]
    return [target]


def row(image: int, target: Target, logits: np.ndarray, info: BundleInfo) -> Row:
    """One image's row for a resolved target (classes are numbers by now)."""
    pixels = info.output == OUTPUT_PIXELS
    if isinstance(target, (int, np.integer)):
        if not pixels:
            return Row(image, int(target), info.label(int(target)))
        target = Region(int(target))
    if isinstance(target, Contrast):  # its classes are numbers by now (``checked``)
        positive, negative = int(target.positive), int(target.negative)
        weights = np.zeros(logits.shape, np.float32)
        weights[positive] += 1.0
        weights[negative] -= 1.0
        name = f"{info.label(positive)}-vs-{info.label(negative)}"
        return Row(image, positive, name, weights)
    if isinstance(target, Region):
        cls = int(target.cls)
        weights = np.zeros(logits.shape, np.float32)
        weights[cls] = region_mask(target.mask, logits, cls)
        return Row(image, cls, target.name or info.label(cls), weights)
    if not isinstance(target, Weighting):
        raise BadTargetError(f"{clipped(repr(target))} was not resolved to a class")
    if target.weights.shape != logits.shape:
        raise BadTargetError(f"a weighting of shape {list(target.weights.shape)} for logits "
                             f"of shape {list(logits.shape)} (one image's)")
    return Row(image, -1, target.name, target.weights)


def detection_rows(items: list[list[Target]], logits: np.ndarray, boxes: np.ndarray,
                   info: BundleInfo, max_detections: int = MAX_DETECTIONS) -> list[Row]:
    """A detector's rows: per image, each detection its targets pick (every one for -1,
    the k best for ``top:k``, a class's), in that order and each once."""
    check_max_detections(max_detections)
    return picked_rows(items, [detect(logits[image], boxes[image], info, max_detections)
                           for image in range(len(items))])


def check_max_detections(max_detections: int) -> None:
    if not 1 <= max_detections <= MAX_TARGETS_PER_IMAGE:
        raise BadTargetError(f"max_detections must be 1 to {MAX_TARGETS_PER_IMAGE}, "
                             f"not {max_detections}")


def picked_rows(items: list[list[Target]], found: list[list[Detection]]) -> list[Row]:
    """Per image, a row for each of its detections ``found`` that its targets pick."""
    rows: list[Row] = []
    for image, targets in enumerate(items):
        chosen = {d.rank: d for target in targets for d in picked(target, found[image])}
        rows += [Row(image, d.cls, d.name, detection=d) for d in chosen.values()]
    return rows


def picked(target: Target, found: list[Detection]) -> list[Detection]:
    """The detections, best first, that one checked target (``detection_target``) picks."""
    if isinstance(target, str):
        return found[:int(TOP.match(target).group(1))]  # type: ignore[union-attr]
    if target == TOP_1:
        return found
    return [d for d in found if d.cls == target]


def region_mask(mask: np.ndarray | None, logits: np.ndarray, cls: int) -> np.ndarray:
    """The float mask, at the logits' size, of a ``Region`` of class ``cls``."""
    size = logits.shape[1:]
    if mask is None:
        return (logits.argmax(axis=0) == cls).astype(np.float32)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BadTargetError(f"a region's mask must be 2-D, not of shape {list(mask.shape)}")
    if mask.shape != size:
        mask = resize_nearest(mask, size)
    return (mask > 0).astype(np.float32)


def resize_nearest(mask: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``mask`` at ``size`` by nearest pixel centres (as PIL's NEAREST)."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]


def seeds(rows: list[Row], logits: np.ndarray) -> np.ndarray:
    """float32 [M, ...one image's logits]: each row's weighting (a plain class: one-hot)."""
    out = np.zeros((len(rows), *logits.shape[1:]), np.float32)
    for index, each in enumerate(rows):
        if each.detection is not None:
            out[index, each.cls, each.detection.anchor] = 1.0
        elif each.weights is None:
            out[index, each.cls] = 1.0
        else:
            out[index] = each.weights
    return out


def contrast_from_text(text: str, info: BundleInfo) -> Contrast:
    """``"cat:dog"`` as ``Contrast("cat", "dog")``; a label holding ':' is found by
    trying each split, so ``"a:b:c"`` works whichever side the label's colon is on."""
    parts = text.split(":")
    for cut in range(1, len(parts)):
        positive, negative = ":".join(parts[:cut]), ":".join(parts[cut:])
        try:
            info.class_index(positive), info.class_index(negative)
        except BadTargetError:
            continue
        return Contrast(positive, negative)
    raise BadTargetError(f"{clipped(text)!r} is not two classes as A:B (by number or label)")


def target_from_json(value: Any, info: BundleInfo,
                     mask_of: Callable[[str], np.ndarray] | None = None) -> Target:
    """A target as job messages and manifests write it: a class (number or label),
    ``"all-positive"``, ``"top:k"``, ``{"contrast": [a, b]}``, ``{"region": c}`` with
    an optional ``"mask"`` (a reference ``mask_of`` turns into a mask array), or
    ``{"weights": [...]}`` (one image's logits' shape). Checked by ``parse_targets``."""
    if isinstance(value, bool) or value is None:
        raise BadTargetError(f"{value!r} is not a target")
    if isinstance(value, (int, str)):
        return value
    if not isinstance(value, dict) or len(value) > 2:
        raise BadTargetError(f"{clipped(repr(value))} is not a target")
    if set(value) == {"contrast"} and isinstance(value["contrast"], list) \
            and len(value["contrast"]) == 2:
        return Contrast(*value["contrast"])
    if "region" in value and set(value) <= {"region", "mask"}:
        reference = value.get("mask")
        if reference is None:
            return Region(value["region"])
        if mask_of is None or not isinstance(reference, str):
            raise BadTargetError("a region's mask must be a reference to a mask image")
        return Region(value["region"], mask_of(reference))
    if set(value) == {"weights"} and isinstance(value["weights"], list):
        try:
            weights = np.asarray(value["weights"], np.float32)
        except (TypeError, ValueError) as exc:
            raise BadTargetError("weights must be an array of numbers") from exc
        if weights.size > MAX_WEIGHTS or weights.dtype == object:
            raise BadTargetError("weights must be an array of at most "
                                 f"{MAX_WEIGHTS} numbers")
        return Weighting(weights)
    raise BadTargetError(f"{clipped(repr(value))} is not a target")


# A weighting in a message is at most this many numbers (a 21k-class head's fits).
MAX_WEIGHTS = 1_000_000
