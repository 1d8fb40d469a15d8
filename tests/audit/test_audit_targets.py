"""Multi-label and segmentation audits: the class-id mask reader and metrics by hand,
and every (image, label) line equal to the single-label audit of the same pair."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from checks import chromium, screenshot
from conftest import LABELS, write_manifest
from PIL import Image

from onnxcam.audit import AuditOptions, ExplainSettings, LocalBackend, run_audit
from onnxcam.audit.backend import AuditRow
from onnxcam.audit.manifest import SEGMENTATION, manifest_form, read_manifest, region_of
from onnxcam.audit.metrics import energy_in_box, pointing_hit
from onnxcam.audit.results import MULTI_COLUMNS
from onnxcam.bundle import read_bundle
from onnxcam.engine import Explainer

# A 2x3 map of class ids; 255 is no class ("void"). At 4x6 each id is a 2x2 block.
IDS = np.array([[1, 2, 2], [0, 0, 255]], np.uint8)
METRICS = ("energy_in_box", "pointing_hit", "box_area")


class Quiet:
    done = skipped = 0

    def advance(self, count: int = 1) -> None:
        self.done += count

    def finish(self) -> None:
        pass


def audit(source: Path, out: Path, explainer: Explainer, explain: str = "label",
          resume: bool = False, threshold: float = 0.5) -> dict:
    options = AuditOptions(ExplainSettings(explain=explain, threshold=threshold), chunk_size=2,
                           resume=resume, clusters_sample=0)
    return run_audit(source, out, LocalBackend(explainer), options, Quiet()).data  # type: ignore[arg-type]


def lines(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def palette_png(path: Path, ids: np.ndarray) -> Path:
    picture = Image.fromarray(ids, mode="L").convert("P")
    picture.putpalette([value for k in range(256) for value in (k, 255 - k, (7 * k) % 256)])
    picture.save(path)
    return path


# -- the class-id mask and its metrics, by hand --


def test_a_class_id_mask_is_scaled_nearest_and_read_by_class(tmp_path: Path) -> None:
    mask = palette_png(tmp_path / "ids.png", IDS)
    row = AuditRow(0, "x.png", 2, mask=str(mask), mask_class=2)
    region = region_of(row, 4, 6)
    expected = np.zeros((4, 6), bool)
    expected[0:2, 2:6] = True
    assert (region == expected).all()
    heatmap = np.arange(24, dtype=np.float64).reshape(4, 6)  # sum 276
    # class 2: 2+3+4+5 + 8+9+10+11 = 52; the maximum, 23 at (3, 5), is void.
    assert energy_in_box(heatmap, region) == pytest.approx(52 / 276)
    assert not pointing_hit(heatmap, region)
    zero = region_of(AuditRow(0, "x.png", 0, mask=str(mask), mask_class=0), 4, 6)
    # class 0: 12+13+14+15 + 18+19+20+21 = 132
    assert energy_in_box(heatmap, zero) == pytest.approx(132 / 276)
    heatmap[2, 1] = 100  # the maximum now in class 0's pixels
    assert pointing_hit(heatmap, zero) and not pointing_hit(heatmap, region)


def test_segmentation_manifest_rows_hold_the_classes_present(tmp_path: Path,
                                                             audit_bundle: Path) -> None:
    palette_png(tmp_path / "ids.png", IDS)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
    manifest = write_manifest(tmp_path / "seg.csv", [["a.png", "ids.png"], ["b.png", "rgb.png"],
                                                     ["c.png", ""]],
                              header=("image", "segmentation"))
    assert manifest_form(manifest) == SEGMENTATION
    first, second, third = read_manifest(manifest, read_bundle(audit_bundle).info)
    assert [(f.label, f.mask_class) for f in first.findings] == [(0, 0), (1, 1), (2, 2)]
    assert second.error.code == "bad_row" and "RGB" in str(second.error)
    assert third.multi and third.findings == ()


def test_multi_label_manifest_rows(tmp_path: Path, audit_bundle: Path) -> None:
    manifest = write_manifest(tmp_path / "ml.csv", [
        ["a.png", "dog|cat", "1 1 5 5|"],
        ["b.png", "dog|cat", "1 1 5 5"],
        ["c.png", "dog|dog", ""],
        ["d.png", "", ""],
    ], header=("image", "labels", "bbox"))
    first, second, third, fourth = read_manifest(manifest, read_bundle(audit_bundle).info)
    assert [(f.label, f.bbox) for f in first.findings] == [
        (LABELS.index("dog"), (1.0, 1.0, 5.0, 5.0)), (LABELS.index("cat"), None)]
    assert "1 entries for 2 label(s)" in str(second.error)
    assert "twice" in str(third.error)
    assert fourth.multi and fourth.findings == ()


# -- whole audits against the single-label path --


def pairs_manifests(tmp_path: Path, folder: Path) -> tuple[Path, Path]:
    """A multi-label manifest and the single-label one of its (image, label) pairs."""
    rows = [("a.png", ["cat", "dog"], ["0 0 8 8", "2 2 10 12"]),
            ("b.png", ["fox"], ["1 1 6 6"]),
            ("c.png", ["owl", "yak", "cat"], ["3 3 9 9", "", "0 4 12 14"]),
            ("d.png", ["dog", "fox"], ["", ""])]
    multi = write_manifest(tmp_path / "multi.csv", [
        [str(folder / image), "|".join(names), "|".join(boxes)] for image, names, boxes in rows],
        header=("image", "labels", "bbox"))
    single = write_manifest(tmp_path / "single.csv", [
        [str(folder / image), name, box] for image, names, boxes in rows
        for name, box in zip(names, boxes)])
    return multi, single


def assert_lines_match(multi: list[dict[str, str]], single: list[dict[str, str]],
                       multi_out: Path, single_out: Path) -> None:
    assert len(multi) == len(single)
    for mine, theirs in zip(multi, single):
        assert (mine["image"], mine["label"], mine["explained"], mine["status"]) == (
            theirs["image"], theirs["label"], theirs["explained"], theirs["status"])
        for key in METRICS:
            assert (mine[key] == "") == (theirs[key] == ""), key
            if mine[key]:
                assert float(mine[key]) == pytest.approx(float(theirs[key]), abs=2e-4), key
        ours = np.load(multi_out / mine["heatmap"]).astype(np.float32)
        reference = np.load(single_out / theirs["heatmap"]).astype(np.float32)
        np.testing.assert_allclose(ours, reference, atol=2e-3)  # float16 files


def test_multi_label_audit_gives_the_single_label_numbers(
        tmp_path: Path, image_folder: Path, audit_explainer: Explainer) -> None:
    multi, single = pairs_manifests(tmp_path, image_folder)
    mine = audit(multi, tmp_path / "multi", audit_explainer)
    theirs = audit(single, tmp_path / "single", audit_explainer)
    got, want = lines(tmp_path / "multi"), lines(tmp_path / "single")
    assert_lines_match(got, want, tmp_path / "multi", tmp_path / "single")
    assert [line["row"] for line in got] == ["0", "0", "1", "2", "2", "2", "3", "3"]
    assert list(got[0]) == list(MULTI_COLUMNS)
    assert mine["form"] == "multi-label" and "form" not in theirs
    for label, figures in theirs["per_class"].items():
        ours = mine["per_class"][label]
        assert (ours["n"], ours["boxes"]) == (figures["n"], figures["boxes"])
        if figures["energy_in_box_mean"] is not None:
            assert ours["energy_in_box_mean"] == pytest.approx(figures["energy_in_box_mean"],
                                                               abs=2e-4)
    # Softmax head: the predicted classes are the top-1 alone; score is the label's own.
    probabilities = audit_explainer.explain(str(image_folder / "a.png"), targets="cat")
    assert got[0]["pred"] == probabilities.label(int(probabilities.probabilities[0].argmax()))
    assert float(got[0]["score"]) == pytest.approx(
        probabilities.probabilities[0][LABELS.index("cat")], abs=1e-4)


def test_multi_label_audit_resumes_a_cut_row(tmp_path: Path, image_folder: Path,
                                             audit_explainer: Explainer) -> None:
    multi, _ = pairs_manifests(tmp_path, image_folder)
    audit(multi, tmp_path / "whole", audit_explainer)
    out = tmp_path / "cut"
    audit(multi, out, audit_explainer)
    text = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(text[:5]) + text[5][:9])  # row 2 half-written
    audit(multi, out, audit_explainer, resume=True)
    assert [{k: v for k, v in line.items() if k != "heatmap"} for line in lines(out)] == [
        {k: v for k, v in line.items() if k != "heatmap"} for line in lines(tmp_path / "whole")]


def test_segmentation_audit_gives_the_binary_mask_numbers(
        tmp_path: Path, image_folder: Path, audit_explainer: Explainer) -> None:
    """A class-id mask per row on a classifier: each class present is explained, and
    measured in its own pixels, as a single-label row with that class's binary mask."""
    rng = np.random.default_rng(3)
    seg_rows, single_rows = [], []
    for name, size in (("a", (6, 9)), ("b", (20, 13)), ("c", (40, 40))):
        ids = rng.choice([0, 2, 4, 255], size=size).astype(np.uint8)
        palette_png(tmp_path / f"{name}_ids.png", ids)
        image = str(image_folder / f"{name}.png")
        seg_rows.append([image, f"{name}_ids.png"])
        for cls in (0, 2, 4):
            binary = Image.fromarray((ids == cls).astype(np.uint8) * 255)
            binary.save(tmp_path / f"{name}_{cls}.png")
            single_rows.append([image, LABELS[cls], f"{name}_{cls}.png"])
    seg = write_manifest(tmp_path / "seg.csv", seg_rows, header=("image", "segmentation"))
    single = write_manifest(tmp_path / "single.csv", single_rows, header=("image", "label", "mask"))
    mine = audit(seg, tmp_path / "seg", audit_explainer)
    audit(single, tmp_path / "single", audit_explainer)
    got, want = lines(tmp_path / "seg"), lines(tmp_path / "single")
    assert_lines_match(got, want, tmp_path / "seg", tmp_path / "single")
    assert mine["form"] == "segmentation" and mine["per_class"]["fox"]["boxes"] == 3
    page = (tmp_path / "seg" / "report.html").read_text()
    assert "energy in mask" in page


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_pred_explains_the_classes_over_the_threshold(
        tmp_path: Path, image_folder: Path, multilabel_bundle: Path, threshold: float) -> None:
    explainer = Explainer(multilabel_bundle, device="cpu")
    multi, _ = pairs_manifests(tmp_path, image_folder)
    summary = audit(multi, tmp_path / "pred", explainer, explain="pred", threshold=threshold)
    assert summary["threshold"] == threshold
    got = lines(tmp_path / "pred")
    findings = {0: {"cat", "dog"}, 1: {"fox"}, 2: {"owl", "yak", "cat"}, 3: {"dog", "fox"}}
    for row, image in enumerate("abcd"):
        logits = explainer.predict(explainer.prepare([str(image_folder / f"{image}.png")]))[0]
        positive = 1 / (1 + np.exp(-logits.astype(np.float64))) > threshold  # by hand
        mine = [line for line in got if line["row"] == str(row)]
        expected = {LABELS[k] for k in np.flatnonzero(positive)}
        if not expected:
            assert [line["explained"] for line in mine] == [""]
            continue
        assert {line["explained"] for line in mine} == expected
        for line in mine:
            assert line["pred"] == "|".join(LABELS[k] for k in np.flatnonzero(positive))
            listed = line["explained"] in findings[row]
            assert line["correct"] == str(int(listed))
            assert line["label"] == (line["explained"] if listed else "")


