"""Manifests: CSV and folder sources, resolved paths, labels, and bad rows and files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import LABELS, write_manifest

from onnxcam.audit.backend import AuditRow
from onnxcam.audit.manifest import RowProblem, count_rows, read_manifest
from onnxcam.bundle import BundleInfo
from onnxcam.errors import ManifestError

INFO = BundleInfo(height=16, width=16, channels=3, preprocess="unit", layout="nchw",
                  activation_layout="nchw", target_layer="x", num_classes=5,
                  labels=list(LABELS), gradient="analytic")


def rows(source: Path) -> list[AuditRow | RowProblem]:
    return list(read_manifest(source, INFO))


def test_csv_rows_resolved_and_parsed(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [
        ["a.png", "dog", "1 2 10 12", ""],
        ["sub/b.png", "3", "", "masks/b.png"],
        ["s3://bucket/c.jpg", "", "0.5,1.5,4,5", ""],
        [str(tmp_path.parent / "abs.png"), "", "", ""],
    ], header=("image", "label", "bbox", "mask"))
    assert rows(manifest) == [
        AuditRow(0, str(tmp_path / "a.png"), 1, (1.0, 2.0, 10.0, 12.0), None),
        AuditRow(1, str(tmp_path / "sub/b.png"), 3, None, str(tmp_path / "masks/b.png")),
        AuditRow(2, "s3://bucket/c.jpg", None, (0.5, 1.5, 4.0, 5.0), None),
        AuditRow(3, str(tmp_path.parent / "abs.png"), None, None, None),
    ]
    assert count_rows(manifest) == 4


def test_only_the_image_column_is_needed_and_columns_may_come_in_any_order(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [["x.png"]], header=("Image",))
    assert rows(manifest) == [AuditRow(0, str(tmp_path / "x.png"))]
    manifest = write_manifest(tmp_path / "n.csv", [["2 2 4 4", "y.png", "owl"]],
                              header=("bbox", "image", "label"))
    assert rows(manifest) == [AuditRow(0, str(tmp_path / "y.png"), 3, (2.0, 2.0, 4.0, 4.0))]


@pytest.mark.parametrize(("label", "bbox", "message"), [
    ("zebra", "", r"label 'zebra' is not one of the bundle's labels \(cat, dog, fox, owl, yak\)"),
    ("7", "", r"label 7 is outside \[0, 5\)"),
    ("-1", "", r"label -1 is outside \[0, 5\)"),
    ("cat", "1 2 3", "bbox must be 'x0 y0 x1 y1'"),
    ("cat", "5 5 1 9", "bbox must be 'x0 y0 x1 y1' with x0 < x1"),
    ("cat", "a b c d", "bbox must be"),
    ("cat", "0 0 nan 4", "bbox must be"),
])
def test_bad_rows_are_problems_that_say_why(tmp_path: Path, label: str, bbox: str,
                                            message: str) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [["ok.png", "cat", ""],
                                                   ["bad.png", label, bbox]])
    good, bad = rows(manifest)
    assert isinstance(good, AuditRow)
    assert isinstance(bad, RowProblem)
    assert (bad.index, bad.image, bad.label) == (1, str(tmp_path / "bad.png"), label)
    assert bad.error.code == "bad_row"

    assert re.search(message, str(bad.error)), str(bad.error)


def test_an_empty_image_cell_is_a_bad_row(tmp_path: Path) -> None:
    (problem,) = rows(write_manifest(tmp_path / "m.csv", [["", "cat", ""]]))
    assert isinstance(problem, RowProblem)
    assert "image cell is empty" in str(problem.error)


@pytest.mark.parametrize("content", [b"name,label\nx.png,cat\n", b"", b"\x89PNG\r\n\xff\xfe\x00"])
def test_a_file_that_is_no_manifest_is_a_manifest_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError):
        count_rows(path)
        rows(path)  # a header without an image column gets past the count


def test_a_missing_source_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest or folder"):
        count_rows(tmp_path / "nothing.csv")


def test_folder_of_class_subfolders(tmp_path: Path) -> None:
    for label, names in {"dog": ["b.png", "a.JPG", "notes.txt"], "cat": ["z.png"],
                         "zebra": ["q.png"]}.items():
        (tmp_path / label).mkdir()
        for name in names:
            (tmp_path / label / name).write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    found = rows(tmp_path)
    assert found[:3] == [
        AuditRow(0, str(tmp_path / "cat" / "z.png"), 0),
        AuditRow(1, str(tmp_path / "dog" / "a.JPG"), 1),
        AuditRow(2, str(tmp_path / "dog" / "b.png"), 1),
    ]
    problem = found[3]
    assert isinstance(problem, RowProblem) and problem.label == "zebra"
    assert "not one of the bundle's labels" in str(problem.error)
    assert count_rows(tmp_path) == 4


def test_a_folder_lists_the_formats_images_are_read_in(tmp_path: Path) -> None:
    """The suffixes of the default format allow-list, written out by hand; Netpbm files
    (not read by default) are not listed to fail one by one."""
    names = ["a.png", "b.jpg", "c.jpeg", "d.jfif", "e.webp", "f.bmp", "g.gif", "h.tif",
             "i.TIFF", "j.ppm", "k.pgm", "l.ico", "m.eps", "n.dds"]
    (tmp_path / "cat").mkdir()
    for name in names:
        (tmp_path / "cat" / name).write_bytes(b"x")
    listed = [Path(row.image).name for row in rows(tmp_path)]
    assert listed == names[:9]


def test_a_folder_without_class_subfolders_is_a_manifest_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ManifestError, match="no class subfolders"):
        count_rows(tmp_path)
