"""A detection audit's report.html: the classifier report's page (flags, advice,
energy-in-box plot) with a per-class table of detection figures and galleries of
detections and missed objects, each picture with its boxes drawn."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from onnxcam.audit.backend import load_source
from onnxcam.audit.regions import Box
from onnxcam.audit.report import (
    CSS,
    OUTLINE,
    THUMBNAIL,
    _advice,
    _flags,
    _number,
    _plot,
    outline,
)
from onnxcam.audit.results import ResultRow, read_heatmap
from onnxcam.audit.summary import Summary
from onnxcam.engine.images import DEFAULT_LIMITS
from onnxcam.engine.maps import heatmaps, overlay
from onnxcam.engine.outputs import png_bytes
from onnxcam.errors import OnnxcamError
from onnxcam.files import atomic_write

log = logging.getLogger(__name__)

DETECTED = (255, 255, 255)  # the detection's own box: white, beside the magenta object

LEGEND = ("Each picture: the detection's map over the image, the annotated object's box "
          "in magenta and the detected box in white.")


def write_detection_report(summary: Summary, path: Path, out: Path) -> None:
    """Render a detection audit's ``summary`` to ``path``; map references in results.csv
    are relative to ``out``."""
    data = summary.data
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>onnxcam detection audit</title><style>", CSS, "</style></head><body>",
        _heading(data), _flags(data), _advice(data), "<h2>Per class</h2>", _table(data),
        "<h2>Energy in box per class</h2>", _plot(data, summary.histograms),
    ]
    for flag in data["flags"]:
        label = flag["class"]
        parts.append(f"<h2 class='bad'>{html.escape(label)}: where the detector looks</h2>"
                     f"<p class='legend'>Its matched detections with the lowest energy in "
                     f"their object's box. {LEGEND}</p>"
                     + _cards(summary.lowest_by_class.get(label, []), out))
    parts += [
        "<h2>Worst detections</h2>",
        f"<p class='legend'>Matched detections, lowest energy in their object's box first. "
        f"{LEGEND}</p>", _cards(summary.lowest_energy, out),
        "<h2>Missed objects</h2>",
        "<p class='legend'>Objects no detection matched (IoU at least "
        f"{data.get('match_iou')}, same class), the first in order; their box in "
        "magenta.</p>", _cards(summary.misses, out),
        "<h2>Confident false detections</h2>",
        "<p class='legend'>Detections that matched no object, highest score first.</p>",
        _cards(summary.confident_mistakes, out),
        "</body></html>\n",
    ]
    atomic_write(path, "".join(parts).encode("utf-8"))


def _heading(data: dict[str, Any]) -> str:
    bundle = data.get("bundle", {})
    return (f"<h1>onnxcam detection audit</h1><div class='meta'>{data['n']} images, "
            f"{data['errors']} errors · {data['objects']} objects, {data['detections']} "
            f"detections: {data['matched']} matched, {data['misses']} missed, "
            f"{data['false_detections']} false · method "
            f"{html.escape(str(data.get('method', '')))}, every detection explained for its "
            f"class · layer {html.escape(str(bundle.get('target_layer', '')))}</div>")


def _table(data: dict[str, Any]) -> str:
    flagged = {flag["class"] for flag in data["flags"]}
    head = ["class", "objects", "detections", "matched", "misses", "false detections",
            "recall", "precision", "energy in box", "box area", "pointing hits", "empty maps",
            "errors"]
    lines = ["<table><tr>", *(f"<th>{h}</th>" for h in head), "</tr>"]
    for label, f in data["per_class"].items():
        cells = [html.escape(label), *(str(f[key]) for key in (
            "objects", "detections", "matched", "misses", "false_detections")),
            *(_number(f[key]) for key in ("recall", "precision", "energy_in_box_mean",
                                          "box_area_mean", "pointing_hit_rate")),
            str(f["empty_maps"]), str(f["errors"])]
        css = " class='flagged'" if label in flagged else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    thresholds = data.get("thresholds", {})
    lines.append(
        "<p class='legend'>A detection matches an object of its class when their IoU is at "
        f"least {data.get('match_iou')}, detections taken by score as COCO's evaluation "
        "does. Energy in box: the share of a matched detection's map inside its object's "
        "annotated box; pointing hits: its maximum inside that box. Flagged below "
        f"{thresholds.get('flag_energy')} (evidence mostly outside the objects), or below "
        f"{thresholds.get('flag_lift')}× the box area; classes with fewer than "
        f"{thresholds.get('min_boxes')} matched detections are not judged. Empty maps are "
        "counted apart and left out of the means.</p>")
    return "".join(lines)


def _cards(rows: list[ResultRow], out: Path) -> str:
    if not rows:
        return "<p class='legend'>None.</p>"
    cards = ["<div class='cards'>"]
    for row in rows:
        picture = thumbnail(row, out)
        image = (f"<div class='frame'><img alt='' src='data:image/png;base64,{picture}'></div>"
                 if picture else "<div class='frame'>image unavailable</div>")
        found = (f"detected {html.escape(row['explained'])} ({row['score']}, rank "
                 f"{row['rank']})" if row["explained"] else "<span class='bad'>missed</span>")
        energy = (f"<br>energy in box {row['energy_in_box']} · IoU {row['iou']}"
                  if row["energy_in_box"] else "")
        cards.append(f"<div class='card'>{image}<div class='name'>"
                     f"{html.escape(Path(row['image']).name)}</div>object "
                     f"{html.escape(row['label'] or '–')} · {found}{energy}</div>")
    cards.append("</div>")
    return "".join(cards)


def _box(text: str) -> Box | None:
    if not text:
        return None
    x0, y0, x1, y1 = (float(v) for v in text.split())
    return Box(x0, y0, x1, y1)


def thumbnail(row: ResultRow, out: Path) -> str | None:
    """A base64 PNG of the row's map over its image (the image alone for a miss), the
    object's box in magenta and the detected box in white; None when unreadable."""
    try:
        image = load_source(row["image"], 3, DEFAULT_LIMITS)
        height, width = image.shape[:2]
        picture = image
        if row.get("heatmap"):
            raw = read_heatmap(row["heatmap"], out)
            picture = overlay(image, heatmaps(raw[None].astype(np.float32), height, width)[0])
    except (OnnxcamError, OSError, ValueError) as exc:
        log.warning("no picture for %s: %s", row["image"], exc)
        return None
    scale = THUMBNAIL / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    small = np.array(Image.fromarray(picture).resize(size, resample))
    for key, colour in (("box", DETECTED), ("gt_box", OUTLINE)):
        box = _box(row.get(key, ""))
        if box is not None:
            scaled = Box(box.x0 * scale, box.y0 * scale, box.x1 * scale, box.y1 * scale)
            small[outline(scaled.region(size[1], size[0]))] = colour
    return base64.b64encode(png_bytes(small)).decode("ascii")
