"""report.html: one self-contained page (inline CSS, inline SVG, images as base64
PNG) that opens from disk with no server and no JavaScript.

Top to bottom: the flagged classes in red, what to try (advice.RULES), the per-class
table, energy-in-box per class, overlays of the worst cases with their box drawn, and
the strategy clusters.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onnxcam.audit.backend import AuditRow, load_source
from onnxcam.audit.clusters import (
    FAR_BELOW,
    MINORITY_MIN,
    MINORITY_NOTE,
    MINORITY_SHARE,
    TIGHT,
    ClassClusters,
    read_heatmap,
)
from onnxcam.audit.manifest import region_of
from onnxcam.audit.summary import BINS, Summary
from onnxcam.engine.images import DEFAULT_LIMITS
from onnxcam.engine.maps import heatmaps, jet, overlay
from onnxcam.engine.outputs import png_bytes
from onnxcam.errors import OnnxcamError
from onnxcam.files import atomic_write

log = logging.getLogger(__name__)

THUMBNAIL = 176  # longer side of the worst-case pictures, in pixels
OUTLINE = (255, 0, 255)  # magenta: no colour of the jet map
STRATEGY_CLASSES = 20  # classes drawn in full in the strategy section, minorities first
PALETTE = ("#2f6fb0", "#e07b00", "#2f8a4c", "#c81e1e", "#7b4fb0", "#8c564b", "#d15fa8",
           "#6b7280")  # one colour per cluster (at most MAX_CLUSTERS)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       margin: 0 auto; max-width: 1100px; padding: 24px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #5a6272; margin-bottom: 16px; }
.flag { background: #fde8e8; border: 2px solid #c81e1e; color: #7f1010; border-radius: 6px;
        padding: 10px 14px; margin: 8px 0; font-size: 16px; }
.flag b { font-size: 17px; } .ok { background: #e7f6ec; border: 2px solid #2f8a4c;
        color: #1c5230; border-radius: 6px; padding: 10px 14px; margin: 8px 0; }
.note { background: #f3f4f6; border-left: 4px solid #9aa1ad; padding: 6px 12px; margin: 6px 0;
        color: #424956; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: right; padding: 5px 10px; border-bottom: 1px solid #e3e6eb; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f6f8; }
tr.flagged td { background: #fdf0f0; } tr.flagged td:first-child { color: #b11c1c;
        font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 184px; border: 1px solid #dde1e7; border-radius: 6px; padding: 4px;
        font-size: 12px; background: #fafbfc; }
.frame { width: 176px; height: 176px; display: flex; align-items: center;
        justify-content: center; background: #eef0f3; }
.frame img { display: block; max-width: 176px; max-height: 176px; }
.card .name { font-weight: 600; overflow-wrap: anywhere; } .bad { color: #b11c1c; }
.legend { color: #5a6272; font-size: 12px; }
.minority { background: #fff4e0; border: 2px solid #d97706; color: #7a3e00;
        border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.advice td, .advice th { text-align: left; vertical-align: top; }
.minority a { color: #7a3e00; }
.strategy { display: flex; gap: 12px; align-items: flex-start; margin: 10px 0; }
.strategy .mean { width: 120px; font-size: 12px; }
.strategy .mean img { display: block; width: 96px; height: 96px; image-rendering: pixelated;
        border: 3px solid; }
"""


def write_report(summary: Summary, path: Path, rows: dict[int, AuditRow], out: Path) -> None:
    """Render ``summary`` to ``path``; ``rows`` gives the worst cases' boxes and masks,
    and heatmap paths in results.csv are relative to ``out``."""
    data = summary.data
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>onnxcam audit</title><style>", CSS, "</style></head><body>",
        _heading(data), _flags(data), _advice(data), "<h2>Per class</h2>", _table(data),
        "<h2>Energy in box per class</h2>", _plot(data, summary.histograms),
        _flagged_galleries(summary, rows, out),
        "<h2>Lowest energy in box</h2>",
        "<p class='legend'>All rows, the heatmap's mass furthest from the object.</p>",
        _cards(summary.lowest_energy, rows, out),
        "<h2>Confident mistakes</h2>",
        "<p class='legend'>Wrong predictions, most confident first; those shown just "
        "above are not repeated.</p>",
        _cards(_not_in(summary.confident_mistakes, summary.lowest_energy), rows, out),
        _strategies(summary, rows, out),
        "</body></html>\n",
    ]
    atomic_write(path, "".join(parts).encode("utf-8"))


