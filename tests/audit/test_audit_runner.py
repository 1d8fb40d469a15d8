"""The runner: results in manifest order whatever order a backend answers in, the
numbers it writes, summaries and flags, resume and interruption."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, manifest_rows, write_manifest
from PIL import Image

import onnxcam.audit
from onnxcam.audit import AuditOptions, ExplainSettings, LocalBackend, Thresholds, run_audit
from onnxcam.audit.backend import AuditRow, RowOutcome
from onnxcam.audit.metrics import box_region, energy_in_box, pointing_hit
from onnxcam.audit.results import COLUMNS, resume
from onnxcam.audit.summary import summarize
from onnxcam.engine import Explainer
from onnxcam.engine.images import load_image
from onnxcam.engine.maps import heatmaps
from onnxcam.errors import AuditError

BILINEAR = Image.Resampling.BILINEAR


class Quiet:
    """A progress sink for tests."""

    def __init__(self) -> None:
        self.done = self.skipped = 0

    def advance(self, count: int = 1) -> None:
        self.done += count

    def finish(self) -> None:
        pass


def audit(source: Path, out: Path, backend: object, **options: object) -> dict:
    settings = options.pop("settings", ExplainSettings())
    summary = run_audit(source, out, backend,  # type: ignore[arg-type]
                        AuditOptions(settings=settings, **options),  # type: ignore[arg-type]
                        progress=Quiet())  # type: ignore[arg-type]
    return summary.data


def read(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture
def manifest(tmp_path: Path, image_folder: Path) -> Path:
    rows = manifest_rows(image_folder, 22)
    rows[3] = [str(image_folder / "missing.png"), "cat", "1 1 5 5"]
    rows[8] = [str(image_folder / "a.png"), "zebra", ""]
    rows[9] = [str(image_folder / "b.png"), "dog", ""]  # no box: empty metric cells
    rows[15] = [str(image_folder / "c.png"), "", "1 1 4 4"]  # no label: empty "correct"
    return write_manifest(tmp_path / "manifest.csv", rows)


def test_every_row_is_accounted_for_with_the_engines_numbers(
        tmp_path: Path, manifest: Path, audit_explainer: Explainer) -> None:
    out = tmp_path / "out"
    data = audit(manifest, out, LocalBackend(audit_explainer), chunk_size=4)
    results = read(out)
    assert list(results[0]) == list(COLUMNS)
    assert len(results) == 22 and data["n"] == 22 and data["errors"] == 2
    assert results[3]["status"] == "error" and results[3]["error"].startswith("missing_image: ")
    assert results[8]["error"].startswith("bad_row: label 'zebra'")
    assert results[9]["energy_in_box"] == "" and results[9]["status"] == "ok"
    assert results[15]["correct"] == "" and results[15]["explained"] == results[15]["pred"]
    with open(manifest, newline="") as stream:
        written = list(csv.DictReader(stream))
    for row, given in zip(results, written):
        if row["status"] != "ok":
            continue
        image = load_image(given["image"], 3)
        target = LABELS.index(given["label"]) if given["label"] else None
        expected = audit_explainer.explain([image], targets=target)
        probabilities = expected.probabilities[0]
        assert row["pred"] == LABELS[int(probabilities.argmax())]
        assert float(row["score"]) == pytest.approx(probabilities.max(), abs=1e-4)
        assert row["explained"] == LABELS[int(expected.targets[0])]
        raw = np.load(out / row["heatmap"])
        assert raw.dtype == np.float16
        assert np.allclose(raw, expected.raw[0], rtol=1e-3, atol=1e-3 * expected.raw.max())
        if given["bbox"]:
            height, width = image.shape[:2]
            heat = heatmaps(raw[None].astype(np.float32), height, width)[0]
            region = box_region([float(v) for v in given["bbox"].split()], height, width)
            assert float(row["energy_in_box"]) == pytest.approx(energy_in_box(heat, region),
                                                                abs=1e-4)
            assert row["pointing_hit"] == str(int(pointing_hit(heat, region)))
            assert float(row["box_area"]) == pytest.approx(region.mean(), abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"n", "errors", "accuracy", "per_class", "flags"}
    labelled = [r for r in results if r["status"] == "ok" and r["correct"]]
    assert summary["accuracy"] == pytest.approx(
        sum(r["correct"] == "1" for r in labelled) / len(labelled), abs=1e-4)
    assert set(summary["per_class"]) == set(LABELS)  # "zebra" names no class
    assert (out / "report.html").stat().st_size > 1000


class OutOfOrder:
    """Collects every chunk, then answers the last chunk first, each shuffled."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner, self.info = inner, inner.info

    def run(self, chunks: Iterable[list[AuditRow]],
            settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        answers = list(self.inner.run(chunks, settings))
        rng = np.random.default_rng(0)
        for outcomes in reversed(answers):
            yield [outcomes[i] for i in rng.permutation(len(outcomes))]


def test_out_of_order_answers_give_identical_results(
        tmp_path: Path, manifest: Path, audit_explainer: Explainer) -> None:
    local = LocalBackend(audit_explainer)
    audit(manifest, tmp_path / "in_order", local, chunk_size=3)
    audit(manifest, tmp_path / "shuffled", OutOfOrder(local), chunk_size=3)
    for name in ("results.csv",):
        assert (tmp_path / "in_order" / name).read_bytes() == \
            (tmp_path / "shuffled" / name).read_bytes()


class Losing:
    def __init__(self, inner: LocalBackend) -> None:
        self.inner, self.info = inner, inner.info

    def run(self, chunks: Iterable[list[AuditRow]],
            settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        for outcomes in self.inner.run(chunks, settings):
            yield outcomes[1:]


def test_a_backend_that_loses_rows_is_an_error(tmp_path: Path, manifest: Path,
                                               audit_explainer: Explainer) -> None:
    with pytest.raises(AuditError, match="no outcome for"):
        audit(manifest, tmp_path / "out", Losing(LocalBackend(audit_explainer)), chunk_size=5)


def test_existing_results_need_resume(tmp_path: Path, manifest: Path,
                                      audit_explainer: Explainer) -> None:
    out = tmp_path / "out"
    backend = LocalBackend(audit_explainer)
    audit(manifest, out, backend)
    before = (out / "results.csv").read_bytes()
    with pytest.raises(AuditError, match="pass --resume"):
        audit(manifest, out, backend)
    data = audit(manifest, out, Losing(backend), resume=True)  # nothing left to run
    assert (out / "results.csv").read_bytes() == before
    assert data["resumed_after"] == 22


class Interrupting:
    """Answers ``chunks`` chunks, then acts as if Ctrl-C was pressed."""

    def __init__(self, inner: LocalBackend, chunks: int) -> None:
        self.inner, self.info, self.chunks = inner, inner.info, chunks
        self.closed = False

    def run(self, chunks: Iterable[list[AuditRow]],
            settings: ExplainSettings) -> Iterator[list[RowOutcome]]:
        try:
            for count, outcomes in enumerate(self.inner.run(chunks, settings)):
                if count == self.chunks:
                    raise KeyboardInterrupt
                yield outcomes
        finally:
            self.closed = True


def test_interrupt_keeps_finished_rows_and_resume_completes_identically(
        tmp_path: Path, manifest: Path, audit_explainer: Explainer) -> None:
    local = LocalBackend(audit_explainer)
    audit(manifest, tmp_path / "whole", local, chunk_size=4)
    out = tmp_path / "out"
    interrupting = Interrupting(local, chunks=2)
    with pytest.raises(KeyboardInterrupt):
        audit(manifest, out, interrupting, chunk_size=4)
    assert interrupting.closed
    partial = read(out)
    assert 8 <= len(partial) < 22
    audit(manifest, out, local, chunk_size=4, resume=True)
    assert (out / "results.csv").read_bytes() == (tmp_path / "whole/results.csv").read_bytes()
    assert json.loads((out / "summary.json").read_text())["per_class"] == \
        json.loads((tmp_path / "whole/summary.json").read_text())["per_class"]


def test_resume_cuts_a_half_written_line_and_checks_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    header = ",".join(COLUMNS) + "\n"
    line = "a.png,cat,cat,0.9,1,0.5,1,heatmaps/0.npy,ok,,cat,0.2,,\n"
    path.write_text(header + line + "b.png,dog,d")
    assert resume(path, iter(["a.png", "b.png"])) == 1
    assert path.read_text() == header + line
    with pytest.raises(AuditError, match="another manifest"):
        resume(path, iter(["z.png"]))
    path.write_text("something,else\n")
    with pytest.raises(AuditError, match="not an onnxcam audit results file"):
        resume(path, iter([]))


def reference_aucs(bundle: Path, image: str, label: int | None,
                   steps: int) -> tuple[float, float]:
    """RISE's deletion and insertion AUCs of one row, from scratch: the picture resized
    by Pillow, the bundle run by plain onnxruntime one perturbed copy at a time, the
    row's map from the bundle's own Grad-CAM output (``cam``) after ReLU, enlarged by
    Pillow (min-max scaling does not change the ranking), and numpy's trapezoid."""
    import onnxruntime

    from onnxcam.engine.faithfulness import blur  # checked against a direct convolution

    session = onnxruntime.InferenceSession(str(bundle), providers=["CPUExecutionProvider"])

    def run(picture: np.ndarray, target: int) -> list[np.ndarray]:
        return session.run(["logits", "cam"], {"image": picture[None],
                                               "target": np.array([target], np.int64)})

    metadata = session.get_modelmeta().custom_metadata_map
    size = (int(metadata["onnxcam.input_width"]), int(metadata["onnxcam.input_height"]))
    picture = np.asarray(Image.open(image).convert("RGB").resize(size, BILINEAR))
    logits, cam = run(picture, -1 if label is None else label)
    target = int(np.argmax(logits[0])) if label is None else label  # as --explain label
    relu = np.maximum(cam[0], 0).astype(np.float32)
    heat = np.asarray(Image.fromarray(relu, mode="F").resize(size, BILINEAR))
    order = np.argsort(-heat.reshape(-1), kind="stable")
    start = blur(picture[None])[0]
    curves: dict[str, list[float]] = {"deletion": [], "insertion": []}
    for step in range(steps + 1):
        deleted, inserted = picture.copy(), start.copy()
        for pixel in order[:round(step * heat.size / steps)]:
            y, x = divmod(int(pixel), size[0])
            deleted[y, x] = 0
            inserted[y, x] = picture[y, x]
        for name, perturbed in (("deletion", deleted), ("insertion", inserted)):
            scores = run(perturbed, -1)[0][0].astype(np.float64)
            exp = np.exp(scores - scores.max())
            curves[name].append(float(exp[target] / exp.sum()))
    return (float(np.trapezoid(curves["deletion"], dx=1 / steps)),
            float(np.trapezoid(curves["insertion"], dx=1 / steps)))


def test_faithfulness_columns(tmp_path: Path, manifest: Path, audit_bundle: Path,
                              audit_explainer: Explainer) -> None:
    """Rows 0 (right answer), 1 (a label that is not the prediction) and 15 (no label:
    the prediction is explained) against the reference, in results.csv (4 decimals)
    and at full precision from the backend. The two AUCs differ by far more than the
    tolerance, so swapped columns fail; another class's map or curve fails too."""
    out, steps = tmp_path / "out", 4
    settings = ExplainSettings(faithfulness=True, steps=steps)
    data = audit(manifest, out, LocalBackend(audit_explainer), settings=settings)
    results = read(out)
    assert (results[0]["correct"], results[1]["correct"], results[15]["label"]) == ("1", "0", "")
    expected = {}
    for index in (0, 1, 15):
        row = results[index]
        label = LABELS.index(row["label"]) if row["label"] else None
        deletion, insertion = expected[index] = reference_aucs(audit_bundle, row["image"],
                                                               label, steps)
        assert abs(deletion - insertion) > 0.01  # the test can tell the columns apart
        assert float(row["deletion_auc"]) == pytest.approx(deletion, abs=1.5e-4)
        assert float(row["insertion_auc"]) == pytest.approx(insertion, abs=1.5e-4)
    rows = [AuditRow(index, results[index]["image"],
                     LABELS.index(results[index]["label"]) if results[index]["label"] else None)
            for index in expected]
    (outcomes,) = LocalBackend(audit_explainer).run([rows], settings)
    for outcome in outcomes:
        assert outcome.faithfulness is not None
        assert (outcome.faithfulness["deletion_auc"], outcome.faithfulness["insertion_auc"]) \
            == pytest.approx(expected[outcome.index], abs=1e-5)
    cats = [r for r in results if r["status"] == "ok" and r["label"] == "cat"]
    assert data["per_class"]["cat"]["deletion_auc_mean"] == pytest.approx(
        np.mean([float(r["deletion_auc"]) for r in cats]), abs=1e-4)
    assert data["per_class"]["cat"]["insertion_auc_mean"] == pytest.approx(
        np.mean([float(r["insertion_auc"]) for r in cats]), abs=1e-4)


def test_bad_settings_fail_before_anything_is_written(tmp_path: Path, manifest: Path,
                                                      audit_explainer: Explainer) -> None:
    from onnxcam.errors import BadMethodError

    with pytest.raises(BadMethodError):
        audit(manifest, tmp_path / "out", LocalBackend(audit_explainer),
              settings=ExplainSettings(method="nope"))
    assert not (tmp_path / "out").exists()


def write_results(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({"status": "ok", **row} for row in rows)


def test_summary_flags_and_notes_by_hand(tmp_path: Path) -> None:
    def row(label: str, pred: str, score: str, energy: str = "", area: str = "",
            hit: str = "") -> dict[str, str]:
        return {"image": f"{label}.png", "label": label, "pred": pred, "score": score,
                "correct": str(int(label == pred)), "energy_in_box": energy,
                "box_area": area, "pointing_hit": hit, "explained": label}

    rows = (
        [row("bus", "bus", "0.9", "0.10", "0.20", "0") for _ in range(8)]
        + [row("bus", "car", "0.99", "0.30", "0.20", "1") for _ in range(2)]  # mean 0.14
        + [row("car", "car", "0.8", "0.70", "0.10", "1") for _ in range(10)]
        + [row("big", "big", "0.7", "0.60", "0.50", "1") for _ in range(10)]  # < 1.5 * 0.5
        + [row("few", "few", "0.6", "0.05", "0.30", "0") for _ in range(3)]
        + [{"image": "x.png", "label": "car", "status": "error", "error": "bad_image: x"}]
    )
    path = tmp_path / "results.csv"
    write_results(path, rows)
    summary = summarize(path, Thresholds(flag_energy=0.5, flag_lift=1.5, min_boxes=5),
                        worst=3)
    data = summary.data
    assert (data["n"], data["errors"]) == (34, 1)
    assert data["accuracy"] == pytest.approx(31 / 33, abs=1e-4)
    bus = data["per_class"]["bus"]
    assert bus == {"n": 10, "accuracy": 0.8, "energy_in_box_mean": 0.14,
                   "pointing_hit_rate": 0.2, "box_area_mean": 0.2, "boxes": 10, "errors": 0,
                   "empty_maps": 0, "accuracy_located": 0.8}
    assert data["per_class"]["car"]["errors"] == 1
    flags = {flag["class"]: flag for flag in data["flags"]}
    assert set(flags) == {"bus", "big"}
    assert flags["bus"]["reason"] == "attention mostly outside the object"
    assert flags["bus"]["energy_in_box_mean"] == 0.14 and flags["bus"]["box_area_mean"] == 0.2
    assert flags["big"]["reason"] == "attention barely above a uniform map"
    assert [note["class"] for note in data["notes"]] == ["few"]
    assert [r["energy_in_box"] for r in summary.lowest_energy] == ["0.05", "0.05", "0.05"]
    assert [r["index"] for r in summary.confident_mistakes] == ["8", "9"]
    assert summary.histograms["bus"][2] == 8 and summary.histograms["bus"][6] == 2


def report_text(tmp_path: Path, rows: list[dict[str, str]], min_boxes: int = 2) -> str:
    import re

    from onnxcam.audit.report import write_report

    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "results.csv"
    write_results(path, rows)
    summary = summarize(path, Thresholds(flag_energy=0.5, flag_lift=1.5, min_boxes=min_boxes))
    write_report(summary, tmp_path / "report.html", {}, tmp_path)
    return re.sub(r"<[^>]+>", " ", (tmp_path / "report.html").read_text())


def test_a_report_without_boxes_does_not_look_like_a_pass(tmp_path: Path) -> None:
    """Issue 12: with no box judged, the report showed a green "No class flagged"."""
    unboxed = [{"image": f"{i}.png", "label": "cat", "pred": "cat", "score": "0.9",
                "correct": "1", "explained": "cat"} for i in range(6)]
    text = report_text(tmp_path / "none", unboxed)
    assert "No class judged" in text and "No class flagged" not in text
    boxed = [{**row, "energy_in_box": "0.8", "box_area": "0.2", "pointing_hit": "1"}
             for row in unboxed]
    text = report_text(tmp_path / "boxed", boxed)
    assert "No class flagged: attention falls on the objects in the 1 class judged" in text


def test_confident_mistakes_do_not_repeat_the_lowest_energy_tiles(tmp_path: Path) -> None:
    rows = [{"image": f"{i}.png", "label": "bus", "pred": "car", "score": f"0.9{i}",
             "correct": "0", "explained": "bus", "energy_in_box": f"0.0{i}",
             "box_area": "0.2", "pointing_hit": "0"} for i in range(3)]
    rows += [{"image": "late.png", "label": "bus", "pred": "car", "score": "0.5",
              "correct": "0", "explained": "bus"}]  # no box: a mistake, no energy
    text = report_text(tmp_path, rows)
    lowest, mistakes = text.split("Lowest energy in box")[1].split("Confident mistakes")
    assert all(f"{i}.png" in lowest for i in range(3))
    assert "late.png" in mistakes and not any(f" {i}.png" in mistakes for i in range(3))


def test_the_public_api_is_pinned() -> None:

    assert onnxcam.audit.__all__ == sorted(onnxcam.audit.__all__) == [
        "AuditOptions", "AuditRow", "Backend", "ExplainSettings", "LocalBackend",
        "RowOutcome", "Summary", "Thresholds", "run_audit"]
