"""Audit sources, read lazily one row at a time: a CSV manifest, a folder of class
subfolders, a COCO instances JSON or a folder of Pascal VOC XML files (``datasets``).

A CSV manifest has an ``image`` column (path or URI; relative paths are relative to
the manifest's folder) and optional ``label`` (class index or name), ``bbox``
(``x0 y0 x1 y1`` in the image's pixels) and ``mask`` (path of a binary mask image).
A multi-label manifest has a ``labels`` column instead (the row's findings, ``A|B``)
whose ``bbox`` and ``mask`` cells list one entry per label, ``|``-separated, empty for
a label without one; a segmentation manifest has a ``segmentation`` column (a PNG of
class ids). Their rows get one map per finding.
A folder source has one subfolder per class, named by its label, holding images.
A data set's category names are the bundle's labels, or are mapped to them by a label
map (a JSON object, category name -> label); with a map, categories it does not name
are left out.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from onnxcam.audit.backend import AuditRow, GroundTruth, load_source, read_source
from onnxcam.audit.datasets import (
    Annotated,
    Scene,
    is_coco,
    is_voc,
    read_coco,
    read_scenes,
    read_voc,
)
from onnxcam.audit.metrics import box_region, mask_region
from onnxcam.audit.regions import union_region
from onnxcam.bundle import BundleInfo
from onnxcam.engine.images import DEFAULT_LIMITS, decode, file_suffixes
from onnxcam.errors import BadRowError, ManifestError, OnnxcamError

# A folder's images: the files of the formats the engine reads (PPM, PGM and the
# like are not among them by default, so they are not listed either).
IMAGE_SUFFIXES = file_suffixes(DEFAULT_LIMITS.formats)
COLUMNS = ("image", "label", "bbox", "mask", "labels", "segmentation")
# What a source's rows are: one label each, findings (labels) or a class-id mask each.
SINGLE, MULTI_LABEL, SEGMENTATION = "single", "multi-label", "segmentation"


@dataclass(frozen=True)
class RowProblem:
    """A manifest row the audit cannot run, with the values it had as written."""

    index: int
    image: str
    label: str
    error: BadRowError


Entry = AuditRow | RowProblem


class Labels:
    """Turns a manifest's label (a name, or an index as text) into a class index."""

    def __init__(self, info: BundleInfo) -> None:
        self.names = {name: i for i, name in enumerate(info.labels)}
        self.count = info.num_classes
        self.listing = ", ".join(info.labels) if info.labels else f"0..{self.count - 1}"

    def parse(self, text: str) -> int:
        if text in self.names:
            return self.names[text]
        try:
            index = int(text)
        except ValueError:
            raise BadRowError(f"label {text!r} is not one of the bundle's labels "
                              f"({self.listing})") from None
        if not 0 <= index < self.count:
            raise BadRowError(f"label {index} is outside [0, {self.count})")
        return index


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values) \
            or values[2] <= values[0] or values[3] <= values[1]:
        raise BadRowError(f"bbox must be 'x0 y0 x1 y1' with x0 < x1 and y0 < y1, got {text!r}")
    return values


def resolve(reference: str, folder: Path) -> str:
    """A URI as is; a relative path joined to ``folder``."""
    if "://" in reference or os.path.isabs(reference):
        return reference
    return os.path.normpath(folder / reference)


def source_record(source: Path) -> dict[str, str | None]:
    """Where an audit's rows came from: the source as given, its resolved path, the
    working folder that its relative paths (and so results.csv's) are relative to, and
    a file's SHA-256 (None for a folder). audit-diff matches two audits' rows by it."""
    digest = None
    if source.is_file():
        with open(source, "rb") as stream:
            digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return {"path": str(source), "resolved": os.path.realpath(source), "cwd": os.getcwd(),
            "sha256": digest}


LabelMap = dict[str, str]


def manifest_form(source: Path) -> str:
    """SINGLE, MULTI_LABEL or SEGMENTATION, by a CSV manifest's header; data sets and
    folders are SINGLE."""
    if is_coco(source) or is_voc(source) or source.is_dir():
        return SINGLE
    with _open_csv(source) as stream:
        try:
            header = {name.strip().lower() for name in next(csv.reader(stream), [])}
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ManifestError(f"{source}: not a CSV manifest ({exc})") from None
    if "labels" in header and ("label" in header or "segmentation" in header):
        raise ManifestError(f"{source}: a 'labels' column goes with neither 'label' nor "
                            "'segmentation'")
    if "segmentation" in header:
        if "label" in header:
            raise ManifestError(f"{source}: a segmentation manifest's labels are the "
                                "classes in its masks: no 'label' column")
        return SEGMENTATION
    return MULTI_LABEL if "labels" in header else SINGLE