@pytest.mark.skipif(chromium() is None, reason="no headless Chromium")
def test_reports_render_per_label_rows(tmp_path: Path, image_folder: Path,
                                       audit_explainer: Explainer) -> None:
    multi, _ = pairs_manifests(tmp_path, image_folder)
    audit(multi, tmp_path / "multi", audit_explainer)
    page = (tmp_path / "multi" / "report.html").read_text()
    assert "(image, label) pairs" in page
    picture = tmp_path / "report.png"
    pixels = screenshot(tmp_path / "multi" / "report.html", picture, 1000, 3000)
    assert pixels.shape[:2] == (3000, 1000) and pixels.std() > 10


def test_workers_get_each_image_once_with_its_targets() -> None:
    from onnxcam.audit.distributed import job_targets

    findings = (AuditRow(0, "a.png", 3), AuditRow(0, "a.png", 1))
    row = AuditRow(0, "a.png", multi=True, findings=findings)
    assert job_targets(row, ExplainSettings()) == [3, 1]
    assert job_targets(row, ExplainSettings(explain="pred")) == ["all-positive"]
    assert job_targets(AuditRow(1, "b.png", multi=True), ExplainSettings()) == ["all-positive"]
    assert job_targets(AuditRow(1, "b.png", 2), ExplainSettings()) == 2
    assert job_targets(AuditRow(1, "b.png", 2), ExplainSettings(explain="pred")) is None
