"""Audit sources as data sets ship them: a COCO instances JSON, or a folder of Pascal
VOC XML files.

Each gives one row per (image, category present in it): the category's objects make
one region, their union; objects of other categories are left out of it. An image
with no object gives one row without label. A broken entry becomes that row's error
(``Annotated.problem``) and costs no other row.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcam.audit.regions import Box, Shape, coco_box, polygon, rle
from onnxcam.errors import BadRowError, ManifestError

log = logging.getLogger(__name__)


@dataclass
class Annotated:
    """One row of a data set: an image, a category name (empty: none), its shapes, or
    why the row cannot run."""

    image: str
    category: str = ""
    shapes: list[Shape] = field(default_factory=list)
    problem: str = ""

    def fail(self, message: str) -> None:
        self.problem = self.problem or message  # the first problem found is the one shown


def is_coco(source: Path) -> bool:
    return source.suffix.lower() == ".json"


def is_voc(source: Path) -> bool:
    return source.is_dir() and any(entry.name.lower().endswith(".xml") and entry.is_file()
                                   for entry in os.scandir(source))


# -- COCO --


def read_coco(source: Path) -> Iterator[Annotated]:
    """The rows of a COCO instances file: images in the file's order (an image's
    categories by name), then any annotation whose image has no entry."""
    data = _load_coco(source)
    categories = _coco_categories(data["categories"])
    entries = _coco_images(data["images"], source)
    # (image id, or None when broken; its row)
    images = [(image_id, Annotated(path, problem=problem))
              for image_id, path, problem in entries]
    paths = {image_id: path for image_id, path, _ in entries if image_id is not None}
    objects: dict[Any, dict[Any, Annotated]] = {}  # image id -> category id -> row
    orphans: dict[str, Annotated] = {}
    for annotation in data["annotations"]:
        try:
            _add_annotation(annotation, paths, categories, objects)
        except BadRowError as exc:  # no image to charge it to: a row of its own
            key = str(exc)
            orphans.setdefault(key, Annotated(f"annotation {_id_of(annotation)}",
                                              problem=key))
    for image_id, entry in images:
        found = objects.get(image_id) if image_id is not None else None
        yield from sorted(found.values(), key=lambda row: row.category) if found else [entry]
    yield from orphans.values()


def _coco_images(images: list[Any], source: Path) -> list[tuple[Any, str, str]]:
    """Each entry of a COCO file's ``images``, in order: (its id, its path, "") or,
    when it is broken, (None, where it is in the file, why)."""
    entries: list[tuple[Any, str, str]] = []
    paths: dict[Any, str] = {}
    for position, image in enumerate(images):
        try:
            image_id, path = _coco_image(image, position, source, paths)
        except BadRowError as exc:
            entries.append((None, f"images[{position}]", str(exc)))
            continue
        paths[image_id] = path
        entries.append((image_id, path, ""))
    return entries


def _load_coco(source: Path) -> dict[str, Any]:
    try:
        with open(source, encoding="utf-8") as stream:
            data = json.load(stream)
    except FileNotFoundError:
        raise ManifestError(f"{source}: no such COCO file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{source}: not a COCO instances JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
            isinstance(data.get(key), list) for key in ("images", "annotations", "categories")):
        raise ManifestError(f"{source}: not a COCO instances JSON (needs lists 'images', "
                            "'annotations' and 'categories')")
    return data


def _coco_categories(categories: list[Any]) -> dict[Any, str]:
    names = {}
    for category in categories:
        if isinstance(category, dict) and "id" in category and isinstance(
                category.get("name"), str):
            names[category["id"]] = category["name"]
        else:
            log.warning("skipping a COCO category without id or name: %.80r", category)
    return names


def _id_of(annotation: Any) -> Any:
    return annotation.get("id", "?") if isinstance(annotation, dict) else "?"


def _coco_image(image: Any, position: int, source: Path,
                seen: dict[Any, str]) -> tuple[Any, str]:
    """(id, resolved path) of an image entry."""
    if not isinstance(image, dict) or "id" not in image \
            or not isinstance(image.get("file_name"), str) or not image["file_name"]:
        raise BadRowError(f"images[{position}] needs an id and a file_name")
    if image["id"] in seen:
        raise BadRowError(f"images[{position}]: id {image['id']!r} is used twice")
    return image["id"], coco_image_path(image["file_name"], source)


def coco_image_path(name: str, source: Path) -> str:
    """``file_name`` next to the JSON, or else in COCO's own layout:
    ``annotations/instances_val2017.json`` with images in ``val2017/``."""
    if "://" in name or os.path.isabs(name):
        return name
    beside = source.parent / name
    split = source.stem.split("_", 1)[-1]
    sibling = source.parent.parent / split / name
    return str(sibling if not beside.exists() and sibling.exists() else beside)


def _add_annotation(annotation: Any, paths: dict[Any, str], categories: dict[Any, str],
                    objects: dict[Any, dict[Any, Annotated]]) -> None:
    """File one annotation under its (image, category) row; a broken one fails that
    row. Raises BadRowError when no image of the file is its own."""
    name = f"annotation {_id_of(annotation)}"
    if not isinstance(annotation, dict):
        raise BadRowError(f"an annotation is not an object: {annotation!r:.60}")
    image_id = annotation.get("image_id")
    if image_id not in paths:
        raise BadRowError(f"{name}: image_id {image_id!r} has no entry in 'images'")
    rows = objects.setdefault(image_id, {})
    category_id = annotation.get("category_id")
    if category_id not in categories:
        row = rows.setdefault(("unknown", repr(category_id)),
                              Annotated(paths[image_id], str(category_id)))
        row.fail(f"{name}: category_id {category_id!r} is not in 'categories'")
        return
    row = rows.setdefault(category_id, Annotated(paths[image_id], categories[category_id]))
    try:
        row.shapes.extend(coco_shapes(annotation))
    except BadRowError as exc:
        row.fail(f"{name}: {exc}")


def coco_shapes(annotation: dict[str, Any]) -> list[Shape]:
    """An object's mask (polygons or RLE) when it has one, else its box."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        return [rle(segmentation)]
    if isinstance(segmentation, list) and segmentation:
        return [polygon(points) for points in segmentation]
    if segmentation not in (None, []):
        raise BadRowError(f"segmentation must be polygons or an RLE, got {segmentation!r:.60}")
    if "bbox" not in annotation:
        raise BadRowError("neither segmentation nor bbox")
    return [coco_box(annotation["bbox"])]


