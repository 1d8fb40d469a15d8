"""Per-class figures, flags and the worst cases, from one streaming pass over
results.csv. Memory is bounded: counters per class, a fixed histogram of
energy-in-box per class, and the K worst rows of each kind.

An empty map (flat: no evidence for the class anywhere) has no location, so it is
counted apart and left out of the energy-in-box figures rather than scored as
attention outside the object. Only rows whose energy and pointing hit are both 0 can
be empty; their stored maps are read to tell.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit.results import ResultRow, read_heatmap, read_results
from onnxcam.engine.maps import flat
from onnxcam.errors import OnnxcamError

log = logging.getLogger(__name__)

BINS = 20  # energy-in-box histogram bins over [0, 1]
WORST = 10  # worst cases kept of each kind


@dataclass(frozen=True)
class Thresholds:
    """When a class gets flagged.

    ``flag_energy``: a mean energy-in-box below it means attention mostly outside the
    object. ``flag_lift``: a mean energy-in-box below ``flag_lift`` times the mean box
    area is barely better than a uniform map, whose energy is the box's area share.
    ``min_boxes``: classes with fewer rows with a box or mask get a note, not a flag.
    """

    flag_energy: float = 0.5
    flag_lift: float = 1.5
    min_boxes: int = 10


@dataclass
class ClassStats:
    n: int = 0  # rows that ran
    correct: int = 0
    errors: int = 0
    boxes: int = 0  # rows with a box or mask
    empty_maps: int = 0  # of those, rows whose map is empty: left out of the sums below
    energy: float = 0.0
    area: float = 0.0
    hits: int = 0
    located_correct: int = 0  # right predictions among the rows measured in the box
    faithful: int = 0
    deletion: float = 0.0
    insertion: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)

    def add(self, row: ResultRow, empty: bool = False) -> None:
        if row["status"] != "ok":
            self.errors += 1
            return
        self.n += 1
        self.correct += row["correct"] == "1"
        if row["energy_in_box"]:
            self.boxes += 1
        if empty:
            self.empty_maps += 1
        elif row["energy_in_box"]:
            energy = float(row["energy_in_box"])
            self.located_correct += row["correct"] == "1"
            self.energy += energy
            self.area += float(row["box_area"])
            self.hits += row["pointing_hit"] == "1"
            self.histogram[min(BINS - 1, int(energy * BINS))] += 1
        if row["deletion_auc"]:
            self.faithful += 1
            self.deletion += float(row["deletion_auc"])
            self.insertion += float(row["insertion_auc"])

    @property
    def located(self) -> int:
        """Rows with a box or mask and a map that is not empty."""
        return self.boxes - self.empty_maps

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "n": self.n,
            "accuracy": _share(self.correct, self.n),
            "energy_in_box_mean": _share(self.energy, self.located),
            "pointing_hit_rate": _share(self.hits, self.located),
            "box_area_mean": _share(self.area, self.located),
            "boxes": self.boxes,
            "errors": self.errors,
            "empty_maps": self.empty_maps,
            "accuracy_located": _share(self.located_correct, self.located),
        }
        if self.faithful:
            figures["deletion_auc_mean"] = _share(self.deletion, self.faithful)
            figures["insertion_auc_mean"] = _share(self.insertion, self.faithful)
        return figures


def _share(part: float, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


@dataclass
class Summary:
    """summary.json's content, plus what the report draws."""

    data: dict[str, Any]
    histograms: dict[str, list[int]]
    lowest_energy: list[ResultRow]
    confident_mistakes: list[ResultRow]
    # Per class: the lowest energy-in-box among its correct predictions (right answers
    # from the wrong place), and among all its rows.
    lowest_correct_by_class: dict[str, list[ResultRow]]
    lowest_by_class: dict[str, list[ResultRow]]
    # Strategy clusters per explained class (clusters.ClassClusters), and the
    # results.csv rows of their exemplars, by index.
    clusters: dict[str, Any] = field(default_factory=dict)
    cluster_rows: dict[int, ResultRow] = field(default_factory=dict)
    # A detection audit's objects no detection matched, the first ones in order.
    misses: list[ResultRow] = field(default_factory=list)

    def flagged_cases(self, label: str) -> list[ResultRow]:
        """What to show for a flagged class: its right answers from the wrong place, or
        its lowest energy-in-box rows when it has no right answer."""
        return self.lowest_correct_by_class.get(label) or self.lowest_by_class.get(label, [])

    def shown_rows(self) -> list[ResultRow]:
        """Every row the report draws."""
        flagged = [row for flag in self.data["flags"] for row in self.flagged_cases(flag["class"])]
        return flagged + self.lowest_energy + self.confident_mistakes + list(
            self.cluster_rows.values())


