"""audit-diff: two audits of the same manifest, compared row by row, so that a release
can be gated on "does the new model still look where the old one did?".

One streaming pass over both results.csv files: per row the Spearman rank correlation
of the two raw heatmaps, per class the change in accuracy, energy in box and pointing
hits and which way each went, and the rows whose attention moved most. Only
regressions fail the comparison; an improvement is reported as one. Writes diff.json
and diff.html.

Rows are matched by position. Each audit's summary.json records its source and the
working folder its relative image paths are relative to: two audits of the same
manifest (same resolved file or same content) match row for row, others by their
resolved image paths; audits that record neither compare the paths as written.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from onnxcam.audit.clusters import read_heatmap
from onnxcam.audit.manifest import resolve
from onnxcam.audit.report import CSS, thumbnail
from onnxcam.audit.results import HEADER, ResultRow, read_results
from onnxcam.audit.summary import Worst, empty_map
from onnxcam.engine.maps import flat, resize_maps
from onnxcam.errors import AuditError
from onnxcam.files import atomic_write

log = logging.getLogger(__name__)

RESULTS = "results.csv"
SUMMARY = "summary.json"
DIFF_JSON = "diff.json"
DIFF_HTML = "diff.html"
MOVED = 12  # rows shown side by side, lowest similarity first
# Regressions red (report.html's .flag), improvements green; up and down coloured so
# the table reads at a glance.
DIFF_CSS = """
.improved { background: #e7f6ec; border: 2px solid #2f8a4c; color: #1c5230;
        border-radius: 6px; padding: 10px 14px; margin: 8px 0; font-size: 16px; }
tr.better td { background: #eef8f1; } tr.better td:first-child { color: #1c5230;
        font-weight: 600; }
