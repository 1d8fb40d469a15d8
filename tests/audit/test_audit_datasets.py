"""COCO instances JSON and Pascal VOC XML folders as audit sources: masks decoded from
RLE and polygons against pixel sets worked out by hand, broken entries as row errors
that cost no other row, and a whole audit over each."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxcam.audit import AuditOptions, LocalBackend, run_audit
from onnxcam.audit.manifest import count_rows, read_label_map, read_manifest
from onnxcam.audit.regions import Box, Polygon, rle, rle_counts_from_string, union_region
from onnxcam.engine.explainer import Explainer
from onnxcam.errors import BadRowError, ManifestError


def pixels(region: np.ndarray) -> set[tuple[int, int]]:
    """(row, column) of each pixel in ``region``."""
    return {(int(y), int(x)) for y, x in zip(*np.nonzero(region), strict=True)}


# -- masks, by hand --
# Compressed counts were encoded by hand with pycocotools' rleToString rule: 5-bit
# groups from '0', 0x20 = more follows, 0x10 in the last group = negative, counts from
# the fourth on stored as the difference to the count two before.


def test_compressed_counts_decode_as_worked_by_hand() -> None:
    # 3 '3', 2 '2', 4 '4', 1 stored as 1 - 2 = -1: group 31 'O', 6 stored as 6 - 4 = 2 '2'
    assert rle_counts_from_string("324O2") == (3, 2, 4, 1, 6)
    # 40 = 8 + 1 * 32: 'X' (8 | 0x20) then '1'; 21 has bit 0x10 set, so it takes a
    # second, empty group: 'e' (21 | 0x20) then '0'
    assert rle_counts_from_string("X13e0") == (40, 3, 21)


def test_rle_masks_are_column_major_runs_starting_with_zeros() -> None:
    # 4x4, runs 3 zeros, 2 ones, 4 zeros, 1 one, 6 zeros: column-major positions 3, 4
    # and 9 are (row 3, col 0), (row 0, col 1) and (row 1, col 2)
    compressed = rle({"counts": "324O2", "size": [4, 4]})
    assert pixels(compressed.region(4, 4)) == {(3, 0), (0, 1), (1, 2)}
    # 8x8: positions 40..42 are column 5, rows 0..2
    assert pixels(rle({"counts": "X13e0", "size": [8, 8]}).region(8, 8)) == \
        {(0, 5), (1, 5), (2, 5)}
    # uncompressed: positions 2, 3, 4
    assert pixels(rle({"counts": [2, 3, 11], "size": [4, 4]}).region(4, 4)) == \
        {(2, 0), (3, 0), (0, 1)}
    # annotated at 4x4, image 8x8: each pixel becomes a 2x2 block (nearest)
    assert pixels(compressed.region(8, 8)) == {
        (2 * y + dy, 2 * x + dx) for y, x in {(3, 0), (0, 1), (1, 2)}
        for dy in (0, 1) for dx in (0, 1)}


@pytest.mark.parametrize(("segmentation", "message"), [
    ({"counts": [2, 3, 10], "size": [4, 4]}, "cover 15 pixels, not 4x4 = 16"),
    ({"counts": [2, -3, 17], "size": [4, 4]}, "negative run"),
    ({"counts": "32~", "size": [4, 4]}, "holds '~'"),
    ({"counts": "3X", "size": [4, 4]}, "ends inside a number"),
    ({"counts": [1.5, 14.5], "size": [4, 4]}, "a string or a list of ints"),
    ({"counts": [16]}, "size must be"),
])
def test_bad_rle_is_a_row_error(segmentation: dict, message: str) -> None:
    with pytest.raises(BadRowError, match=message):
        rle(segmentation)


def test_polygons_hold_the_pixels_whose_centre_is_inside() -> None:
    # triangle (0,0) (4,0) (0,4): centre (x+.5, y+.5) inside when x + y + 1 < 4
    triangle = Polygon((0, 0, 4, 0, 0, 4))
    assert pixels(triangle.region(5, 5)) == {(y, x) for y in range(5) for x in range(5)
                                             if x + y <= 2}
    square = Polygon((1, 1, 3, 1, 3, 3, 1, 3))
    assert pixels(square.region(5, 5)) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    # a U shape (concave): the notch x in [2, 3), y in [0, 2) stays out
    u_shape = Polygon((0, 0, 2, 0, 2, 2, 3, 2, 3, 0, 5, 0, 5, 4, 0, 4))
    expected = {(y, x) for y in range(4) for x in range(5)} - {(0, 2), (1, 2)}
    assert pixels(u_shape.region(4, 5)) == expected


def test_several_objects_make_one_region_their_union() -> None:
    region = union_region([Box(0, 0, 2, 2), Polygon((1, 1, 3, 1, 3, 3, 1, 3))], 4, 4)
    assert pixels(region) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    with pytest.raises(BadRowError, match="cover no pixel"):
        union_region([Box(10, 10, 12, 12)], 4, 4)


# -- COCO files --

SIZE = 16


def image(folder: Path, name: str) -> str:
    Image.fromarray(np.random.default_rng(len(name)).integers(
        0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
    return name


def coco(folder: Path) -> Path:
    """a.png: two cats (a box and a square polygon: 16 + 16 - 4 = 28 pixels) and a dog
    with a bad bbox; b.png: a cat with bad RLE counts; images[2] broken; c.png: a cat
    by compressed RLE (10 pixels) and an object of an unknown category; an annotation
    of a missing image; d.png with no object."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        image(folder, name)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE},
                   {"id": 2, "file_name": "b.png"}, {"id": 7},
                   {"id": 3, "file_name": "c.png"}, {"id": 4, "file_name": "d.png"}],
        "categories": [{"id": 10, "name": "cat"}, {"id": 20, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 10, "bbox": [0, 0, 4, 4]},
            {"id": 2, "image_id": 1, "category_id": 10, "bbox": [2, 2, 4, 4],
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
            {"id": 3, "image_id": 1, "category_id": 20, "bbox": [5, 5, -1, 3]},
            {"id": 4, "image_id": 2, "category_id": 10, "segmentation":
             {"counts": [5, 5], "size": [SIZE, SIZE]}, "iscrowd": 1},
            {"id": 5, "image_id": 99, "category_id": 10, "bbox": [0, 0, 2, 2]},
            # 40 zeros, 10 ones, 206 zeros: 206 = 14 + 6 * 32, '^' (14 | 0x20) then '6'
            {"id": 6, "image_id": 3, "category_id": 10, "segmentation":
             {"counts": "X1:^6", "size": [SIZE, SIZE]}},
            {"id": 8, "image_id": 3, "category_id": 42, "bbox": [0, 0, 1, 1]},
        ],
    }
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