def read_manifest(source: Path, info: BundleInfo,
                  label_map: LabelMap | None = None) -> Iterator[Entry]:
    """The rows of ``source`` in order; unusable rows come as ``RowProblem``s.
    ``label_map`` applies to COCO and VOC sources. A detection bundle's rows are the
    data set's images, each with its objects (``read_scene_rows``)."""
    if info.detector:
        return read_scene_rows(source, info, label_map)
    if is_coco(source) or is_voc(source):
        return _read_dataset(_dataset_rows(source, label_map), Labels(info))
    if source.is_dir():
        return _read_folder(source, Labels(info))
    return _read_csv(source, Labels(info))


def count_rows(source: Path, label_map: LabelMap | None = None) -> int:
    """How many rows ``read_manifest`` will give, by a cheap pass that parses nothing
    (a data set is parsed: its rows are its images' categories)."""
    if is_coco(source) or is_voc(source):
        return sum(1 for _ in _dataset_rows(source, label_map))
    if source.is_dir():
        return sum(1 for _ in _folder_images(source))
    with _open_csv(source) as stream:
        try:
            return max(0, sum(1 for _ in csv.reader(stream)) - 1)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ManifestError(f"{source}: not a CSV manifest ({exc})") from None


# -- CSV manifests --


def _open_csv(source: Path) -> TextIO:
    try:
        return open(source, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{source}: no such manifest or folder") from None
    except OSError as exc:
        raise ManifestError(f"{source}: cannot read ({exc.strerror or exc})") from exc


def _read_csv(source: Path, labels: Labels) -> Iterator[Entry]:
    folder = source.parent
    with _open_csv(source) as stream:
        reader = csv.reader(stream)
        try:
            header = [name.strip().lower() for name in next(reader, [])]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ManifestError(f"{source}: not a CSV manifest ({exc})") from None
        if "image" not in header:
            raise ManifestError(f"{source}: not a manifest: no 'image' column in the header "
                                f"(columns: {', '.join(COLUMNS)})")
        where = {name: header.index(name) for name in COLUMNS if name in header}
        index = 0
        while True:
            try:
                cells = next(reader, None)
            except (UnicodeDecodeError, csv.Error) as exc:
                raise ManifestError(f"{source}: unreadable after row {index} ({exc})") from None
            if cells is None:
                return
            yield _csv_row(index, cells, where, folder, labels)
            index += 1


def _csv_row(index: int, cells: list[str], where: dict[str, int], folder: Path,
             labels: Labels) -> Entry:
    def cell(name: str) -> str:
        position = where.get(name)
        return cells[position].strip() if position is not None and position < len(cells) else ""

    image, label, bbox, mask, many, segmentation = (cell(name) for name in COLUMNS)
    try:
        if not image:
            raise BadRowError("the image cell is empty")
        path = resolve(image, folder)
        if "labels" in where:
            return AuditRow(index, path, multi=True, findings=_labelled_findings(
                index, path, many, bbox, mask, folder, labels))
        if "segmentation" in where:
            return AuditRow(index, path, multi=True, findings=_mask_findings(
                index, path, resolve(segmentation, folder) if segmentation else "", labels))
        return AuditRow(
            index=index,
            image=resolve(image, folder),
            label=labels.parse(label) if label else None,
            bbox=parse_bbox(bbox) if bbox else None,
            mask=resolve(mask, folder) if mask else None,
        )
    except BadRowError as exc:
        return RowProblem(index, resolve(image, folder) if image else "", label or many, exc)


def _per_label(text: str, count: int, what: str) -> list[str]:
    """A multi-label row's ``bbox`` or ``mask`` cell: one entry per label."""
    if not text:
        return [""] * count
    parts = [part.strip() for part in text.split("|")]
    if len(parts) != count:
        raise BadRowError(f"{what} lists {len(parts)} entries for {count} label(s); give one "
                          "per label, '|'-separated, empty for a label without one")
    return parts


def _labelled_findings(index: int, image: str, text: str, bbox: str, mask: str,
                       folder: Path, labels: Labels) -> tuple[AuditRow, ...]:
    names = [name.strip() for name in text.split("|")] if text else []
    classes = [labels.parse(name) for name in names]
    if len(set(classes)) < len(classes):
        raise BadRowError(f"labels {text!r} name a class twice")
    boxes, masks = _per_label(bbox, len(names), "bbox"), _per_label(mask, len(names), "mask")
    return tuple(AuditRow(index, image, cls, parse_bbox(box) if box else None,
                          resolve(each, folder) if each else None)
                 for cls, box, each in zip(classes, boxes, masks))


def _mask_findings(index: int, image: str, mask: str,
                   labels: Labels) -> tuple[AuditRow, ...]:
    """One finding per class id in the mask that is a class of the bundle (others, such
    as 255 for "void", are not classes and are left out)."""
    if not mask:
        return ()
    present = np.unique(read_class_ids(mask))
    return tuple(AuditRow(index, image, int(cls), mask=mask, mask_class=int(cls))
                 for cls in present if 0 <= cls < labels.count)


def read_class_ids(reference: str) -> np.ndarray:
    """A segmentation mask: a single-channel image (greyscale, or palette: its indices)
    holding a class id per pixel, as int64 [H, W]."""
    try:
        image = decode(read_source(reference, DEFAULT_LIMITS), DEFAULT_LIMITS, reference)
    except OnnxcamError as exc:
        raise BadRowError(f"segmentation mask: {exc}") from None
    if image.mode not in CLASS_ID_MODES:
        raise BadRowError(f"{reference}: a segmentation mask holds one class id per pixel "
                          f"(a greyscale or palette image), not {image.mode}")
    return np.asarray(image).astype(np.int64)


CLASS_ID_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


# -- folders of class subfolders --


def _folder_images(source: Path) -> Iterator[tuple[str, str]]:
    """(class folder name, image path) in sorted order, one class folder listed at a time."""
    classes = sorted(entry.name for entry in os.scandir(source)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ManifestError(f"{source}: no class subfolders (expected one folder per label)")
    for name in classes:
        files = sorted(entry.name for entry in os.scandir(source / name)
                       if entry.is_file() and not entry.name.startswith(".")
                       and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            yield name, str(source / name / file)


def _read_folder(source: Path, labels: Labels) -> Iterator[Entry]:
    for index, (name, image) in enumerate(_folder_images(source)):
        try:
            yield AuditRow(index=index, image=image, label=labels.parse(name))
        except BadRowError as exc:
            yield RowProblem(index, image, name, exc)


# -- COCO and VOC --


def read_label_map(path: Path) -> LabelMap:
    """A label map file: a JSON object from data set category names to bundle labels."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a label map ({exc})") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in mapping.items()):
        raise ManifestError(f"{path}: a label map is a JSON object of category name -> "
                            "bundle label, both strings")
    return mapping


def _dataset_rows(source: Path, label_map: LabelMap | None) -> Iterator[Annotated]:
    rows = read_coco(source) if is_coco(source) else read_voc(source)
    for row in rows:
        if label_map is not None and row.category:
            if row.category not in label_map:
                continue  # a category the map leaves out is not audited, broken or not
            row.category = label_map[row.category]
        yield row


def _read_dataset(rows: Iterator[Annotated], labels: Labels) -> Iterator[Entry]:
    for index, row in enumerate(rows):
        try:
            if row.problem:
                raise BadRowError(row.problem)
            yield AuditRow(index=index, image=row.image,
                           label=labels.parse(row.category) if row.category else None,
                           shapes=tuple(row.shapes))
        except BadRowError as exc:
            yield RowProblem(index, row.image, row.category, exc)


def region_of(row: AuditRow, height: int, width: int) -> np.ndarray:
    """The row's data set shapes, or its mask, or its box, as bool [height, width]."""
    if row.shapes:
        return union_region(row.shapes, height, width)
    if row.mask is not None and row.mask_class is not None:
        return mask_region(read_class_ids(row.mask) == row.mask_class, height, width)
    if row.mask is not None:
        return mask_region(load_source(row.mask, 1, DEFAULT_LIMITS)[..., 0], height, width)
    assert row.bbox is not None
    return box_region(row.bbox, height, width)


# -- detection audits: a data set's images with their objects --


def _scenes(source: Path) -> Iterator[Scene]:
    if not (is_coco(source) or is_voc(source)):
        raise ManifestError(f"{source}: a detection audit reads a COCO instances JSON or a "
                            "folder of Pascal VOC XML files")
    return read_scenes(source)


def check_categories(source: Path, info: BundleInfo, label_map: LabelMap | None) -> int:
    """How many images ``source`` holds; ManifestError when a category of its objects is
    not a bundle label (after ``label_map``): a detector's classes are matched by name,
    and a data set of other names would count every object as missed."""
    labels = set(info.labels)
    unknown: set[str] = set()
    count = 0
    for scene in _scenes(source):
        count += 1
        for category, _ in scene.objects:
            name = category if label_map is None else label_map.get(category)
            if name is not None and name not in labels:
                unknown.add(name)
    if unknown:
        raise ManifestError(
            f"{source}: the categories {', '.join(sorted(unknown))} are not among the "
            f"bundle's labels ({', '.join(info.labels)}); map them with --label-map "
            "(a JSON object, category name -> bundle label)")
    return count


def read_scene_rows(source: Path, info: BundleInfo,
                    label_map: LabelMap | None = None) -> Iterator[Entry]:
    """One detection row per image of a COCO file or VOC folder, its objects' classes
    by name (``label_map`` renames them; objects of categories it leaves out are
    dropped). A broken entry makes its image's row a ``RowProblem``."""
    labels = Labels(info)
    for index, scene in enumerate(_scenes(source)):
        try:
            if scene.problem:
                raise BadRowError(scene.problem)
            objects = []
            for category, box in scene.objects:
                name = category if label_map is None else label_map.get(category)
                if name is not None:
                    objects.append(GroundTruth(labels.parse(name),
                                               (box.x0, box.y0, box.x1, box.y1)))
            yield AuditRow(index, scene.image, multi=True, objects=tuple(objects))
        except BadRowError as exc:
            yield RowProblem(index, scene.image, "", exc)
