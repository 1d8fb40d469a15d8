"""audit-diff matches rows by what they are, not by how their paths were written: real
audits of one manifest of relative paths, run from different working folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, write_manifest

from onnxcam.cli import main

NAMES = ("a.png", "b.png", "c.png", "d.png", "e.png")


def rows(prefix: str) -> list[list[str]]:
    return [[f"{prefix}{name}", LABELS[i % len(LABELS)], f"{i % 3} 0 {8 + i} 10"]
            for i, name in enumerate(NAMES)]


def audit(monkeypatch: pytest.MonkeyPatch, cwd: Path, manifest: str, out: Path,
          bundle: Path) -> Path:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(main, ["audit", manifest, "--model", str(bundle), "--out",
                                       str(out), "--device", "cpu", "--clusters-sample", "0"])
    assert result.exit_code == 0, result.output
    return out


def diff(*args: str | Path) -> tuple[int, str, dict]:
    result = CliRunner().invoke(main, ["audit-diff", *map(str, args)])
    out = Path(args[1]) if len(args) == 2 else Path(args[3])
    found = (out / "diff.json").exists() and json.loads((out / "diff.json").read_text())
    return result.exit_code, result.output, found or {}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """data/manifest.csv with paths relative to it (images/a.png), other/list.csv
    naming the same images from elsewhere (../data/images/a.png), other/swapped.csv
    with rows 0 and 1 swapped."""
    root = tmp_path_factory.mktemp("match").resolve()
    (root / "data" / "images").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "elsewhere").mkdir()
    for name in NAMES:
        shutil.copy(image_folder / name, root / "data" / "images" / name)
    write_manifest(root / "data" / "manifest.csv", rows("images/"))
    write_manifest(root / "other" / "list.csv", rows("../data/images/"))
    swapped = rows("../data/images/")
    swapped[0][0], swapped[1][0] = swapped[1][0], swapped[0][0]
    write_manifest(root / "other" / "swapped.csv", swapped)
    return root


def test_the_audit_records_its_source_and_working_folder(
        tree: Path, audit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = audit(monkeypatch, tree / "data", "manifest.csv", tree / "record", audit_bundle)
    manifest = tree / "data" / "manifest.csv"
    assert json.loads((out / "summary.json").read_text())["source"] == {
        "path": "manifest.csv", "resolved": str(manifest), "cwd": str(tree / "data"),
        "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    # results.csv keeps the paths as the audit saw them: relative to its working folder
    assert (out / "results.csv").read_text().splitlines()[1].startswith("images/a.png,")


def test_one_manifest_audited_from_two_working_folders_matches(
        tree: Path, audit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = audit(monkeypatch, tree / "data", "manifest.csv", tree / "inside", audit_bundle)
    above = audit(monkeypatch, tree, "data/manifest.csv", tree / "above", audit_bundle)
    beside = audit(monkeypatch, tree / "other", "list.csv", tree / "beside", audit_bundle)
    swapped = audit(monkeypatch, tree / "other", "swapped.csv", tree / "swapped",
                    audit_bundle)
    monkeypatch.chdir(tree / "elsewhere")  # the diff's own folder plays no part
    # the same manifest file: row for row
    code, output, data = diff(inside, above)
    assert code == 0, output
    assert data["matched_by"] == "manifest" and data["n"] == data["compared"] == 5
    assert data["similarity"] == [1.0] * 5 and data["flags"] == []
    assert {figures["verdict"] for figures in data["per_class"].values()} == {"steady"}
    # the old and new overlays of every row, their images found from the working folders
    page = (above / "diff.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 5 and "image unavailable" not in page
    # another manifest naming the same files: by resolved path
    code, output, data = diff(inside, beside)
    assert code == 0, output
    assert data["matched_by"] == "resolved path" and data["similarity"] == [1.0] * 5
    # the same files in another order do not correspond
    code, output, _ = diff(beside, swapped)
    assert code == 2
    assert f"row 0 is '{tree / 'data/images/a.png'}'" in output
    assert f"but '{tree / 'data/images/b.png'}'" in output


def test_audits_without_the_record_compare_paths_as_written(
        tree: Path, audit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = audit(monkeypatch, tree / "data", "manifest.csv", tree / "old_in", audit_bundle)
    above = audit(monkeypatch, tree, "data/manifest.csv", tree / "old_above", audit_bundle)
    for folder in (inside, above):
        summary = json.loads((folder / "summary.json").read_text())
        summary.pop("source")
        (folder / "summary.json").write_text(json.dumps(summary))
    code, output, _ = diff(inside, above)
    assert code == 2
    assert "row 0 is 'images/a.png'" in output and "but 'data/images/a.png'" in output
    code, output, data = diff(inside, inside, "--out", tree / "self")
    assert code == 0 and data["matched_by"] == "image path"
