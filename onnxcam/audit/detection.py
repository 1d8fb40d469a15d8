"""The detection audit: a detector's every detection explained, matched to the data
set's objects as COCO's evaluation matches them, and measured in its object's box.

An image's lines in results.csv: one per detection (``match`` or ``false``, by
rank), then one per object no detection matched (``miss``); an image with neither
gets one line with no kind. The runner's ``Ordering`` keeps them in manifest order
and resumable, as for multi-label audits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit.backend import AuditRow, GroundTruth, MapOutcome, RowOutcome
from onnxcam.audit.metrics import box_region, energy_in_box, pointing_hit
from onnxcam.audit.results import ResultRow, read_results
from onnxcam.audit.summary import BINS, WORST, Summary, Thresholds, Worst, empty_map, judge
from onnxcam.engine.detections import Detection, iou_with
from onnxcam.engine.maps import heatmaps
from onnxcam.errors import AuditError, BadRowError

log = logging.getLogger(__name__)

MATCH_IOU = 0.5  # COCO's AP50 criterion
FORM = "detection"
COLUMNS = ("image", "kind", "label", "explained", "score", "rank", "box", "gt_box", "iou",
           "energy_in_box", "pointing_hit", "box_area", "heatmap", "status", "error", "row")
MATCH, FALSE, MISS = "match", "false", "miss"

Box = tuple[float, float, float, float]


def match(detections: Sequence[Detection], objects: Sequence[GroundTruth],
          threshold: float = MATCH_IOU) -> dict[int, tuple[int, float]]:
    """COCO's greedy matching: detections by score, best first (ties: by position), each
    takes the unmatched object of its class with the highest IoU at or over
    ``threshold`` (ties: the first object). Detection position -> (object, IoU)."""
    order = sorted(range(len(detections)), key=lambda d: -detections[d].score)
    taken: set[int] = set()
    found: dict[int, tuple[int, float]] = {}
    for d in order:
        detection = detections[d]
        best, best_iou = -1, -1.0
        for o, item in enumerate(objects):
            if o in taken or item.cls != detection.cls:
                continue
            value = float(iou_with(np.asarray(detection.box, np.float64),
                                   np.asarray([item.box], np.float64))[0])
            if value >= threshold and value > best_iou:
                best, best_iou = o, value
        if best >= 0:
            taken.add(best)
            found[d] = (best, best_iou)
    return found


def clipped(box: Box, height: int, width: int) -> Box:
    """``box`` cut at the image's border; BadRowError when no pixel of it is inside."""
    box_region(box, height, width)  # raises for a box with no pixel in the image
    x0, y0, x1, y1 = box
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def text(box: Box) -> str:
    return " ".join(f"{v:.2f}" for v in box)


def measure(raw: np.ndarray, box: Box, height: int, width: int) -> dict[str, str]:
    """Energy-in-box and pointing hit of one map in ``box``, on its heatmap at the
    image's size, and the box's share of the image."""
    region = box_region(box, height, width)
    heatmap = heatmaps(raw[None].astype(np.float32), height, width)[0]
    return {"energy_in_box": f"{energy_in_box(heatmap, region):.4f}",
            "pointing_hit": str(int(pointing_hit(heatmap, region))),
            "box_area": f"{region.mean():.4f}"}


def image_lines(row: AuditRow, outcome: RowOutcome, label: Callable[[int], str],
                store: Callable[[str, np.ndarray], str]) -> list[ResultRow]:
    """results.csv's lines for one image (see the module docstring); ``store`` writes a
    map under a name and returns its reference, ``label`` names a class."""
    objects = row.objects or ()
    base = {"image": row.image, "row": str(row.index)}
    if not outcome.ok or outcome.maps is None:
        error = {**base, "status": "error", "error": f"{outcome.error_code}: {outcome.error}"}
        return [{**error, "label": label(o.cls), "gt_box": text(o.box)} for o in objects] \
            or [error]
    height, width = outcome.image_size
    lines: list[ResultRow] = []
    usable: list[GroundTruth] = []  # the objects with a pixel in the image, clipped
    where: list[int] = []  # their positions in ``objects``
    for position, item in enumerate(objects):
        try:
            usable.append(GroundTruth(item.cls, clipped(item.box, height, width)))
            where.append(position)
        except BadRowError as exc:
            lines.append({**base, "kind": MISS, "label": label(item.cls),
                          "gt_box": text(item.box), "status": "error",
                          "error": f"{exc.code}: {exc}"})
    maps: list[MapOutcome] = outcome.maps
    detections = [found.detection for found in maps]
    if any(d is None for d in detections):
        raise AuditError(f"{row.image}: the backend's maps carry no detections (a detection "
                         "bundle's maps each explain one)")
    matched = match(detections, usable)  # type: ignore[arg-type]
    for position, (found, detection) in enumerate(zip(maps, detections)):
        assert detection is not None
        line = {**base, "explained": detection.label, "score": f"{detection.score:.4f}",
                "rank": str(detection.rank), "box": text(detection.box), "kind": FALSE,
                "status": "ok"}
        line["heatmap"] = found.heatmap or store(f"{row.index}-{detection.rank}", found.raw)
        if position in matched:
            index, iou = matched[position]
            item = usable[index]
            line.update(kind=MATCH, label=label(item.cls), gt_box=text(item.box),
                        iou=f"{iou:.4f}", **measure(found.raw, item.box, height, width))
        lines.append(line)
    hit = {index for index, _ in matched.values()}
    lines += [{**base, "kind": MISS, "label": label(item.cls), "gt_box": text(item.box),
               "status": "ok"} for index, item in enumerate(usable) if index not in hit]
    return lines or [{**base, "status": "ok"}]