# -- Pascal VOC --


def read_voc(source: Path) -> Iterator[Annotated]:
    """The rows of a folder of VOC XML files, in file name order."""
    files = sorted(entry.name for entry in os.scandir(source)
                   if entry.is_file() and entry.name.lower().endswith(".xml"))
    for name in files:
        yield from voc_rows(source / name)


def voc_image_path(name: str, xml: Path) -> str:
    """``filename`` in ``JPEGImages`` beside the XML's folder (VOC's layout) when that
    folder exists, else next to the XML file."""
    images = xml.parent.parent / "JPEGImages"
    return str((images if images.is_dir() else xml.parent) / name)


def voc_rows(xml: Path) -> list[Annotated]:
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as exc:
        return [Annotated(str(xml), problem=f"{xml.name}: not a VOC annotation ({exc})")]
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        return [Annotated(str(xml), problem=f"{xml.name}: no <filename>")]
    image = voc_image_path(filename, xml)
    rows: dict[str, Annotated] = {}
    for number, element in enumerate(root.iter("object"), start=1):
        category = (element.findtext("name") or "").strip()
        if not category:
            rows.setdefault("", Annotated(image)).fail(
                f"{xml.name}: object {number} has no <name>")
            continue
        row = rows.setdefault(category, Annotated(image, category))
        try:
            row.shapes.append(voc_box(element))
        except BadRowError as exc:
            row.fail(f"{xml.name}: object {number} ({category}): {exc}")
    return sorted(rows.values(), key=lambda row: row.category) or [Annotated(image)]


def voc_box(element: ET.Element) -> Box:
    """VOC's ``bndbox``: 1-based, inclusive pixel indices; pixels xmin..xmax are the
    half-open [xmin - 1, xmax) in onnxcam's coordinates."""
    box = element.find("bndbox")
    if box is None:
        raise BadRowError("no <bndbox>")
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = (box.findtext(tag) or "").strip()
        try:
            values.append(float(text))
        except ValueError:
            raise BadRowError(f"<{tag}> is {text or 'missing'!r}, not a number") from None
    xmin, ymin, xmax, ymax = values
    if xmax < xmin or ymax < ymin:
        raise BadRowError(f"bndbox {xmin:g} {ymin:g} {xmax:g} {ymax:g} has max < min")
    return Box(xmin - 1, ymin - 1, xmax, ymax)


# -- objects, for detection audits --


@dataclass
class Scene:
    """One image of a data set with each of its objects as (category name, box), for a
    detection audit; or why the image cannot run."""

    image: str
    objects: list[tuple[str, Box]] = field(default_factory=list)
    problem: str = ""


def read_scenes(source: Path) -> Iterator[Scene]:
    """A COCO file's or VOC folder's images, in the order ``read_coco`` and ``read_voc``
    give them, one scene each with its objects' boxes (COCO's ``bbox``, not its masks:
    detectors output boxes)."""
    return _coco_scenes(source) if is_coco(source) else _voc_scenes(source)


def _coco_scenes(source: Path) -> Iterator[Scene]:
    data = _load_coco(source)
    categories = _coco_categories(data["categories"])
    scenes = [(image_id, Scene(path, problem=problem))
              for image_id, path, problem in _coco_images(data["images"], source)]
    by_id = {image_id: scene for image_id, scene in scenes if image_id is not None}
    orphans: dict[str, Scene] = {}
    for annotation in data["annotations"]:
        name = f"annotation {_id_of(annotation)}"
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in by_id:
            message = f"{name}: image_id {image_id!r} has no entry in 'images'"
            orphans.setdefault(message, Scene(name, problem=message))
            continue
        scene = by_id[image_id]
        try:
            category = categories.get(annotation.get("category_id"))
            if category is None:
                raise BadRowError(f"category_id {annotation.get('category_id')!r} is not in "
                                  "'categories'")
            if "bbox" not in annotation:
                raise BadRowError("no bbox")
            scene.objects.append((category, coco_box(annotation["bbox"])))
        except BadRowError as exc:
            scene.problem = scene.problem or f"{name}: {exc}"
    yield from (scene for _, scene in scenes)
    yield from orphans.values()


def _voc_scenes(source: Path) -> Iterator[Scene]:
    for name in sorted(entry.name for entry in os.scandir(source)
                       if entry.is_file() and entry.name.lower().endswith(".xml")):
        xml = source / name
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            yield Scene(str(xml), problem=f"{xml.name}: not a VOC annotation ({exc})")
            continue
        filename = (root.findtext("filename") or "").strip()
        if not filename:
            yield Scene(str(xml), problem=f"{xml.name}: no <filename>")
            continue
        scene = Scene(voc_image_path(filename, xml))
        for number, element in enumerate(root.iter("object"), start=1):
            category = (element.findtext("name") or "").strip()
            try:
                if not category:
                    raise BadRowError("no <name>")
                scene.objects.append((category, voc_box(element)))
            except BadRowError as exc:
                scene.problem = scene.problem or f"{xml.name}: object {number}: {exc}"
        yield scene