def _flagged_galleries(summary: Summary, rows: dict[int, AuditRow], out: Path) -> str:
    """Per flagged class, where the model looked when it got that class right."""
    parts = []
    for flag in summary.data["flags"]:
        label = flag["class"]
        right = bool(summary.lowest_correct_by_class.get(label))
        what = "its right answers from the wrong place: correct predictions" if right \
            else "its rows"
        parts.append(
            f"<h2 class='bad'>{html.escape(label)}: where the model looks</h2>"
            f"<p class='legend'>The lowest energy in box among {what}. Boxes and masks are "
            "outlined in magenta; the heatmap is for the class named <i>explained</i>.</p>"
            + _cards(summary.flagged_cases(label), rows, out))
    return "".join(parts)


def _not_in(rows: list[dict[str, str]], shown: list[dict[str, str]]) -> list[dict[str, str]]:
    seen = {row["index"] for row in shown}
    return [row for row in rows if row["index"] not in seen]


def _number(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _heading(data: dict[str, Any]) -> str:
    bundle = data.get("bundle", {})
    accuracy = "–" if data["accuracy"] is None else f"{100 * data['accuracy']:.1f}%"
    return (f"<h1>onnxcam audit</h1><div class='meta'>{data['n']} rows, {data['errors']} "
            f"errors, accuracy {accuracy} · method {html.escape(str(data.get('method', '')))}"
            f", explaining the {html.escape(str(data.get('explain', '')))} class · layer "
            f"{html.escape(str(bundle.get('target_layer', '')))}{_form(data)}</div>")


FORMS = {
    "multi-label": " · multi-label: one row per (image, label) pair, each label's map "
                   "measured in its own box",
    "segmentation": " · segmentation: a row per (image, class in its mask), each class's "
                    "map measured in its own pixels (energy in mask)",
}


def _form(data: dict[str, Any]) -> str:
    return FORMS.get(data.get("form", ""), "")


def _flags(data: dict[str, Any]) -> str:
    parts = []
    for flag in data["flags"]:
        parts.append(
            f"<div class='flag'>⚠ <b>{html.escape(flag['class'])}</b>: "
            f"{html.escape(flag['reason'])} (mean energy-in-box "
            f"{_number(flag['energy_in_box_mean'])} vs box area "
            f"{_number(flag['box_area_mean'])}; pointing hits "
            f"{_number(100 * flag['pointing_hit_rate'], 0)}% of "
            f"{flag['boxes'] - flag.get('empty_maps', 0)} boxes{_empty_maps(flag)})</div>")
    judged = [label for label, figures in data["per_class"].items()
              if figures["boxes"] - figures.get("empty_maps", 0)
              >= data.get("thresholds", {}).get("min_boxes", 1)]
    if not judged:
        # Nothing was measured, so nothing may look like a pass.
        parts.append("<div class='note'>No class judged: no class has enough rows with a "
                     "box or mask to say where the model looks. Give boxes (bbox or mask "
                     "columns) to judge attention.</div>")
    elif not data["flags"]:
        parts.append(f"<div class='ok'>No class flagged: attention falls on the objects in "
                     f"the {len(judged)} class{'es' if len(judged) != 1 else ''} judged "
                     "(thresholds below).</div>")
    for note in data.get("notes", []):
        parts.append(f"<div class='note'>{html.escape(note['class'])}: "
                     f"{html.escape(note['note'])}</div>")
    return "".join(parts)


def _empty_maps(figures: dict[str, Any]) -> str:
    count = figures.get("empty_maps", 0)
    return f"; {count} empty map{'s' if count != 1 else ''} left out" if count else ""


def _advice(data: dict[str, Any]) -> str:
    """What each finding means and what to try, one row per finding."""
    advice = data.get("advice", [])
    if not advice:
        return ""
    lines = ["<h2>What to try</h2><table class='advice'><tr><th>class</th><th>finding</th>"
             "<th>what it means</th><th>what to try</th></tr>"]
    for item in advice:
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(item[key]))}</td>" for key in
                                      ("class", "finding", "meaning", "try")) + "</tr>")
    lines.append("</table>")
    return "".join(lines)


