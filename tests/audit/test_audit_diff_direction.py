"""audit-diff says which way each class moved and fails only on regressions: two audit
folders written by hand with per-class means worked out here, and diff.html rendered
in headless Chromium."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from checks import chromium, screenshot
from click.testing import CliRunner
from PIL import Image

from onnxcam.audit.diff import DiffThresholds, diff_audits
from onnxcam.audit.results import COLUMNS
from onnxcam.cli import main

# Each row's old map, and its new map the same values in reverse order: Spearman -1,
# the attention moved completely.
MAP = np.arange(16, dtype=np.float16).reshape(4, 4)

# (label, correct old/new, energy in box old/new, pointing hit old/new)
# car: energy 0.77 / 7 = 0.11 -> 4.97 / 7 = 0.71; accuracy 4/7 = 0.5714 -> 1; hits 0 -> 1
CAR = [("car", (c_old, "1"), (e_old, e_new), ("0", "1")) for c_old, e_old, e_new in zip(
    "1101010", (0.05, 0.10, 0.15, 0.20, 0.10, 0.08, 0.09),
    (0.70, 0.80, 0.60, 0.75, 0.65, 0.72, 0.75), strict=True)]
# bus: energy 2.8 / 4 = 0.70 -> 0.8 / 4 = 0.20; accuracy 1 -> 3/4; hits 1 -> 0
BUS = [("bus", ("1", c_new), (e_old, e_new), ("1", "0")) for c_new, e_old, e_new in zip(
    "1110", (0.6, 0.8, 0.7, 0.7), (0.1, 0.3, 0.2, 0.2), strict=True)]


def write_audit(folder: Path, side: int, rows: list, images: Path,
                moved: bool = True) -> Path:
    (folder / "heatmaps").mkdir(parents=True)
    images.mkdir(exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for index, (label, correct, energy, hit) in enumerate(rows):
            image = images / f"{index}.png"
            Image.new("RGB", (16, 16), (20 * index, 90, 200)).save(image)
            raw = MAP + index
            np.save(folder / "heatmaps" / f"{index}.npy",
                    raw[::-1, ::-1].copy() if side and moved else raw)
            wrong = "bus" if label == "car" else "car"
            writer.writerow({
                "image": str(image), "label": label,
                "pred": label if correct[side] == "1" else wrong, "score": "0.9",
                "correct": correct[side], "energy_in_box": str(energy[side]),
                "pointing_hit": hit[side], "heatmap": f"heatmaps/{index}.npy",
                "status": "ok", "explained": label, "box_area": "0.25"})
    return folder


def audits(tmp_path: Path, rows: list, moved: bool = True) -> tuple[Path, Path]:
    return (write_audit(tmp_path / "old", 0, rows, tmp_path / "images", moved),
            write_audit(tmp_path / "new", 1, rows, tmp_path / "images", moved))


def test_an_improvement_passes_the_gate_and_says_improved(tmp_path: Path) -> None:
    old, new = audits(tmp_path, CAR)
    result = CliRunner().invoke(main, ["audit-diff", str(old), str(new)])
    assert result.exit_code == 0, result.output
    assert "flag:" not in result.stdout
    assert "improved: car: energy in box up 0.110 -> 0.710 (+0.600), accuracy up " \
        "0.571 -> 1.000 (+0.429), pointing hits up 0.000 -> 1.000 (+1.000), map " \
        "similarity -1.000 (attention moved)" in result.stdout
    data = json.loads((new / "diff.json").read_text())
    car = data["per_class"]["car"]
    assert car["energy_in_box_mean"] == {"old": 0.11, "new": 0.71, "change": 0.6,
                                         "direction": "up"}
    assert car["accuracy"] == {"old": 0.5714, "new": 1.0, "change": 0.4286,
                               "direction": "up"}
    assert (car["similarity_mean"], car["attention"], car["verdict"]) == \
        (-1.0, "moved", "improved")
    assert data["flags"] == []
    assert data["improvements"] == [{"class": "car", "reason": "improved",
                                      "energy_in_box_change": 0.6, "accuracy_change": 0.4286,
                                      "similarity_mean": -1.0}]


def test_a_regression_exits_3_naming_the_class_and_the_direction(tmp_path: Path) -> None:
    old, new = audits(tmp_path, CAR + BUS)
    result = CliRunner().invoke(main, ["audit-diff", str(old), str(new)])
    assert result.exit_code == 3, result.output
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("flag:")] == [
        "flag: bus: attention moved (-1.000, threshold 0.500)",
        "flag: bus: energy in box dropped (-0.500, threshold 0.100)",
        "flag: bus: accuracy dropped (-0.250, threshold 0.000)"]
    assert "regressed: bus: energy in box down 0.700 -> 0.200 (-0.500), accuracy down " \
        "1.000 -> 0.750 (-0.250), pointing hits down 1.000 -> 0.000 (-1.000), map " \
        "similarity -1.000 (attention moved)" in lines
    assert any(line.startswith("improved: car: energy in box up") for line in lines)
    data = json.loads((new / "diff.json").read_text())
    assert data["flags"][0] == {"class": "bus", "reason": "attention moved",
                                "similarity_mean": -1.0, "threshold": 0.5,
                                "energy_in_box_change": -0.5}
    assert [found["class"] for found in data["improvements"]] == ["car"]


def test_a_small_rise_with_moved_attention_is_no_regression(tmp_path: Path) -> None:
    # bus's energy up by 0.05 (within --max-energy-drop), accuracy the same, maps reversed
    rows = [("bus", ("1", "1"), (0.6, 0.65), ("1", "1"))] * 2
    data = diff_audits(*audits(tmp_path, rows)).data
    bus = data["per_class"]["bus"]
    assert (bus["energy_in_box_mean"]["direction"], bus["accuracy"]["direction"]) == \
        ("up", "same")
    assert (bus["attention"], bus["verdict"]) == ("moved", "moved")
    assert data["flags"] == [] and data["improvements"] == []


def test_moved_attention_without_boxes_stays_a_regression(tmp_path: Path) -> None:
    # no box: nothing tells whether the new place is better, so the gate fails
    rows = [("bus", ("1", "1"), ("", ""), ("", ""))] * 2
    diff = diff_audits(*audits(tmp_path, rows))
    assert diff.failed
    assert diff.data["flags"] == [{"class": "bus", "reason": "attention moved",
                                   "similarity_mean": -1.0, "threshold": 0.5,
                                   "energy_in_box_change": None}]
    steady = diff_audits(*audits(tmp_path / "kept", rows, moved=False),
                         DiffThresholds()).data["per_class"]["bus"]
    assert (steady["similarity_mean"], steady["attention"], steady["verdict"]) == \
        (1.0, "kept", "steady")


def test_an_empty_map_is_left_out_of_its_sides_energy_as_in_the_summary(
        tmp_path: Path) -> None:
    from onnxcam.audit.summary import summarize

    rows = [("owl", ("1", "1"), (0.6, 0.0), ("1", "0")),
            ("owl", ("1", "1"), (0.4, 0.3), ("0", "0")),
            ("owl", ("1", "1"), (0.5, 0.5), ("1", "1"))]
    old, new = audits(tmp_path, rows, moved=False)
    np.save(new / "heatmaps" / "0.npy", np.zeros((4, 4), np.float16))  # no evidence
    owl = diff_audits(old, new).data["per_class"]["owl"]
    # new: (0.3 + 0.5) / 2 over the two located rows, not (0 + 0.3 + 0.5) / 3
    assert owl["energy_in_box_mean"] == {"old": 0.5, "new": 0.4, "change": -0.1,
                                         "direction": "down"}
    assert owl["pointing_hit_rate"] == {"old": 0.6667, "new": 0.5, "change": -0.1667,
                                        "direction": "down"}
    assert owl["empty_maps"] == {"old": 0, "new": 1}
    assert owl["verdict"] == "steady"  # a drop of 0.1 is within --max-energy-drop
    for side, folder in (("old", old), ("new", new)):
        summary = summarize(folder / "results.csv").data["per_class"]["owl"]
        assert owl["energy_in_box_mean"][side] == summary["energy_in_box_mean"]


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no headless Chromium")
def test_diff_html_shows_the_direction_and_renders(tmp_path: Path) -> None:
    old, new = audits(tmp_path, CAR + BUS)
    out = tmp_path / "diff"
    CliRunner().invoke(main, ["audit-diff", str(old), str(new), "--out", str(out)])
    page = (out / "diff.html").read_text()
    assert "<div class='flag'><b>bus</b>: regressed, attention moved (-1.000, threshold " \
        "0.500); energy in box dropped (-0.500, threshold 0.100); accuracy dropped " \
        "(-0.250, threshold 0.000): energy in box down 0.700 → 0.200 (-0.500)" in page
    assert "<div class='improved'><b>car</b>: improved: energy in box up 0.110 → " \
        "0.710 (+0.600), accuracy up 0.571 → 1.000 (+0.429)" in page
    # the table: which way, coloured (green up, red down) and the verdict per class
    assert "0.110 → 0.710 <span class='up'>▲ up +0.600</span>" in page
    assert "0.700 → 0.200 <span class='down'>▼ down -0.500</span>" in page
    assert "<td class='verdict-improved'>improved</td>" in page
    assert "<td class='verdict-regressed'>regressed</td>" in page
    assert ".up { color: #1f7a3d" in page and ".down { color: #b11c1c" in page
    assert "border: 2px solid #2f8a4c" in page  # the improvement's green box
    picture = tmp_path / "diff.png"
    pixels = screenshot(out / "diff.html", picture, 1200, 900).astype(np.int16)
    assert pixels.shape == (900, 1200, 3)
    near = {name: (np.abs(pixels - colour).max(axis=-1) < 25).sum() for name, colour in (
        ("red border", (200, 30, 30)), ("green border", (47, 138, 76)))}
    # one regression box and one improvement box, each bordered 2 px round ~1100 x 70 px
    assert near["red border"] > 4000 and near["green border"] > 4000, near
