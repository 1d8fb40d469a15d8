"""A detector's detections from its bundle's raw output, chosen as ultralytics' predict
chooses them (``targets.detection_rows`` makes them target rows); or, from a detector
that decodes its own (``output = detections``), the graph's (``decoded``).

Per anchor its best class; scores over ``CONFIDENCE``; at most ``MAX_CANDIDATES`` by
score; class-aware NMS at IoU ``IOU``; at most ``max_detections`` per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from onnxcam.bundle import BundleInfo
from onnxcam.engine.images import placement
from onnxcam.errors import BundleError

# ultralytics' predict defaults (``conf``, ``iou``, ``max_det``; ``max_nms`` of its NMS).
CONFIDENCE = 0.25
IOU = 0.7
MAX_DETECTIONS = 300
MAX_CANDIDATES = 30000


@dataclass(frozen=True)
class Detection:
    """One kept detection: its box (x0, y0, x1, y1 in the bundle's input pixels, cut at
    its border as ultralytics' predict cuts them after suppression), score,
    class, label, the anchor it came from, and its rank among its image's detections
    (0: the best), which names it (``name``) whatever the targets pick."""

    box: tuple[float, float, float, float]
    score: float
    cls: int
    label: str
    anchor: int
    rank: int

    @property
    def name(self) -> str:
        """The row's target name: ``label#rank``, unique within an image."""
        return f"{self.label}#{self.rank}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: ``box``, ``score``, ``class``, ``label``, ``anchor``, ``rank``."""
        record = asdict(self)
        record["box"] = list(self.box)
        record["class"] = record.pop("cls")
        return record


def iou_with(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one x0 y0 x1 y1 box with each of ``others`` [M, 4] (as torchvision's)."""
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0,
                     None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    # Two empty boxes have no union: IoU 0 (torchvision's NaN suppresses nothing either).
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = IOU,
        limit: int | None = None) -> np.ndarray:
    """Class-aware greedy NMS: indices into ``boxes`` [M, 4] of the kept ones, best first;
    a box is dropped when its IoU with a kept box of its class is over ``iou``. Each kept
    box is compared with the live later boxes of its class in one array operation."""
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order].astype(np.float64)
    classes = classes[order]
    alive = np.ones(len(order), bool)
    kept: list[int] = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        kept.append(i)
        if limit is not None and len(kept) == limit:
            break
        later = np.flatnonzero(alive[i + 1:] & (classes[i + 1:] == classes[i])) + i + 1
        if len(later):
            alive[later[iou_with(boxes[i], boxes[later]) > iou]] = False
    return order[np.array(kept, np.int64)]


def check_outputs(logits: np.ndarray, boxes: np.ndarray, info: BundleInfo) -> None:
    """Refuse what a detection bundle's run gave unless it is ``logits`` [N, K, A] of the
    metadata's K classes and ``boxes`` [N, A, 4] (the sizes its graph may leave free,
    ``bundle_checks.check_detector`` having checked the rest)."""
    count = len(logits)
    if logits.ndim != 3 or logits.shape[:2] != (count, info.num_classes) \
            or boxes.shape != (count, logits.shape[2], 4):
        raise BundleError(f"the detection bundle gave logits {list(logits.shape)} and boxes "
                          f"{list(boxes.shape)}; its metadata says logits [N, "
                          f"{info.num_classes}, A] and boxes [N, A, 4]")


def detect(logits: np.ndarray, boxes: np.ndarray, info: BundleInfo,
           max_detections: int = MAX_DETECTIONS) -> list[Detection]:
    """One image's detections from its ``logits`` [K, A] (class scores, as the model
    outputs them) and ``boxes`` [A, 4], best first."""
    size = np.array([info.width, info.height, info.width, info.height], np.float32)
    classes = logits.argmax(axis=0)
    scores = logits[classes, np.arange(logits.shape[1])]
    anchors = np.flatnonzero(scores > CONFIDENCE)
    if len(anchors) > MAX_CANDIDATES:
        anchors = anchors[np.argsort(-scores[anchors], kind="stable")[:MAX_CANDIDATES]]
    kept = anchors[nms(boxes[anchors], scores[anchors], classes[anchors], IOU, max_detections)]
    return [Detection(corners(np.clip(boxes[a], 0, size)), float(scores[a]), int(classes[a]),
                      info.label(int(classes[a])), int(a), rank)
            for rank, a in enumerate(kept)]


def decoded(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, sources: np.ndarray,
            info: BundleInfo, max_detections: int = MAX_DETECTIONS) -> list[Detection]:
    """One image's detections as its graph made them ([D, 4], [D], [D], [D]), in the
    model's order (best first) and at most ``max_detections``: each one's anchor is its
    source entry's (s div K) in the bundle's logits [K, A]; its class, the label."""
    return [Detection(corners(boxes[rank]), float(scores[rank]), int(labels[rank]),
                      info.label(int(labels[rank])), int(sources[rank]) // info.num_classes,
                      rank)
            for rank in range(min(len(scores), max_detections))]


def joined_logits(parts: list[np.ndarray]) -> np.ndarray:
    """Several runs' logits along their first axis. A detector whose anchors are its
    proposals (Faster R-CNN: as many as its RPN keeps for each image) gives runs of
    other widths: the narrower are padded with NaN to the widest."""
    width = max(part.shape[-1] for part in parts)
    return np.concatenate([part if part.shape[-1] == width else np.pad(
        part.astype(np.float32), [(0, 0)] * (part.ndim - 1) + [(0, width - part.shape[-1])],
        constant_values=np.nan) for part in parts])


def in_image(box: tuple[float, float, float, float], info: BundleInfo, height: int,
             width: int) -> tuple[float, float, float, float]:
    """A box in the bundle's input pixels as a box in the pixels of a height x width
    image that ``images.prepare`` placed in the input (stretched or letterboxed)."""
    x0, y0, x1, y1 = (float(v) for v in placement(height, width, info).to_image(np.array(box)))
    return x0, y0, x1, y1


def corners(box: np.ndarray) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1