.up { color: #1f7a3d; font-weight: 600; } .down { color: #b11c1c; font-weight: 600; }
.verdict-regressed { color: #b11c1c; font-weight: 600; }
.verdict-improved { color: #1f7a3d; font-weight: 600; }
"""
ARROWS = {"up": "▲", "down": "▼", "same": "="}


@dataclass(frozen=True)
class DiffThresholds:
    """When a class regressed: its mean energy in box fell by more than
    ``max_energy_drop``, its accuracy by more than ``max_accuracy_drop``, or its mean
    heatmap similarity is below ``min_similarity`` while its energy in box fell (or has
    no boxes to tell). A rise by more than the same amounts, with no regression, is an
    improvement."""

    min_similarity: float = 0.5
    max_energy_drop: float = 0.1
    max_accuracy_drop: float = 0.0


# -- rank correlation --


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a flat array, ties sharing their mean rank (as scipy's rankdata)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(len(values), np.float64)
    ranks[order] = mean_rank[np.cumsum(starts_group) - 1]
    return ranks


def common_grid(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps at the finer of the two layer grids (bilinear), when their sizes differ."""
    if old.shape == new.shape:
        return old.astype(np.float64), new.astype(np.float64)
    height, width = max(old.shape[0], new.shape[0]), max(old.shape[1], new.shape[1])
    pair = [resize_maps(m[None].astype(np.float32), height, width)[0] for m in (old, new)]
    return pair[0].astype(np.float64), pair[1].astype(np.float64)


def similarity(old: np.ndarray, new: np.ndarray) -> float:
    """Spearman's rank correlation of two raw heatmaps. The rank correlation is not
    defined for a flat map; two flat maps (no evidence in either) count as 1, one
    flat map against a shaped one as 0."""
    old, new = common_grid(old, new)
    flat_old, flat_new = (bool(flat(m[None])[0]) for m in (old, new))
    if flat_old or flat_new:
        return 1.0 if flat_old and flat_new else 0.0
    ranks_old, ranks_new = average_ranks(old.ravel()), average_ranks(new.ravel())
    return float(np.corrcoef(ranks_old, ranks_new)[0, 1])


# -- per class --


@dataclass
class ClassDiff:
    """Sums over the rows that ran in both audits. As in summary.json, a side's empty
    map (no evidence anywhere) is left out of that side's energy and pointing figures."""

    n: int = 0
    labelled: int = 0
    correct: list[int] = field(default_factory=lambda: [0, 0])  # old, new
    boxes: int = 0
    located: list[int] = field(default_factory=lambda: [0, 0])  # boxes, less empty maps
    energy: list[float] = field(default_factory=lambda: [0.0, 0.0])
    hits: list[int] = field(default_factory=lambda: [0, 0])
    compared: int = 0
    similarity: float = 0.0

    def add(self, old: ResultRow, new: ResultRow, score: float | None,
            empty: tuple[bool, bool] = (False, False)) -> None:
        self.n += 1
        if old["correct"] and new["correct"]:
            self.labelled += 1
            for side, row in enumerate((old, new)):
                self.correct[side] += row["correct"] == "1"
        if old["energy_in_box"] and new["energy_in_box"]:
            self.boxes += 1
            for side, row in enumerate((old, new)):
                if not empty[side]:
                    self.located[side] += 1
                    self.energy[side] += float(row["energy_in_box"])
                    self.hits[side] += row["pointing_hit"] == "1"
        if score is not None:
            self.compared += 1
            self.similarity += score

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"n": self.n, "boxes": self.boxes, "compared": self.compared,
                                   "similarity_mean": _mean(self.similarity, self.compared),
                                   "empty_maps": {"old": self.boxes - self.located[0],
                                                  "new": self.boxes - self.located[1]}}
        for name, sums, counts in (("accuracy", self.correct, [self.labelled] * 2),
                                   ("energy_in_box_mean", self.energy, self.located),
                                   ("pointing_hit_rate", self.hits, self.located)):
            old, new = _mean(sums[0], counts[0]), _mean(sums[1], counts[1])
            change = None if old is None or new is None else round(new - old, 4)
            figures[name] = {"old": old, "new": new, "change": change,
                             "direction": direction(change)}
        return figures


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 4) if count else None


def direction(change: float | None) -> str | None:
    """"up", "down" or "same"; None where there was nothing to compare."""
    if change is None:
        return None
    return "up" if change > 0 else "down" if change < 0 else "same"


def judge(per_class: dict[str, dict[str, Any]], thresholds: DiffThresholds) -> list[dict[str, Any]]:
    """The classes that regressed, with why; sets each class's ``attention`` and
    ``verdict`` (regressed, improved, moved or steady)."""
    flags: list[dict[str, Any]] = []
    for label, figures in per_class.items():
        score = figures["similarity_mean"]
        energy = figures["energy_in_box_mean"]["change"]
        accuracy = figures["accuracy"]["change"]
        moved = score is not None and score < thresholds.min_similarity
        figures["attention"] = None if score is None else "moved" if moved else "kept"
        found = []
        # Attention elsewhere is a regression only when it left the object; without
        # boxes there is no telling, so it stays one.
        if moved and (energy is None or energy < 0):
            found.append({"reason": "attention moved", "similarity_mean": score,
                          "threshold": thresholds.min_similarity,
                          "energy_in_box_change": energy})
        if energy is not None and -energy > thresholds.max_energy_drop:
            found.append({"reason": "energy in box dropped", "energy_in_box_change": energy,
                          "threshold": thresholds.max_energy_drop})
        if accuracy is not None and -accuracy > thresholds.max_accuracy_drop:
            found.append({"reason": "accuracy dropped", "accuracy_change": accuracy,
                          "threshold": thresholds.max_accuracy_drop})
        flags.extend({"class": label, **flag} for flag in found)
        rose = (energy is not None and energy > thresholds.max_energy_drop) or \
            (accuracy is not None and accuracy > thresholds.max_accuracy_drop)
        figures["verdict"] = ("regressed" if found else "improved" if rose
                              else "moved" if moved else "steady")
    return flags


def improvements(per_class: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The classes judged improved, with their changes."""
    return [{"class": label, "reason": "improved",
             "energy_in_box_change": figures["energy_in_box_mean"]["change"],
             "accuracy_change": figures["accuracy"]["change"],
             "similarity_mean": figures["similarity_mean"]}
            for label, figures in per_class.items() if figures["verdict"] == "improved"]


def movement(figures: dict[str, Any], arrow: str = "->") -> str:
    """Which way a class moved, in words: "energy in box up 0.110 -> 0.710 (+0.600), ..."."""
    parts = []
    for name, title in (("energy_in_box_mean", "energy in box"), ("accuracy", "accuracy"),
                        ("pointing_hit_rate", "pointing hits")):
        pair = figures[name]
        if pair["direction"] is not None:
            parts.append(f"{title} {pair['direction']} {pair['old']:.3f} {arrow} "
                         f"{pair['new']:.3f} ({pair['change']:+.3f})")
    if figures["similarity_mean"] is not None:
        parts.append(f"map similarity {figures['similarity_mean']:.3f} "
                     f"(attention {figures['attention']})")
    return ", ".join(parts) or "nothing to compare"


# -- matching rows --


@dataclass(frozen=True)
class Source:
    """What an audit's summary.json records of its source that matching needs; None
    for audits that predate the record (or are unfinished)."""

    cwd: str | None = None
    sha256: str | None = None

    def image(self, path: str) -> str:
        """A row's image path resolved against the audit's working folder."""
        return path if self.cwd is None else resolve(path, Path(self.cwd))


def read_source(folder: Path) -> Source:
    try:
        record = json.loads((folder / SUMMARY).read_text(encoding="utf-8")).get("source")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return Source()
    if not isinstance(record, dict):
        return Source()
    cwd, sha256 = (value if isinstance(value, str) else None
                   for value in (record.get("cwd"), record.get("sha256")))
    return Source(cwd if cwd and os.path.isabs(cwd) else None, sha256)


def matching(old: Source, new: Source) -> str:
    """How rows are matched: "manifest" (the same manifest content: by position),
    "resolved path" (both audits say where their paths are relative to; also for one
    manifest file edited between the audits, or a folder source) or, for audits that
    do not, "image path" (as written)."""
    if old.sha256 is not None and old.sha256 == new.sha256:
        return "manifest"
    if old.cwd is not None and new.cwd is not None:
        return "resolved path"
    return "image path"


def _row_key(row: ResultRow, source: Source, how: str) -> tuple[str, str]:
    """What must agree between the two audits' rows at one position."""
    if how == "manifest":
        return "", row["label"]
    if how == "resolved path":
        return source.image(row["image"]), row["label"]
    return row["image"], row["label"]


# -- the comparison --


@dataclass
class Diff:
    """diff.json's content, plus the rows the page draws side by side."""

    data: dict[str, Any]
    moved: list[tuple[ResultRow, ResultRow]]
    sources: tuple[Source, Source] = (Source(), Source())

    @property
    def failed(self) -> bool:
        return bool(self.data["flags"])


def diff_audits(old: Path, new: Path, thresholds: DiffThresholds = DiffThresholds(),
                moved: int = MOVED) -> Diff:
    """Compare the audit folders ``old`` and ``new`` (see the module docstring).

    Raises AuditError when either is not an audit folder, or their rows do not
    correspond (another manifest, or one audit unfinished)."""
    stats: dict[str, ClassDiff] = {}
    scores: list[float | None] = []
    worst = Worst(moved)
    sources = (read_source(old), read_source(new))
    how = matching(*sources)
    for index, (old_row, new_row) in enumerate(_pairs(old, new, sources, how)):
        score = _row_similarity(old_row, new_row, old, new)
        scores.append(None if score is None else round(score, 4))
        if old_row["status"] != "ok" or new_row["status"] != "ok":
            continue
        if old_row["label"]:
            empty = (empty_map(old_row, old), empty_map(new_row, new))
            stats.setdefault(old_row["label"], ClassDiff()).add(old_row, new_row, score, empty)
        if score is not None:
            worst.offer(-score, index, {**new_row, "index": str(index)})
    per_class = {label: stats[label].figures() for label in sorted(stats)}
    compared = [score for score in scores if score is not None]
    flags = judge(per_class, thresholds)
    data = {
        "old": str(old), "new": str(new), "n": len(scores), "compared": len(compared),
        "similarity_mean": _mean(sum(compared), len(compared)),
        "per_class": per_class,
        "flags": flags,
        "thresholds": {"min_similarity": thresholds.min_similarity,
                       "max_energy_drop": thresholds.max_energy_drop,
                       "max_accuracy_drop": thresholds.max_accuracy_drop},
        "similarity": scores,
        "improvements": improvements(per_class),
        "matched_by": how,
    }
    return Diff(data, _moved_rows(worst, old), sources)


def _pairs(old: Path, new: Path, sources: tuple[Source, Source],
           how: str) -> Iterator[tuple[ResultRow, ResultRow]]:
    """(old row, new row) in manifest order, checked to be the same row."""
    streams = (_results(old), _results(new))
    for index, (old_row, new_row) in enumerate(zip_longest(*streams)):
        if old_row is None or new_row is None:
            shorter = old if old_row is None else new
            raise AuditError(f"the audits' rows do not correspond: {shorter} ends after "
                             f"{index} rows and the other goes on; audits of the same "
                             "manifest, both finished, are needed")
        (old_image, old_label), (new_image, new_label) = (
            _row_key(row, source, how) for row, source in zip((old_row, new_row), sources))
        if (old_image, old_label) != (new_image, new_label):
            raise AuditError(
                f"the audits' rows do not correspond: row {index} is "
                f"{old_image or old_row['image']!r} (label {old_label!r}) in {old} but "
                f"{new_image or new_row['image']!r} (label {new_label!r}) in {new}; audits "
                "of the same manifest are needed")
        yield old_row, new_row


def _results(folder: Path) -> Iterator[ResultRow]:
    path = folder / RESULTS
    if not path.is_file():
        raise AuditError(f"{folder}: not an audit folder (no {RESULTS})")
    with open(path, encoding="utf-8") as stream:
        if stream.readline() != HEADER:
            raise AuditError(f"{path}: not an onnxcam audit results file (header differs)")
    return read_results(path)


def _row_similarity(old_row: ResultRow, new_row: ResultRow, old: Path,
                    new: Path) -> float | None:
    """The two heatmaps' similarity, or None when either row has no map."""
    if old_row["status"] != "ok" or new_row["status"] != "ok":
        return None
    try:
        maps = [read_heatmap(row["heatmap"], folder)
                for row, folder in ((old_row, old), (new_row, new))]
    except (OSError, ValueError) as exc:
        log.warning("row %s: no heatmap to compare (%s)", old_row["image"], exc)
        return None
    if any(m.ndim != 2 for m in maps):
        log.warning("row %s: a heatmap is not 2-D", old_row["image"])
        return None
    score = similarity(maps[0], maps[1])
    return score if math.isfinite(score) else None


def _moved_rows(worst: Worst, old: Path) -> list[tuple[ResultRow, ResultRow]]:
    """The old and new results of the least similar rows, by one more pass over old."""
    chosen = {int(row["index"]): row for row in worst.rows()}
    found: dict[int, ResultRow] = {}
    if chosen:
        for index, row in enumerate(read_results(old / RESULTS)):
            if index in chosen:
                found[index] = row
    return [(found[index], chosen[index]) for index in chosen if index in found]


# -- writing --


def write_diff(diff: Diff, out: Path, old: Path, new: Path) -> None:
    """diff.json and diff.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / DIFF_JSON, (json.dumps(diff.data, indent=2) + "\n").encode())
    atomic_write(out / DIFF_HTML, render(diff, old, new).encode("utf-8"))


def render(diff: Diff, old: Path, new: Path) -> str:
    """diff.html: self-contained, as report.html."""
    data = diff.data
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>onnxcam audit-diff</title><style>", CSS, DIFF_CSS, "</style></head><body>",
        "<h1>onnxcam audit-diff</h1>",
        f"<div class='meta'>old {html.escape(data['old'])} · new {html.escape(data['new'])} · "
        f"{data['n']} rows, {data['compared']} compared · mean similarity "
        f"{_number(data['similarity_mean'])} · rows matched by "
        f"{html.escape(data['matched_by'])}</div>",
        _verdict(data), "<h2>Per class</h2>", _table(data),
        "<h2>Attention moved most</h2>",
        "<p class='legend'>Lowest rank correlation between the two heatmaps first; "
        "old model left, new model right.</p>",
        _pairs_html(diff, old, new), "</body></html>\n",
    ])


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def flag_value(flag: dict[str, Any]) -> float:
    """The figure a flag is about: the similarity for a move, else the change."""
    for key in ("similarity_mean", "energy_in_box_change", "accuracy_change"):
        if flag.get(key) is not None:
            return float(flag[key])
    return math.nan


def _verdict(data: dict[str, Any]) -> str:
    per_class = data["per_class"]
    parts = [] if data["flags"] else \
        ["<div class='ok'>No class regressed past the thresholds.</div>"]
    reasons: dict[str, list[str]] = {}
    for flag in data["flags"]:
        reasons.setdefault(flag["class"], []).append(
            f"{flag['reason']} ({flag_value(flag):.3f}, threshold {flag['threshold']:.3f})")
    for label, found in reasons.items():
        parts.append(f"<div class='flag'><b>{html.escape(label)}</b>: regressed, "
                     f"{html.escape('; '.join(found))}: "
                     f"{html.escape(movement(per_class[label], '→'))}</div>")
    for found in data["improvements"]:
        label = found["class"]
        parts.append(f"<div class='improved'><b>{html.escape(label)}</b>: improved: "
                     f"{html.escape(movement(per_class[label], '→'))}</div>")
    return "".join(parts)


def _change(pair: dict[str, Any]) -> str:
    """"old → new" and, coloured, which way and by how much."""
    cell = f"{_number(pair['old'])} → {_number(pair['new'])}"
    way = pair.get("direction")
    if way is None:
        return cell
    return (f"{cell} <span class='{way}'>{ARROWS[way]} {way} "
            f"{pair['change']:+.3f}</span>")


def _table(data: dict[str, Any]) -> str:
    rows = ["<table><tr><th>class</th><th>rows</th><th>similarity</th><th>accuracy</th>"
            "<th>energy in box</th><th>pointing hits</th><th>verdict</th></tr>"]
    marks = {"regressed": " class='flagged'", "improved": " class='better'"}
    for label, figures in data["per_class"].items():
        cells = [_change(figures[name])
                 for name in ("accuracy", "energy_in_box_mean", "pointing_hit_rate")]
        verdict = figures["verdict"]
        attention = f" ({figures['attention']})" if figures["attention"] else ""
        rows.append(f"<tr{marks.get(verdict, '')}><td>{html.escape(label)}</td>"
                    f"<td>{figures['n']}</td>"
                    f"<td>{_number(figures['similarity_mean'])}{attention}</td>"
                    + "".join(f"<td>{cell}</td>" for cell in cells)
                    + f"<td class='verdict-{verdict}'>{verdict}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _pairs_html(diff: Diff, old: Path, new: Path) -> str:
    if not diff.moved:
        return "<p class='legend'>None.</p>"
    scores = diff.data["similarity"]
    parts = ["<div class='cards'>"]
    for old_row, new_row in diff.moved:
        index = int(new_row["index"])
        frames = []
        for row, folder, source in zip((old_row, new_row), (old, new), diff.sources):
            # the image path as written is relative to the audit's working folder
            picture, _empty = thumbnail({**row, "image": source.image(row["image"])}, None,
                                        folder)
            frames.append(f"<div class='frame'><img alt='' src='data:image/png;base64,"
                          f"{picture}'></div>" if picture
                          else "<div class='frame'>image unavailable</div>")
        name = html.escape(Path(new_row["image"]).name)
        parts.append(
            "<div class='card' style='width:372px'><div style='display:flex;gap:4px'>"
            + "".join(frames) + f"</div><div class='name'>{name}</div>"
            f"label {html.escape(new_row['label'] or '–')} · similarity "
            f"{_number(scores[index])}<br>pred {html.escape(old_row['pred'])} → "
            f"{html.escape(new_row['pred'])}</div>")
    parts.append("</div>")
    return "".join(parts)