def _table(data: dict[str, Any]) -> str:
    flagged = {flag["class"] for flag in data["flags"]}
    faithful = any("deletion_auc_mean" in f for f in data["per_class"].values())
    masks = data.get("form") == "segmentation"  # every region is a class's true mask
    head = ["class", "(image, label) pairs" if data.get("form") == "multi-label" else "rows",
            "accuracy", "energy in mask" if masks else "energy in box",
            "mask area" if masks else "box area", "pointing hits",
            "masks" if masks else "boxes", "errors", "empty maps"] + (
        ["deletion AUC ↓", "insertion AUC ↑"] if faithful else [])
    lines = ["<table><tr>", *(f"<th>{h}</th>" for h in head), "</tr>"]
    for label, f in data["per_class"].items():
        cells = [html.escape(label), str(f["n"]), _number(f["accuracy"]),
                 _number(f["energy_in_box_mean"]), _number(f["box_area_mean"]),
                 _number(f["pointing_hit_rate"]), str(f["boxes"]), str(f["errors"]),
                 str(f.get("empty_maps", 0))]
        if faithful:
            cells += [_number(f.get("deletion_auc_mean"), 3),
                      _number(f.get("insertion_auc_mean"), 3)]
        css = " class='flagged'" if label in flagged else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    thresholds = data.get("thresholds", {})
    lines.append(
        f"<p class='legend'>Energy in box: the share of the heatmap's mass inside the box "
        f"or mask; a uniform map scores the box's area share. Flagged below "
        f"{thresholds.get('flag_energy')} (mostly outside), or below "
        f"{thresholds.get('flag_lift')}× the box area (barely above a uniform map); classes "
        f"with fewer than {thresholds.get('min_boxes')} boxes are not judged. Empty maps "
        "(flat: no evidence for the class anywhere, so no location) are counted apart and "
        "left out of energy in box, box area and pointing hits."
        + (" Deletion AUC: lower is better (the score falls fast as the most salient "
           "pixels go); insertion AUC: higher is better." if faithful else "") + "</p>")
    return "".join(lines)


def _plot(data: dict[str, Any], histograms: dict[str, list[int]]) -> str:
    """Per class: a histogram of energy-in-box over [0, 1], its mean (a bar, red when
    flagged) and the mean box area (dashed: what a uniform map would score)."""
    classes = [label for label in histograms
               if data["per_class"][label]["energy_in_box_mean"] is not None]
    if not classes:
        return "<p class='legend'>No row has a box or mask.</p>"
    flagged = {flag["class"] for flag in data["flags"]}
    left, width, row_height, top = 120, 600, 56, 16
    height = top + row_height * len(classes) + 34
    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + width + 170}' "
           f"height='{height}' font-family='system-ui, sans-serif' font-size='12'>"]
    for tick in np.linspace(0, 1, 6):
        x = left + tick * width
        svg.append(f"<line x1='{x:.1f}' y1='{top - 4}' x2='{x:.1f}' "
                   f"y2='{height - 30}' stroke='#e3e6eb'/>"
                   f"<text x='{x:.1f}' y='{height - 14}' text-anchor='middle' "
                   f"fill='#5a6272'>{tick:.1f}</text>")
    svg.append(f"<text x='{left + width / 2}' y='{height - 1}' text-anchor='middle' "
               "fill='#5a6272'>energy in box</text>")
    for position, label in enumerate(classes):
        svg.append(_plot_row(label, histograms[label], data["per_class"][label],
                             label in flagged, left, width, top + position * row_height,
                             row_height))
    svg.append("</svg>")
    return "".join(svg)


