"""Writing explanations to disk: heatmaps (.npy), overlays (.png) and JSON records.

Files are written under a temporary name and renamed, so a reader never sees a
half-written heatmap.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onnxcam.bundle import RESIZE_LETTERBOX, BundleInfo
from onnxcam.engine.detections import Detection, in_image
from onnxcam.engine.explainer import Explainer, Explanation
from onnxcam.engine.images import load_image, placement, resize
from onnxcam.engine.maps import COLORMAPS, flat, heatmaps, overlay, resize_maps
from onnxcam.engine.prefetch import prefetched
from onnxcam.engine.targets import ALL_POSITIVE, TOP
from onnxcam.errors import BadMethodError, OnnxcamError
from onnxcam.files import atomic_write

log = logging.getLogger(__name__)

FORMATS = ("npy", "png")
# The suffix of each file written per image (explain's folder and a job's store alike).
HEATMAP, OVERLAY, RAW = ".npy", ".png", ".raw.npy"


@dataclass
class ImageResult:
    """One image's outcome: its record for --json, or its error."""

    image: str
    record: dict[str, Any] = field(default_factory=dict)
    error: OnnxcamError | None = None
    flat: bool = False  # the map is constant up to rounding: it shows nothing


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def png_bytes(array: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit RGB or grey PNG, quickly: no row filters and a fast deflate.

    Pillow's encoder tries every row filter, which for an overlay costs as much
    as explaining the image; unfiltered rows at deflate level 1 take a tenth of
    that, and zlib lets other threads run meanwhile.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    height, width = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    rows = np.zeros((height, 1 + array[0].size), np.uint8)  # filter byte 0 (none) per row
    rows[:, 1:] = np.ascontiguousarray(array, np.uint8).reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
                     _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@dataclass(frozen=True)
class OverlayStyle:
    """How overlays are coloured: ``maps.overlay``'s alpha and colour map."""

    alpha: float = 0.5
    colormap: str = "jet"


def stored_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """[H, W] scaled down, aspect kept, so that the long side is at most ``max_side``."""
    scale = max_side / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def render(
    image: np.ndarray, raw: np.ndarray, formats: Sequence[str], with_raw: bool,
    heatmap_dtype: type = np.float32, style: OverlayStyle = OverlayStyle(),
    box: tuple[Box, str] | None = None, info: BundleInfo | None = None,
) -> dict[str, bytes]:
    """The files for one image, by suffix: heatmap at the image's own size, overlay, raw.
    ``box`` (in the image's pixels) and its caption are drawn on the overlay; ``info``
    (the bundle) places the map of a letterbox bundle on the image."""
    height, width = image.shape[:2]
    heatmap = heatmap_on_image(raw, height, width, info)
    files: dict[str, bytes] = {}
    if "npy" in formats:
        files[HEATMAP] = npy_bytes(heatmap.astype(heatmap_dtype))
    if "png" in formats:
        picture = overlay(image, heatmap, style.alpha, style.colormap)
        if box is not None:
            picture = boxed(picture, *box)
        if flat(raw[None])[0]:
            picture = captioned(picture, FLAT_CAPTION)
        files[OVERLAY] = png_bytes(picture)
    if with_raw:
        files[RAW] = npy_bytes(raw.astype(np.float32))
    return files


def heatmap_on_image(raw: np.ndarray, height: int, width: int,
                     info: BundleInfo | None = None) -> np.ndarray:
    """One raw map -> [height, width] in [0, 1] over an image of that size: for a
    letterbox bundle, the map at its input less the padding, resized to the image."""
    if info is None or info.resize != RESIZE_LETTERBOX:
        return heatmaps(raw[None], height, width)[0]
    where = placement(height, width, info)
    full = heatmaps(raw[None], info.height, info.width)[0]
    inner = full[where.top : where.top + max(1, round(height * where.scale_y)),
                 where.left : where.left + max(1, round(width * where.scale_x))]
    return np.clip(resize_maps(inner[None], height, width)[0], 0.0, 1.0)


FLAT_CAPTION = "flat map: shows nothing"


def captioned(picture: np.ndarray, text: str) -> np.ndarray:
    """``picture`` with ``text`` on a white band along its top edge."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    width = int(draw.textlength(text)) + 4
    draw.rectangle((0, 0, min(width, image.width), min(CAPTION_HEIGHT, image.height)),
                   fill="white")
    draw.text((2, 1), text, fill="black")
    return np.asarray(image)


def boxed(picture: np.ndarray, box: Box, text: str) -> np.ndarray:
    """``picture`` with ``box`` outlined and ``text`` on a white band at its top left
    (inside the box where the box touches the picture's top edge)."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (round(v) for v in box)
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=BOX_COLOUR, width=2)
    top = y0 - CAPTION_HEIGHT if y0 >= CAPTION_HEIGHT else y0
    draw.rectangle((x0, top, x0 + int(draw.textlength(text)) + 4, top + CAPTION_HEIGHT),
                   fill="white")
    draw.text((x0 + 2, top + 1), text, fill="black")
    return np.asarray(image)


BOX_COLOUR = (255, 255, 255)  # white reads on every colour map's colours
CAPTION_HEIGHT = 14  # the flat-map caption's band, in Pillow's small default font
STRIP_FONT_SIZE = 16  # the layer names: readable beside a 192-pixel panel
STRIP_TICK_FONT_SIZE = 13
STRIP_LABEL_HEIGHT = 24  # pixels above each panel for its layer name
STRIP_GAP = 4
STRIP_MIN_HEIGHT = 192  # panels are scaled up to this height at least...
STRIP_MAX_HEIGHT = 512  # ...and down to this height at most
STRIP_BAR_HEIGHT = 14  # the colour bar under the panels
STRIP_BAR_MARGIN = 16  # on each side of the bar, room for its end ticks' labels
STRIP_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def render_strip(image: np.ndarray, layer_maps: dict[str, np.ndarray],
                 style: OverlayStyle = OverlayStyle()) -> bytes:
    """One PNG: the image, then the overlay at each layer, left (early) to right (late),
    each labelled, above a colour bar of the colormap from 0 to 1. Panels are scaled to
    between STRIP_MIN_HEIGHT and STRIP_MAX_HEIGHT pixels high, so small inputs stay
    legible and large ones stay a sensible size.

    ``layer_maps`` holds one image's raw map per layer, in that order.
    """
    scale = min(max(1.0, STRIP_MIN_HEIGHT / image.shape[0]), STRIP_MAX_HEIGHT / image.shape[0])
    height, width = (max(1, round(side * scale)) for side in image.shape[:2])
    picture = resize(image, height, width)
    names = ["input", *layer_maps]
    panels = [picture if picture.shape[-1] == 3 else np.repeat(picture, 3, axis=-1)]
    panels += [overlay(picture, heatmaps(raw[None], height, width)[0], style.alpha,
                       style.colormap)
               for raw in layer_maps.values()]
    font = ImageFont.load_default(size=STRIP_FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = max([width, *(int(measure.textlength(name, font=font)) + 4 for name in names)])
    strip = Image.new("RGB", (len(panels) * (cell + STRIP_GAP) - STRIP_GAP,
                              STRIP_LABEL_HEIGHT + height + _bar_band_height()), "white")
    draw = ImageDraw.Draw(strip)
    for i, (name, panel) in enumerate(zip(names, panels)):
        left = i * (cell + STRIP_GAP)
        strip.paste(Image.fromarray(panel), (left + (cell - width) // 2, STRIP_LABEL_HEIGHT))
        draw.text((left + 2, 2), name, fill="black", font=font)
    _draw_colour_bar(strip, STRIP_LABEL_HEIGHT + height, style.colormap)
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()


def _bar_band_height() -> int:
    """The colour bar's band: a gap, the bar, its tick marks and their labels."""
    return STRIP_GAP * 2 + STRIP_BAR_HEIGHT + 4 + STRIP_TICK_FONT_SIZE + 6


def _draw_colour_bar(strip: Image.Image, top: int, colormap: str) -> None:
    """The colormap from 0 (left) to 1 (right) across the strip, under the panels, with
    tick labels: what a colour in the overlays means (the maps are normalised to [0, 1])."""
    left, right = STRIP_BAR_MARGIN, strip.width - STRIP_BAR_MARGIN
    values = np.linspace(0.0, 1.0, right - left)
    bar = np.repeat(COLORMAPS[colormap](values)[None], STRIP_BAR_HEIGHT, axis=0)
    top += STRIP_GAP * 2
    strip.paste(Image.fromarray(np.ascontiguousarray(bar)), (left, top))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=STRIP_TICK_FONT_SIZE)
    below = top + STRIP_BAR_HEIGHT
    for tick in STRIP_TICKS:
        x = left + round(tick * (right - left - 1))
        draw.line((x, below, x, below + 3), fill="black")
        draw.text((x, below + 4), f"{tick:g}", fill="black", font=font, anchor="mt")


def record(image: str, explanation: Explanation, index: int, files: list[str]) -> dict[str, Any]:
    """Row ``index``'s JSON record. A segmenter's logits, one per pixel, are left out
    (null); its ``scores`` are every class's share of the image's pixels."""
    logits = explanation.logits[index]
    line = {
        "image": image,
        "target": int(explanation.targets[index]),
        "target_name": explanation.target_names[index],
        "logits": [float(v) for v in logits] if logits.ndim == 1 else None,
        "top": explanation.top(5)[index],
        "flat": bool(explanation.flat[index]),
        "files": files,
    }
    if logits.ndim > 1:
        line["scores"] = [float(v) for v in explanation.scores_of(logits[None])[0]]
    return line


# What a target's name may keep in a file name; anything else becomes '_'.
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 100


def file_names(names: Sequence[str]) -> list[str]:
    """One image's target names as file-name parts: unsafe characters to '_', at most
    ``MAX_NAME`` characters, never '.'-led, and a repeat suffixed '-1', '-2', ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        safe = UNSAFE.sub("_", name)[:MAX_NAME].lstrip(".") or "_"
        count = seen.get(safe, 0)
        seen[safe] = count + 1
        out.append(safe if count == 0 else f"{safe}-{count}")
    return out


def detection_record(detection: Detection, explanation: Explanation, height: int,
                     width: int) -> dict[str, Any]:
    """A detection's keys in its row's record, its box in the image's own pixels."""
    box = in_image(detection.box, explanation.info, height, width)
    return {**detection.as_dict(), "box": [round(v, 2) for v in box]}


def one_class(target: Any) -> bool:
    """Whether ``target`` asks for one plain class per image (or None: the top-1), the
    request whose files keep their short names ``<stem>.npy``."""
    if target is None:
        return True
    if isinstance(target, str):
        return target != ALL_POSITIVE and not TOP.match(target)
    return isinstance(target, (int, np.integer))


def unique_stems(paths: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}-{count}")
    return stems


def explain_files(
    explainer: Explainer,
    paths: Sequence[str],
    out: Path,
    method: str = "gradcam",
    target: Any = None,
    formats: Sequence[str] = FORMATS,
    with_raw: bool = False,
    batch_size: int | None = None,
    layers_strip: bool = False,
    options: dict[str, Any] | None = None,
    progress: Callable[[float], None] | None = None,
    style: OverlayStyle = OverlayStyle(),
) -> Iterator[ImageResult]:
    """Explain image files in batches and write their outputs under ``out``.

    ``target`` is what every image is explained for: None (top-1), a target, or a list of
    targets (``Explainer.explain``); one result is yielded per image and target, its
    files ``<stem>.<suffix>`` for one class, else ``<stem>.<target name>.<suffix>``.
    A bad image yields its error and the rest carry on. Decoding of the next
    batch overlaps the current one. ``layers_strip`` also writes
    ``<stem>.layers.png``, the map at every exported layer; ``options`` are passed
    on to ``Explainer.explain`` (samples, noise, steps, seed); ``progress`` is told
    the images done, a bad one included.
    """
    cam = explainer.method(method)  # fail early on a bad method, before any decoding
    if layers_strip and not cam.per_layer():
        raise BadMethodError(f"{method} has no map per layer; --layers-strip needs a CAM "
                             "method or guided-gradcam")
    if layers_strip and explainer.info.levels:
        raise BadMethodError("this detector explains each detection at its own level's "
                             "layer only, so it has no map per layer; --layers-strip needs "
                             "a bundle exported with --layer")
    settings = Settings(method, target, formats, with_raw, layers_strip, options or {},
                        progress, style)
    stems = unique_stems(paths)
    size = batch_size or 8
    channels = explainer.info.channels

    def decode(chunk: Sequence[str]) -> list[np.ndarray | OnnxcamError]:
        decoded: list[np.ndarray | OnnxcamError] = []
        for path in chunk:
            try:
                decoded.append(load_image(path, channels, explainer.limits))
            except OnnxcamError as exc:
                decoded.append(exc)
        return decoded

    starts = range(0, len(paths), size)
    for start, decoded in prefetched(starts, lambda s: decode(paths[s : s + size])):
        yield from _explain_chunk(explainer, paths[start : start + size],
                                  stems[start : start + size], decoded, out, settings)


@dataclass(frozen=True)
class Settings:
    """What ``explain_files`` was asked for, passed down to each chunk."""

    method: str
    target: Any
    formats: Sequence[str]
    with_raw: bool
    layers_strip: bool
    options: dict[str, Any]
    progress: Callable[[float], None] | None = None
    style: OverlayStyle = OverlayStyle()


def _explain_chunk(
    explainer: Explainer, paths: Sequence[str], stems: Sequence[str],
    decoded: list[np.ndarray | OnnxcamError], out: Path, settings: Settings,
) -> Iterator[ImageResult]:
    good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
    explanation = None
    if good:
        arrays = [decoded[i] for i in good]
        # A list is every image's targets, not one entry per image as explain reads it.
        targets = ([list(settings.target)] * len(arrays) if isinstance(settings.target, list)
                   else settings.target)
        explanation = explainer.explain(arrays, targets=targets,
                                        method=settings.method, batch_size=len(arrays),
                                        progress=settings.progress, **settings.options)
    if settings.progress is not None and len(good) < len(paths):
        settings.progress(len(paths) - len(good))
    position_of = {index: position for position, index in enumerate(good)}
    short = one_class(settings.target)
    for i, path in enumerate(paths):
        item = decoded[i]
        if isinstance(item, OnnxcamError):
            yield ImageResult(path, error=item)
            continue
        assert explanation is not None
        rows = np.flatnonzero(explanation.image_index == position_of[i]).tolist()
        detector = explanation.info.detector
        if not rows:
            yield ImageResult(path, {"image": path, "detections" if detector else "targets": [],
                                     "files": []})
            continue
        names = ([f"{d.rank}.{d.label}" for d in (explanation.detections[r] for r in rows)]
                 if detector else [explanation.target_names[r] for r in rows])
        for row, part in zip(rows, file_names(names)):
            stem = stems[i] if short and not detector else f"{stems[i]}.{part}"
            yield _write_row(item, path, stem, explanation, row, out, settings)


def _write_row(image: np.ndarray, path: str, stem: str, explanation: Explanation, row: int,
               out: Path, settings: Settings) -> ImageResult:
    """Row ``row``'s files under ``out`` as ``<stem><suffix>``, and its result; a
    detection's box, scaled to the image's own size, is drawn on the overlay."""
    found = explanation.detections[row] if explanation.detections else None
    extra = {} if found is None else detection_record(found, explanation, *image.shape[:2])
    box = None if found is None else (extra["box"], f"{found.label} {found.score:.2f}")
    files = render(image, explanation.raw[row], settings.formats, settings.with_raw,
                   style=settings.style, box=box, info=explanation.info)
    if settings.layers_strip:
        files[".layers.png"] = render_strip(
            image, {name: maps[row] for name, maps in explanation.layer_maps.items()},
            settings.style)
    written = []
    for suffix, data in files.items():
        target_path = out / f"{stem}{suffix}"
        atomic_write(target_path, data)
        written.append(str(target_path))
    return ImageResult(path, {**record(path, explanation, row, written), **extra},
                       flat=bool(explanation.flat[row]))