class Worst:
    """The ``size`` rows with the largest key, kept in a heap."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.heap: list[tuple[float, int, ResultRow]] = []

    def offer(self, key: float, index: int, row: ResultRow) -> None:
        # Ties go to the earlier row: -index makes later rows the smaller ones.
        item = (key, -index, row)
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def rows(self) -> list[ResultRow]:
        return [row for _, _, row in sorted(self.heap, reverse=True)]


def empty_map(row: ResultRow, out: Path) -> bool:
    """Whether a row with a box has an empty map. A flat map scores energy 0 and
    misses, so only such rows are read; an unreadable map counts as not empty."""
    if row["energy_in_box"] == "" or float(row["energy_in_box"]) > 0 \
            or row["pointing_hit"] != "0" or not row.get("heatmap"):
        return False
    try:
        raw = read_heatmap(row["heatmap"], out)
    except (OnnxcamError, OSError, ValueError) as exc:
        log.warning("cannot tell whether %s's map is empty: %s", row["image"], exc)
        return False
    return bool(flat(np.asarray(raw, np.float32)[None])[0])


def summarize(results: Path, thresholds: Thresholds = Thresholds(),
              classes: list[str] | None = None, worst: int = WORST) -> Summary:
    """Aggregate results.csv. ``classes`` (the bundle's class names) keeps rows whose
    label names no class (an unknown label's error) out of the per-class figures.
    Heatmap references are relative to the folder of ``results``."""
    stats: dict[str, ClassStats] = {}
    total = errors = labelled = correct = 0
    error_codes: dict[str, int] = {}
    lowest, mistakes = Worst(worst), Worst(worst)
    lowest_correct_by_class: dict[str, Worst] = {}
    lowest_by_class: dict[str, Worst] = {}
    for index, row in enumerate(read_results(results)):
        row["index"] = str(index)
        total += 1
        if row["status"] != "ok":
            errors += 1
            code = (row.get("error") or "error").split(":", 1)[0]
            error_codes[code] = error_codes.get(code, 0) + 1
        empty = row["status"] == "ok" and empty_map(row, results.parent)
        if row["label"] and (classes is None or row["label"] in classes):
            stats.setdefault(row["label"], ClassStats()).add(row, empty)
        if row["status"] != "ok":
            continue
        if row["correct"]:
            labelled += 1
            correct += row["correct"] == "1"
        if row["energy_in_box"] and not empty:
            key = -float(row["energy_in_box"])
            lowest.offer(key, index, row)
            if row["label"] in stats:
                lowest_by_class.setdefault(row["label"], Worst(worst)).offer(key, index, row)
                if row["correct"] == "1":
                    lowest_correct_by_class.setdefault(row["label"], Worst(worst)).offer(
                        key, index, row)
        if row["correct"] == "0":
            mistakes.offer(float(row["score"]), index, row)
    per_class = {label: stats[label].figures() for label in sorted(stats)}
    flags, notes = judge(per_class, thresholds)
    data = {
        "n": total,
        "errors": errors,
        "error_codes": dict(sorted(error_codes.items(), key=lambda item: -item[1])),
        "accuracy": _share(correct, labelled),
        "per_class": per_class,
        "flags": flags,
        "notes": notes,
        "thresholds": {"flag_energy": thresholds.flag_energy,
                       "flag_lift": thresholds.flag_lift, "min_boxes": thresholds.min_boxes},
    }
    return Summary(data, {label: stats[label].histogram for label in sorted(stats)},
                   lowest.rows(), mistakes.rows(),
                   {label: heap.rows() for label, heap in lowest_correct_by_class.items()},
                   {label: heap.rows() for label, heap in lowest_by_class.items()})


def judge(per_class: dict[str, dict[str, Any]],
          thresholds: Thresholds) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Flags for classes whose attention misses the object; notes for classes with too
    few boxes to say."""
    flags: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    for label, figures in per_class.items():
        boxes, empty = figures["boxes"], figures["empty_maps"]
        if boxes - empty < thresholds.min_boxes:
            if figures["n"]:
                left_out = f" and {empty} more with an empty map" if empty else ""
                notes.append({"class": label, "note": (
                    f"{boxes - empty} row(s) with a box or mask{left_out}, fewer than "
                    f"min_boxes={thresholds.min_boxes}: attention not judged")})
            continue
        energy, area = figures["energy_in_box_mean"], figures["box_area_mean"]
        found = {"energy_in_box_mean": energy, "box_area_mean": area, "boxes": boxes,
                 "pointing_hit_rate": figures["pointing_hit_rate"], "empty_maps": empty,
                 "accuracy_located": figures["accuracy_located"]}
        if energy < thresholds.flag_energy:
            flags.append({"class": label, "reason": "attention mostly outside the object",
                          **found, "threshold": thresholds.flag_energy})
        elif energy < thresholds.flag_lift * area:
            flags.append({"class": label, "reason": "attention barely above a uniform map",
                          **found, "threshold": round(thresholds.flag_lift * area, 4)})
    return flags, notes