def _plot_row(label: str, histogram: list[int], figures: dict[str, Any], flagged: bool,
              left: int, width: int, y: float, row_height: int) -> str:
    colour = "#c81e1e" if flagged else "#2f6fb0"
    peak = max(max(histogram), 1)
    bar_width = width / BINS
    base = y + row_height - 12
    parts = [f"<text x='{left - 10}' y='{base - 12}' text-anchor='end' font-size='14' "
             f"font-weight='600' fill='{colour}'>{html.escape(label)}</text>"]
    for b, count in enumerate(histogram):
        if count:
            bar = (row_height - 18) * count / peak
            parts.append(f"<rect x='{left + b * bar_width + 1:.1f}' y='{base - bar:.1f}' "
                         f"width='{bar_width - 2:.1f}' height='{bar:.1f}' fill='{colour}' "
                         "fill-opacity='0.35'/>")
    energy, area = figures["energy_in_box_mean"], figures["box_area_mean"]
    x_mean, x_area = left + energy * width, left + area * width
    parts.append(f"<line x1='{x_area:.1f}' y1='{y + 2}' x2='{x_area:.1f}' y2='{base}' "
                 "stroke='#333' stroke-width='1.5' stroke-dasharray='4 3'/>")
    parts.append(f"<line x1='{x_mean:.1f}' y1='{y + 2}' x2='{x_mean:.1f}' y2='{base}' "
                 f"stroke='{colour}' stroke-width='4'/>")
    parts.append(f"<line x1='{left}' y1='{base}' x2='{left + width}' y2='{base}' "
                 "stroke='#9aa1ad'/>")
    parts.append(f"<text x='{left + width + 10}' y='{base - 20}' fill='{colour}'>"
                 f"mean {energy:.2f}</text><text x='{left + width + 10}' y='{base - 5}' "
                 f"fill='#333'>box area {area:.2f}</text>")
    return "".join(parts)


def _cards(rows: list[dict[str, str]], manifest_rows: dict[int, AuditRow], out: Path) -> str:
    if not rows:
        return "<p class='legend'>None.</p>"
    cards = ["<div class='cards'>"]
    for row in rows:
        picture, empty = thumbnail(row, manifest_rows.get(int(row["index"])), out)
        image = (f"<div class='frame'><img alt='' src='data:image/png;base64,{picture}'></div>"
                 if picture else "<div class='frame'>image unavailable</div>")
        verdict = "" if row["correct"] != "0" else " class='bad'"
        energy = f"energy in box {row['energy_in_box']}<br>" if row["energy_in_box"] else ""
        if empty:
            energy += f"<i>empty map: no evidence for {html.escape(row['explained'])}</i><br>"
        cards.append(
            f"<div class='card'>{image}<div class='name'>{html.escape(Path(row['image']).name)}"
            f"</div>label {html.escape(row['label'] or '–')} · "
            f"<span{verdict}>pred {html.escape(row['pred'])} ({row['score']})</span><br>"
            f"{energy}explained {html.escape(row['explained'])}</div>")
    cards.append("</div>")
    return "".join(cards)


def thumbnail(row: dict[str, str], manifest_row: AuditRow | None,
               out: Path) -> tuple[str | None, bool]:
    """A base64 PNG of the heatmap over the image, box or mask outlined, or None; and
    whether the map is empty (no evidence for the class anywhere)."""
    try:
        image = load_source(row["image"], 3, DEFAULT_LIMITS)
        raw = read_heatmap(row["heatmap"], out)
        height, width = image.shape[:2]
        picture = overlay(image, heatmaps(raw[None].astype(np.float32), height, width)[0])
        region = None
        if manifest_row is not None and manifest_row.has_region:
            region = region_of(manifest_row, height, width)
    except (OnnxcamError, OSError, ValueError) as exc:
        log.warning("no picture for %s: %s", row["image"], exc)
        return None, False
    scale = THUMBNAIL / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    small = np.array(Image.fromarray(picture).resize(size, resample))
    if region is not None:
        inside = np.asarray(Image.fromarray(region.astype(np.uint8) * 255)
                            .resize(size, Image.Resampling.NEAREST)) > 0
        small[outline(inside)] = OUTLINE
    return base64.b64encode(png_bytes(small)).decode("ascii"), float(raw.max()) <= 0


