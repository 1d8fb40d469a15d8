"""audit-diff on two audit folders written by hand, every figure checked against values
worked out here (scipy's spearmanr, torch's bilinear resize, sums by hand)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.stats import spearmanr

from onnxcam.audit.diff import DiffThresholds, average_ranks, diff_audits, similarity
from onnxcam.audit.results import COLUMNS
from onnxcam.cli import main
from onnxcam.errors import AuditError

TIES_OLD = np.array([[0, 0, 0], [0, 2, 2], [0, 0, 7]], np.float16)
TIES_NEW = np.array([[0, 1, 0], [0, 2, 0], [3, 0, 0]], np.float16)
SMALL = np.array([[1, 2], [3, 4]], np.float16)
LARGE = np.array([[1, 2, 3, 4], [2, 3, 5, 4], [5, 6, 7, 9], [6, 8, 9, 12]], np.float16)

# (image, label, pred old/new, correct old/new, energy old/new, hit old/new, maps old/new)
ROWS = [
    ("a.png", "cat", ("cat", "cat"), ("1", "1"), ("0.9", "0.8"), ("1", "1"),
     (np.array([[0, 1], [2, 3]], np.float16), np.array([[3, 2], [1, 0]], np.float16))),
    ("b.png", "cat", ("cat", "dog"), ("1", "0"), ("0.7", "0.7"), ("1", "0"),
     (TIES_OLD, TIES_NEW)),
    ("c.png", "dog", ("dog", "dog"), ("1", "1"), ("0.8", "0.5"), ("1", "0"), (SMALL, LARGE)),
    ("d.png", "dog", ("cat", "dog"), ("0", "1"), ("0.6", "0.3"), ("0", "0"),
     (np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float16))),
    ("e.png", "dog", ("dog", "dog"), ("1", "1"), ("0.5", "0.1"), ("1", "0"),
     (np.zeros((2, 2), np.float16), SMALL)),
    ("f.png", "cat", ("cat", ""), ("1", ""), ("0.9", ""), ("1", ""), (SMALL, None)),
]


def write_audit(folder: Path, side: int, rows: list = ROWS) -> Path:
    (folder / "heatmaps").mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for index, (image, label, pred, correct, energy, hit, maps) in enumerate(rows):
            Image.new("RGB", (8, 8), (40 * index, 90, 200)).save(folder / image)
            if maps[side] is None:
                writer.writerow({"image": str(folder.parent / "old" / image), "label": label,
                                 "status": "error", "error": "bad_image: truncated"})
                continue
            np.save(folder / "heatmaps" / f"{index}.npy", maps[side])
            writer.writerow({
                "image": str(folder.parent / "old" / image), "label": label,
                "pred": pred[side], "score": "0.9", "correct": correct[side],
                "energy_in_box": energy[side], "pointing_hit": hit[side],
                "heatmap": f"heatmaps/{index}.npy", "status": "ok", "explained": label,
                "box_area": "0.25"})
    return folder


@pytest.fixture
def audits(tmp_path: Path) -> tuple[Path, Path]:
    return write_audit(tmp_path / "old", 0), write_audit(tmp_path / "new", 1)


def reference(old: np.ndarray, new: np.ndarray) -> float:
    """scipy's Spearman on maps brought to the finer grid by torch's bilinear resize
    (half-pixel centres, align_corners=False)."""
    height, width = max(old.shape[0], new.shape[0]), max(old.shape[1], new.shape[1])
    pair = [torch.nn.functional.interpolate(
        torch.tensor(m.astype(np.float64))[None, None], size=(height, width),
        mode="bilinear", align_corners=False)[0, 0].numpy() for m in (old, new)]
    return float(spearmanr(pair[0].ravel(), pair[1].ravel()).statistic)


def test_average_ranks_match_scipy_with_ties() -> None:
    from scipy.stats import rankdata

    values = np.array([3, 1, 1, 0, 3, 3, 2, 0.5, 1], np.float64)
    assert np.array_equal(average_ranks(values), rankdata(values))


def test_similarity_of_each_row_matches_scipy() -> None:
    assert similarity(*ROWS[0][6]) == pytest.approx(-1.0, abs=1e-12)
    tied = reference(TIES_OLD, TIES_NEW)
    assert similarity(TIES_OLD, TIES_NEW) == pytest.approx(tied, abs=1e-9)
    # by hand: old ranks 3.5 x6, 7.5 x2, 9; new ranks 3.5 x6, 7, 8, 9 (both mean 5);
    # Pearson of the ranks: sum of products -2.25 over sqrt(42 * 42.5)
    assert tied == pytest.approx(-2.25 / np.sqrt(42 * 42.5), abs=1e-12)
    # layers of different sizes: compared on the finer grid
    assert similarity(SMALL, LARGE) == pytest.approx(reference(SMALL, LARGE), abs=1e-6)
    assert similarity(LARGE, SMALL) == pytest.approx(reference(LARGE, SMALL), abs=1e-6)
    # flat maps: no ranking; both flat is "no change", one flat is "no agreement"
    assert similarity(np.zeros((2, 2)), np.zeros((3, 3))) == 1.0
    assert similarity(np.zeros((2, 2)), SMALL) == 0.0


def test_diff_figures_per_row_and_class(audits: tuple[Path, Path]) -> None:
    old, new = audits
    diff = diff_audits(old, new, DiffThresholds(min_similarity=0.5, max_energy_drop=0.1))
    data = diff.data
    expected_rows = [-1.0, reference(TIES_OLD, TIES_NEW), reference(SMALL, LARGE), 1.0, 0.0,
                     None]
    assert data["n"] == 6 and data["compared"] == 5
    for got, want in zip(data["similarity"], expected_rows, strict=True):
        assert got == (None if want is None else pytest.approx(want, abs=1e-4))
    cat, dog = data["per_class"]["cat"], data["per_class"]["dog"]
    # cat: rows a, b (f failed in new and is left out)
    assert (cat["n"], cat["boxes"], cat["compared"]) == (2, 2, 2)
    assert cat["similarity_mean"] == pytest.approx((-1 + expected_rows[1]) / 2, abs=1e-4)
    assert cat["accuracy"] == {"old": 1.0, "new": 0.5, "change": -0.5, "direction": "down"}
    assert cat["energy_in_box_mean"] == {"old": 0.8, "new": 0.75, "change": -0.05,
                                         "direction": "down"}
    assert cat["pointing_hit_rate"] == {"old": 1.0, "new": 0.5, "change": -0.5,
                                        "direction": "down"}
    # dog: rows c, d, e
    assert dog["similarity_mean"] == pytest.approx((expected_rows[2] + 1 + 0) / 3, abs=1e-4)
    assert dog["accuracy"] == {"old": round(2 / 3, 4), "new": 1.0, "change": round(1 / 3, 4),
                               "direction": "up"}
    assert dog["energy_in_box_mean"]["old"] == pytest.approx((0.8 + 0.6 + 0.5) / 3, abs=1e-4)
    assert dog["energy_in_box_mean"]["new"] == pytest.approx((0.5 + 0.3 + 0.1) / 3, abs=1e-4)
    assert dog["energy_in_box_mean"]["change"] == pytest.approx(-1.0 / 3, abs=1e-4)
    assert dog["pointing_hit_rate"] == {"old": round(2 / 3, 4), "new": 0.0,
                                        "change": round(-2 / 3, 4), "direction": "down"}
    # cat's attention moved (mean similarity about -0.53) as its energy fell, and it
    # lost half its accuracy; dog lost a third of its energy though its accuracy rose
    assert [(flag["class"], flag["reason"]) for flag in data["flags"]] == [
        ("cat", "attention moved"), ("cat", "accuracy dropped"),
        ("dog", "energy in box dropped")]
    assert (cat["attention"], dog["attention"]) == ("moved", "kept")
    assert (cat["verdict"], dog["verdict"]) == ("regressed", "regressed")
    assert data["improvements"] == [] and data["matched_by"] == "image path"
    # the moved rows, least similar first: a (-1), b (-0.053), e (0)
    assert [Path(new_row["image"]).name for _, new_row in diff.moved][:3] == \
        ["a.png", "b.png", "e.png"]


def test_thresholds_decide_the_flags(audits: tuple[Path, Path]) -> None:
    lax = diff_audits(*audits, DiffThresholds(min_similarity=-1.0, max_energy_drop=0.34,
                                              max_accuracy_drop=0.5))
    assert lax.data["flags"] == [] and not lax.failed
    # dog's mean similarity is about 0.66 and cat's -0.53: 0.6 flags cat only
    only_cat = diff_audits(*audits, DiffThresholds(min_similarity=0.6, max_energy_drop=0.5,
                                                   max_accuracy_drop=0.5))
    assert [flag["class"] for flag in only_cat.data["flags"]] == ["cat"]
    # any accuracy drop regresses cat; dog's accuracy rose by a third, an improvement
    # once its energy drop is allowed (a rise within the tolerance is no improvement)
    strict = diff_audits(*audits, DiffThresholds(min_similarity=-1.0, max_energy_drop=0.34))
    assert [(flag["class"], flag["reason"]) for flag in strict.data["flags"]] == [
        ("cat", "accuracy dropped")]
    assert strict.data["improvements"] == [{
        "class": "dog", "reason": "improved", "energy_in_box_change": pytest.approx(-1 / 3,
                                                                                  abs=1e-4),
        "accuracy_change": round(1 / 3, 4),
        "similarity_mean": strict.data["per_class"]["dog"]["similarity_mean"]}]
    assert lax.data["improvements"] == []


def test_cli_writes_json_and_html_and_exits_3_when_flagged(audits: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    old, new = audits
    out = tmp_path / "diff"
    result = CliRunner().invoke(main, ["audit-diff", str(old), str(new), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "flag: cat: attention moved" in result.stdout
    assert "flag: dog: energy in box dropped (-0.333, threshold 0.100)" in result.stdout
    assert "regressed: dog: energy in box down 0.633 -> 0.300 (-0.333), accuracy up " \
        "0.667 -> 1.000 (+0.333)" in result.stdout
    data = json.loads((out / "diff.json").read_text())
    assert data["thresholds"] == {"min_similarity": 0.5, "max_energy_drop": 0.1,
                                  "max_accuracy_drop": 0.0}
    page = (out / "diff.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 5  # old and new of 5 compared rows
    assert "http" not in page.replace("http-equiv", "")  # self-contained
    result = CliRunner().invoke(main, ["audit-diff", str(old), str(new), "--min-similarity",
                                       "-1", "--max-energy-drop", "0.5",
                                       "--max-accuracy-drop", "0.5"])
    assert result.exit_code == 0, result.output
    assert (new / "diff.json").exists()


def test_rows_that_do_not_correspond_are_refused(tmp_path: Path) -> None:
    old = write_audit(tmp_path / "old", 0)
    shorter = write_audit(tmp_path / "short", 1, ROWS[:4])
    with pytest.raises(AuditError, match="ends after 4 rows"):
        diff_audits(old, shorter)
    swapped = write_audit(tmp_path / "swapped", 1, [ROWS[1], ROWS[0], *ROWS[2:]])
    with pytest.raises(AuditError, match="row 0 is .*a.png.* but .*b.png"):
        diff_audits(old, swapped)
    result = CliRunner().invoke(main, ["audit-diff", str(old), str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not an audit folder" in result.stderr


def test_an_audit_against_itself_moved_nowhere(audits: tuple[Path, Path]) -> None:
    old, _ = audits
    data = diff_audits(old, old).data
    assert data["similarity"] == [1.0] * 6 and data["flags"] == []
    assert all(figures[name]["change"] == 0 for figures in data["per_class"].values()
               for name in ("accuracy", "energy_in_box_mean", "pointing_hit_rate"))


@pytest.mark.parametrize(("count", "wanted"), [(1, "compared 1 of 1 row,"),
                                               (2, "compared 2 of 2 rows,")])
def test_the_compared_count_agrees(tmp_path: Path, count: int, wanted: str) -> None:
    old = write_audit(tmp_path / "old", 0, ROWS[:count])
    new = write_audit(tmp_path / "new", 1, ROWS[:count])
    result = CliRunner().invoke(main, ["audit-diff", str(old), str(new)])
    assert result.stdout.startswith(f"{wanted} mean similarity "), result.output