EXPECTED_COCO = [  # (image, label, error or the region's area share, as results.csv has it)
    ("a.png", "cat", "0.1094"),  # 28 / 256
    ("a.png", "dog", "annotation 3: bbox must be [x, y, width, height] with width and "
                     "height > 0, got [5, 5, -1, 3]"),
    ("b.png", "cat", "annotation 4: RLE counts cover 10 pixels, not 16x16 = 256"),
    ("images[2]", "", "images[2] needs an id and a file_name"),
    ("c.png", "42", "annotation 8: category_id 42 is not in 'categories'"),
    ("c.png", "cat", "0.0391"),  # 10 / 256
    ("d.png", "", None),
    ("annotation 5", "", "annotation 5: image_id 99 has no entry in 'images'"),
]


def test_coco_rows_and_their_errors(tmp_path: Path, audit_explainer: Explainer) -> None:
    source = coco(tmp_path)
    entries = list(read_manifest(source, audit_explainer.info))
    assert count_rows(source) == len(entries) == len(EXPECTED_COCO)
    c_cat = entries[5]
    region = union_region(c_cat.shapes, SIZE, SIZE)
    assert pixels(region) == {(y, 2) for y in range(8, 16)} | {(0, 3), (1, 3)}


def audit_rows(source: Path, out: Path, explainer: Explainer,
               **options: object) -> list[dict[str, str]]:
    run_audit(source, out, LocalBackend(explainer), AuditOptions(**options))  # type: ignore[arg-type]
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_a_coco_audit_loses_no_row_to_a_broken_entry(tmp_path: Path,
                                                     audit_explainer: Explainer) -> None:
    rows = audit_rows(coco(tmp_path), tmp_path / "out", audit_explainer)
    assert len(rows) == len(EXPECTED_COCO)
    for row, (name, label, expected) in zip(rows, EXPECTED_COCO, strict=True):
        assert Path(row["image"]).name == name
        assert row["label"] == label
        if expected is None:
            assert (row["status"], row["energy_in_box"]) == ("ok", "")
        elif expected[0].isdigit():
            assert (row["status"], row["box_area"]) == ("ok", expected)
        else:
            assert row["status"] == "error" and row["error"].startswith(f"bad_row: {expected}")


def test_bad_json_is_a_manifest_error(tmp_path: Path, audit_explainer: Explainer) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ManifestError, match="not a COCO instances JSON"):
        count_rows(broken)
    broken.write_text('{"images": []}')
    with pytest.raises(ManifestError, match="needs lists"):
        list(read_manifest(broken, audit_explainer.info))