def outline(region: np.ndarray, thickness: int = 2) -> np.ndarray:
    """The pixels of ``region`` within ``thickness`` of its edge (image borders count
    as edges)."""
    inner = region.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    return region & ~inner



def _strategies(summary: Summary, rows: dict[int, AuditRow], out: Path) -> str:
    """Per explained class, its clusters of heatmaps (SpRAy): a table of all, then the
    classes with more than one cluster in full, those with a minority strategy first."""
    data = summary.data.get("clusters")
    if not data:
        return ""
    per_class = data["per_class"]
    thresholds = summary.data.get("thresholds", {})
    parts = [
        "<h2>Strategy clusters</h2><p class='legend'>Each explained class's heatmaps (a "
        f"random sample of at most {data['sample']} rows), downsized to "
        f"{data['grid']}×{data['grid']} and normalised to unit mass, grouped by spectral "
        "clustering on a graph joining each map to its min("
        f"{data['max_neighbours']}, ⌈√sample⌉) nearest; the number of "
        "clusters (1 to " f"{data['max_clusters']}) is where the Laplacian's eigengap is "
        "largest. Empty maps (no evidence anywhere) are counted and left out. "
        f"<i>{MINORITY_NOTE}</i>: a cluster of at most {MINORITY_SHARE:.0%} of "
        f"the sample whose spread is at most {TIGHT}× its distance to the rest's mean map, "
        "and that distance at least the rest's spread. Per cluster, in the order of the "
        "sizes: the mean energy in box of its rows with a box and their accuracy. "
        "<i>Explained by the background</i>: a cluster of a class with several (not all "
        f"of them so), with at least {MINORITY_MIN} rows with a box, whose mean energy in "
        "box is below "
        f"{thresholds.get('flag_energy')} and either below {thresholds.get('flag_lift')}× "
        f"its mean box area or at most {FAR_BELOW}× the mean of the class's other rows.</p>",
        "<table><tr><th>class</th><th>rows</th><th>sampled</th><th>clusters</th>"
        "<th>eigengap</th><th>sizes</th><th>energy in box</th><th>accuracy</th>"
        "<th>note</th></tr>"]
    for label, entry in per_class.items():
        clusters = entry["clusters"]
        notes = [entry.get("note", "")] + [f"cluster {c + 1}: {clusters[c]['note']}"
                                           for c in entry.get("background", [])]
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{entry['rows']}</td>"
                     f"<td>{entry['sampled']}{_empty(entry['empty'])}</td><td>{entry['k']}</td>"
                     f"<td>{entry['eigengap']:.3f}</td>"
                     f"<td>{' / '.join(map(str, entry['sizes']))}</td>"
                     f"<td>{_per_cluster(clusters, 'energy_in_box_mean')}</td>"
                     f"<td>{_per_cluster(clusters, 'accuracy')}</td>"
                     f"<td>{html.escape('; '.join(note for note in notes if note))}</td></tr>")
    parts.append("</table>")
    several = sorted((label for label, entry in per_class.items() if entry["k"] > 1),
                     key=lambda label: (per_class[label]["minority"] is None
                                        and not per_class[label].get("background"), label))
    for label in several[:STRATEGY_CLASSES]:
        parts.append(_class_strategies(summary.clusters[label], per_class[label], summary,
                                       rows, out))
    if len(several) > STRATEGY_CLASSES:
        parts.append(f"<p class='legend'>{len(several) - STRATEGY_CLASSES} more classes "
                     "with several clusters: see summary.json.</p>")
    return "".join(parts)


def _empty(count: int) -> str:
    return f" ({count} empty, left out)" if count else ""


def _per_cluster(clusters: list[dict[str, Any]], key: str) -> str:
    return " / ".join(_number(cluster.get(key)) for cluster in clusters)