@dataclass
class ClassCounts:
    """One class's detection figures, as results.csv's lines arrive."""

    objects: int = 0  # in images that ran, with a pixel in the image
    matched: int = 0
    misses: int = 0
    detections: int = 0
    false_detections: int = 0
    errors: int = 0  # objects whose line failed (their image, or their box)
    empty_maps: int = 0  # matched detections with an empty map: left out of the means
    energy: float = 0.0
    area: float = 0.0
    hits: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)

    @property
    def located(self) -> int:
        return self.matched - self.empty_maps

    def figures(self) -> dict[str, Any]:
        def share(part: float, whole: int) -> float | None:
            return round(part / whole, 4) if whole else None

        return {
            "n": self.objects, "objects": self.objects, "detections": self.detections,
            "matched": self.matched, "misses": self.misses,
            "false_detections": self.false_detections,
            "recall": share(self.matched, self.objects),
            "precision": share(self.matched, self.detections),
            "energy_in_box_mean": share(self.energy, self.located),
            "pointing_hit_rate": share(self.hits, self.located),
            "box_area_mean": share(self.area, self.located),
            "boxes": self.matched, "empty_maps": self.empty_maps, "errors": self.errors,
            "accuracy_located": None,
        }


def summarize_detections(results: Path, thresholds: Thresholds, classes: list[str],
                         worst: int = WORST) -> Summary:
    """summary.json's figures from a detection audit's results.csv, in one pass."""
    counts = {label: ClassCounts() for label in classes}
    failed: dict[str, bool] = {}  # row -> whether its image failed (not just an object)
    error_codes: dict[str, int] = {}
    lowest, confident = Worst(worst), Worst(worst)
    by_class: dict[str, Worst] = {}
    misses: list[ResultRow] = []
    for index, row in enumerate(read_results(results)):
        row["index"] = str(index)
        ok = row["status"] == "ok"
        failed[row["row"]] = failed.get(row["row"], False) or (not ok and not row["kind"])
        if not ok:
            code = (row.get("error") or "error").split(":", 1)[0]
            error_codes[code] = error_codes.get(code, 0) + 1
            if row["label"] in counts:
                counts[row["label"]].errors += 1
            continue
        kind, truth, found = row["kind"], counts.get(row["label"]), counts.get(row["explained"])
        if kind in (MATCH, FALSE) and found is not None:
            found.detections += 1
            found.false_detections += kind == FALSE
        if kind == FALSE:
            confident.offer(float(row["score"]), index, row)
        if truth is None or kind not in (MATCH, MISS):
            continue
        truth.objects += 1
        if kind == MISS:
            truth.misses += 1
            if len(misses) < worst:
                misses.append(row)
            continue
        truth.matched += 1
        if empty_map(row, results.parent):
            truth.empty_maps += 1
            continue
        energy = float(row["energy_in_box"])
        truth.energy += energy
        truth.area += float(row["box_area"])
        truth.hits += row["pointing_hit"] == "1"
        truth.histogram[min(BINS - 1, int(energy * BINS))] += 1
        lowest.offer(-energy, index, row)
        by_class.setdefault(row["label"], Worst(worst)).offer(-energy, index, row)
    per_class = {label: counts[label].figures() for label in sorted(counts)
                 if counts[label].objects or counts[label].detections or counts[label].errors}
    flags, notes = judge(per_class, thresholds)
    totals = {key: sum(figures[key] for figures in per_class.values())
              for key in ("objects", "detections", "matched", "misses", "false_detections")}
    data = {
        "n": len(failed), "errors": sum(failed.values()),
        "error_codes": dict(sorted(error_codes.items(), key=lambda item: -item[1])),
        "accuracy": None, **totals, "form": FORM, "match_iou": MATCH_IOU,
        "per_class": per_class, "flags": flags, "notes": notes,
        "thresholds": {"flag_energy": thresholds.flag_energy,
                       "flag_lift": thresholds.flag_lift, "min_boxes": thresholds.min_boxes},
    }
    worst_by_class = {label: heap.rows() for label, heap in by_class.items()}
    return Summary(data, {label: counts[label].histogram for label in per_class},
                   lowest.rows(), confident.rows(), worst_by_class, worst_by_class,
                   misses=misses)