def test_a_label_map_renames_and_leaves_out_categories(tmp_path: Path,
                                                       audit_explainer: Explainer) -> None:
    source = coco(tmp_path)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"cat": "owl"}))  # dog left out
    label_map = read_label_map(mapping)
    entries = list(read_manifest(source, audit_explainer.info, label_map))
    # dog's and category 42's rows (both broken) are left out with their categories
    assert count_rows(source, label_map) == len(entries) == len(EXPECTED_COCO) - 2
    assert [(Path(e.image).name, getattr(e, "label", None)) for e in entries][:2] == [
        ("a.png", 3), ("b.png", "owl")]  # owl is class 3; b.png's row is its RLE error
    mapping.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="JSON object"):
        read_label_map(mapping)


# -- VOC folders --

VOC_OBJECT = ("<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin>"
              "<xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>")


def voc(folder: Path) -> Path:
    """VOC's layout: Annotations/*.xml, JPEGImages/*.png."""
    annotations, images = folder / "Annotations", folder / "JPEGImages"
    annotations.mkdir()
    images.mkdir()

    def write(name: str, body: str) -> None:
        (annotations / name).write_text(f"<annotation>{body}</annotation>")

    for name in ("a.png", "b.png", "c.png"):
        image(images, name)
    # two dogs, 1-based inclusive: columns 1..4 rows 1..2 (8 pixels) and columns 3..6
    # rows 2..3 (8), overlapping in columns 3..4 row 2 (2): 14 pixels; a cat ignored
    write("a.xml", "<filename>a.png</filename>"
          + VOC_OBJECT.format(1, 1, 4, 2, name="dog") + VOC_OBJECT.format(3, 2, 6, 3, name="dog")
          + VOC_OBJECT.format(1, 1, 16, 16, name="cat"))
    write("b.xml", "<filename>b.png</filename>"
          + "<object><name>fox</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax>"
            "</bndbox></object>" + "<object><bndbox/></object>")
    write("c.xml", "<filename>c.png</filename>" + VOC_OBJECT.format(2, 2, 5, 5, name="yak"))
    write("d.xml", "<object><name>cat</name></object>")
    (annotations / "e.xml").write_text("<annotation><filename>a.png</filename>")
    return annotations


EXPECTED_VOC = [
    ("a.png", "cat", "1.0000"),
    ("a.png", "dog", "0.0547"),  # 14 / 256
    ("b.png", "", "b.xml: object 2 has no <name>"),
    ("b.png", "fox", "b.xml: object 1 (fox): <ymax> is 'missing', not a number"),
    ("c.png", "yak", "0.0625"),  # 4 x 4 / 256
    ("d.xml", "", "d.xml: no <filename>"),
    ("e.xml", "", "e.xml: not a VOC annotation (no element found: line 1"),
]


def test_a_voc_audit_loses_no_row_to_a_broken_file(tmp_path: Path,
                                                   audit_explainer: Explainer) -> None:
    source = voc(tmp_path)
    entries = list(read_manifest(source, audit_explainer.info))
    assert count_rows(source) == len(entries) == len(EXPECTED_VOC)
    dogs = union_region(entries[1].shapes, SIZE, SIZE)
    assert pixels(dogs) == {(0, x) for x in range(4)} | {(1, x) for x in range(6)} | \
        {(2, x) for x in range(2, 6)}
    rows = audit_rows(source, tmp_path / "out", audit_explainer)
    for row, (name, label, expected) in zip(rows, EXPECTED_VOC, strict=True):
        assert (Path(row["image"]).name, row["label"]) == (name, label)
        if expected[0].isdigit():
            assert (row["status"], row["box_area"]) == ("ok", expected)
        else:
            assert row["status"] == "error" and row["error"].startswith(f"bad_row: {expected}")


def test_the_cli_audits_a_voc_folder_with_a_label_map(tmp_path: Path, audit_bundle: Path) -> None:
    from click.testing import CliRunner

    from onnxcam.cli import main

    source = voc(tmp_path)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"dog": "fox", "yak": "yak"}))  # cat and fox left out
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["audit", str(source), "--model", str(audit_bundle),
                                       "--out", str(out), "--label-map", str(mapping)])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as stream:
        rows = [(Path(row["image"]).name, row["label"], row["status"], row["box_area"])
                for row in csv.DictReader(stream)]
    assert rows == [("a.png", "fox", "ok", "0.0547"), ("b.png", "", "error", ""),
                    ("c.png", "yak", "ok", "0.0625"), ("d.xml", "", "error", ""),
                    ("e.xml", "", "error", "")]