def _background(label: str, cluster: int, entry: dict[str, Any], summary: Summary) -> str:
    """The note on a cluster explained by the background, its images listed."""
    found = entry["clusters"][cluster]
    members = found["members"]
    links = []
    for index in members:
        row = summary.cluster_rows.get(index)
        if row is not None:
            image = row["image"]
            href = image if "://" in image else Path(image).resolve().as_uri()
            links.append(f"<a href='{html.escape(href)}'>{html.escape(Path(image).name)}</a>")
    more = found["count"] - len(links)
    return (f"<div class='minority'>⚑ <b>{html.escape(label)}</b>, cluster {cluster + 1}: "
            f"{html.escape(found['note'])} (energy in box {_number(found['energy_in_box_mean'])}"
            f" against box area {_number(found['box_area_mean'])}, accuracy "
            f"{_number(found['accuracy'])}): {', '.join(links)}"
            + (f" and {more} more (summary.json lists the first {len(members)})" if more > 0
               else "") + "</div>")


def _class_strategies(found: ClassClusters, entry: dict[str, Any], summary: Summary,
                      rows: dict[int, AuditRow], out: Path) -> str:
    parts = [f"<h2>{html.escape(found.label)}: {found.k} strategies</h2>"]
    minority = entry["minority"]
    if minority:
        parts.append(
            f"<div class='minority'>⚑ <b>{html.escape(found.label)}</b>: {MINORITY_NOTE} "
            f"(cluster {minority['cluster'] + 1}: {minority['size']} of {entry['sampled']} "
            f"rows, spread {minority['spread']:.3f}, {minority['far']:.1f}× the rest's "
            "spread away from the rest)</div>")
    for cluster in entry.get("background", []):
        parts.append(_background(found.label, cluster, entry, summary))
    parts.append(_embedding(found))
    for cluster, summary_cluster in enumerate(entry["clusters"]):
        mean = np.asarray(summary_cluster["mean_heatmap"])
        picture = jet(mean / mean.max() if mean.max() > 0 else mean)
        exemplars = [summary.cluster_rows[i] for i in summary_cluster["exemplars"]
                     if i in summary.cluster_rows]
        parts.append(
            f"<div class='strategy'><div class='mean'><img alt='' style='border-color:"
            f"{PALETTE[cluster % len(PALETTE)]}' src='data:image/png;base64,"
            f"{base64.b64encode(png_bytes(picture)).decode('ascii')}'>cluster {cluster + 1}"
            f": {summary_cluster['size']} rows, mean map; energy in box "
            f"{_number(summary_cluster.get('energy_in_box_mean'))}, accuracy "
            f"{_number(summary_cluster.get('accuracy'))}</div>"
            + _cards(exemplars, rows, out) + "</div>")
    return "".join(parts)


def _embedding(found: ClassClusters, width: int = 360, height: int = 240) -> str:
    """The sample in the spectral embedding's first two non-trivial coordinates, one
    dot per row, coloured by cluster."""
    points = found.embedding
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    margin = 12
    key = " ".join(f"<span style='color:{PALETTE[c % len(PALETTE)]}'>●</span> cluster {c + 1} "
                   f"({(found.labels == c).sum()})" for c in range(found.k))
    xy = margin + (points - low) / span * [width - 2 * margin, height - 2 * margin]
    dots = "".join(
        f"<circle cx='{x:.1f}' cy='{height - y:.1f}' r='3.5' fill-opacity='0.75' "
        f"fill='{PALETTE[label % len(PALETTE)]}'/>"
        for (x, y), label in zip(xy, found.labels, strict=True))
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
            f"<rect width='{width}' height='{height}' fill='#fafbfc' stroke='#dde1e7'/>"
            f"{dots}</svg><p class='legend'>{key} · Spectral embedding (the second and "
            "third eigenvectors of the graph's normalised Laplacian): one dot per sampled "
            "row, coloured by cluster; a cluster cut off from the rest of the graph may collapse "
            "onto one point.</p>")
