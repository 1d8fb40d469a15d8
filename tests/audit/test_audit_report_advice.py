"""The audit's advice (flag -> meaning -> what to try), clusters that carry their own
energy-in-box and accuracy, clusters explained by the background, and empty maps
counted apart: on small results.csv files written by hand, with stored 16x16 maps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from onnxcam.audit.advice import advice_lines, advise
from onnxcam.audit.clusters import cluster_classes, clusters_json, rows_at
from onnxcam.audit.report import write_report
from onnxcam.audit.results import ResultsWriter
from onnxcam.audit.summary import Thresholds, summarize
from onnxcam.engine.outputs import npy_bytes

THRESHOLDS = Thresholds(flag_energy=0.5, flag_lift=1.5, min_boxes=5)


def write_audit(out: Path, rows: list[dict[str, str]], maps: list[np.ndarray]) -> Path:
    """results.csv of ``rows`` (status ok), row i's map stored as heatmaps/i.npy."""
    (out / "heatmaps").mkdir(parents=True)
    for index, raw in enumerate(maps):
        (out / "heatmaps" / f"{index}.npy").write_bytes(npy_bytes(raw.astype(np.float16)))
    writer = ResultsWriter(out / "results.csv")
    writer.write({"status": "ok", "heatmap": f"heatmaps/{index}.npy", **row}
                 for index, row in enumerate(rows))
    writer.close()
    return out / "results.csv"


def row(image: str, label: str, correct: bool, energy: str = "", area: str = "",
        hit: str = "") -> dict[str, str]:
    return {"image": image, "label": label, "pred": label if correct else "other",
            "score": "0.9", "correct": str(int(correct)), "explained": label,
            "energy_in_box": energy, "box_area": area, "pointing_hit": hit}


def blob(y: int, x: int, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 map: a bump at (y, x) over a little noise (no two maps equal)."""
    rows, columns = np.mgrid[:16, :16]
    return np.exp(-((rows - y) ** 2 + (columns - x) ** 2) / 8.0) + 0.05 * rng.random((16, 16))


def test_an_empty_map_is_counted_apart_not_as_attention_outside(tmp_path: Path) -> None:
    """Six bus maps with a location (energies 0.6, 0.6, 0.7, 0.7, 0.8 and a real map
    wholly outside its box, 0.0) and four flat ones, which also score 0 and miss.
    Before, the flat maps pulled the mean to (0.6+0.6+0.7+0.7+0.8)/10 = 0.34: flagged
    "mostly outside". Left out, the mean is 3.4/6 = 0.5667, over six boxes of area 0.1
    (no flag: 0.5667 >= 0.5 and >= 1.5 * 0.1), and pointing hits 5 of 6."""
    rng = np.random.default_rng(1)
    energies = ["0.6000", "0.6000", "0.7000", "0.7000", "0.8000", "0.0000"]
    rows = [row(f"m{i}.png", "bus", True, e, "0.1000", str(int(e != "0.0000")))
            for i, e in enumerate(energies)]
    rows += [row(f"flat{i}.png", "bus", False, "0.0000", "0.1000", "0") for i in range(4)]
    maps = [blob(4, 4, rng) for _ in energies] + [np.full((16, 16), v) for v in (0, 0, 1, 3)]
    summary = summarize(write_audit(tmp_path, rows, maps), THRESHOLDS)
    bus = summary.data["per_class"]["bus"]
    assert (bus["boxes"], bus["empty_maps"]) == (10, 4)
    assert bus["energy_in_box_mean"] == pytest.approx(3.4 / 6, abs=1e-4)
    assert bus["pointing_hit_rate"] == pytest.approx(5 / 6, abs=1e-4)
    assert bus["box_area_mean"] == 0.1 and bus["accuracy"] == 0.6
    assert bus["accuracy_located"] == 1.0
    assert summary.data["flags"] == []
    # The flat maps are no "lowest energy" case; the real map at 0.0 is.
    assert [r["image"] for r in summary.lowest_energy][0] == "m5.png"
    assert not any(r["image"].startswith("flat") for r in summary.lowest_energy)
    assert sum(summary.histograms["bus"]) == 6
    [advice] = advise(summary.data)  # 4 of 10 maps empty: at least a tenth
    assert (advice["rule"], advice["meaning"]) == (
        "empty", "4 bus map(s) are empty: the model found no evidence for bus anywhere "
        "in those images")
    # In a detection audit the same rule names maps of objects the detector found.
    [advice] = advise({**summary.data, "form": "detection"})
    assert (advice["rule"], advice["meaning"]) == (
        "empty", "4 bus detection map(s) are empty: the detector found these objects, "
        "yet their Grad-CAM sums below zero everywhere on the layer, so the maps do not "
        "say where it looked")
    assert "--method hirescam" in advice["try"]


def test_a_class_of_mostly_empty_maps_is_not_judged(tmp_path: Path) -> None:
    """Three measured rows and seven flat maps: fewer than min_boxes=5 to judge."""
    rng = np.random.default_rng(2)
    rows = [row(f"m{i}.png", "bus", True, "0.9000", "0.1000", "1") for i in range(3)]
    rows += [row(f"flat{i}.png", "bus", False, "0.0000", "0.1000", "0") for i in range(7)]
    maps = [blob(4, 4, rng) for _ in range(3)] + [np.zeros((16, 16))] * 7
    data = summarize(write_audit(tmp_path, rows, maps), THRESHOLDS).data
    assert data["notes"] == [{"class": "bus", "note": (
        "3 row(s) with a box or mask and 7 more with an empty map, fewer than min_boxes=5: "
        "attention not judged")}]
    assert [a["rule"] for a in advise(data)] == ["empty", "not_judged"]


def test_each_flag_gets_its_rule_by_hand(tmp_path: Path) -> None:
    """bus: mean 0.14 < 0.5, 8 of 10 right (right answers from the wrong place); van:
    0.2 < 0.5, 2 of 10 right; big: 0.6 >= 0.5 but < 1.5 * 0.5."""
    rng = np.random.default_rng(3)
    rows = ([row(f"b{i}.png", "bus", i < 8, "0.1400", "0.2000", "0") for i in range(10)]
            + [row(f"v{i}.png", "van", i < 2, "0.2000", "0.1000", "0") for i in range(10)]
            + [row(f"g{i}.png", "big", True, "0.6000", "0.5000", "1") for i in range(10)]
            + [row(f"c{i}.png", "car", True, "0.8000", "0.1000", "1") for i in range(10)])
    maps = [blob(4, 4, rng) for _ in rows]
    data = summarize(write_audit(tmp_path, rows, maps), THRESHOLDS).data
    advice = {item["class"]: item for item in advise(data)}
    assert {label: item["rule"] for label, item in advice.items()} == {
        "bus": "background", "van": "missed", "big": "uniform"}
    assert advice["bus"] == {
        "class": "bus", "rule": "background",
        "finding": "attention mostly outside the object, predictions mostly right",
        "meaning": "the model is right about bus while looking away from it, at the "
                   "background: it may have learned the background (or the context), "
                   "not the bus",
        "try": "collect bus images on other backgrounds, or crop or mask the backgrounds "
               "in training, and re-audit"}
    data["advice"] = advise(data)
    [line] = [line for line in advice_lines(data) if line.startswith("advice: bus: ")]
    assert line.startswith("advice: bus: attention mostly outside the object, predictions "
                           "mostly right: the model is right about bus")
    assert line.endswith("Try: collect bus images on other backgrounds, or crop or mask the "
                         "backgrounds in training, and re-audit.")


def car_clusters(out: Path, inside: str, outside: str, area: str = "0.1000",
                 thresholds: Thresholds = THRESHOLDS) -> dict:
    """30 cars: 21 maps on the top-left background, energy in box ``outside`` (18 of
    21 right); 9 on the box in the bottom right, energy ``inside`` (all right)."""
    rng = np.random.default_rng(4)
    background = [row(f"bg{i}.png", "car", i < 18, outside, area, "0") for i in range(21)]
    on_car = [row(f"car{i}.png", "car", True, inside, area, "1") for i in range(9)]
    maps = [blob(2, 2, rng) for _ in background] + [blob(12, 12, rng) for _ in on_car]
    path = write_audit(out, background + on_car, maps)
    return clusters_json(cluster_classes(path, out, 1000), 1000, thresholds)


def test_each_cluster_carries_its_count_energy_and_accuracy(tmp_path: Path) -> None:
    data = car_clusters(tmp_path, inside="0.8000", outside="0.1200", area="0.2000")
    car = data["per_class"]["car"]
    assert car["k"] == 2 and car["sizes"] == [21, 9]
    first, second = car["clusters"]
    assert (first["count"], first["boxes"], first["energy_in_box_mean"],
            first["box_area_mean"], first["accuracy"]) == (21, 21, 0.12, 0.2,
                                                           round(18 / 21, 4))
    assert (second["count"], second["energy_in_box_mean"], second["accuracy"]) == (
        9, 0.8, 1.0)
    # 0.12 < 0.5 and < 1.5 * 0.2: the background carries these 21.
    assert first["note"] == "these 21 images are explained by the background"
    assert "note" not in second and car["background"] == [0]
    assert data["background"] == ["car"]


@pytest.mark.parametrize(("inside", "outside", "noted"), [
    ("0.9000", "0.4000", True),  # 0.4 < 0.5 and <= half of 0.9, though >= 1.5 * 0.1
    ("0.8500", "0.4500", False),  # 0.45 < 0.5 but above half of 0.85 and 1.5 * 0.1
    ("0.9500", "0.5500", False),  # not below the flag threshold
    ("0.9000", "0.1400", True),  # 0.14 < 1.5 * 0.1: no better than a uniform map
    ("0.1000", "0.1000", False),  # both clusters: the whole class, which its flag covers
])
def test_the_background_note_by_hand(tmp_path: Path, inside: str, outside: str,
                                     noted: bool) -> None:
    car = car_clusters(tmp_path, inside, outside)["per_class"]["car"]
    assert car["background"] == ([0] if noted else [])
    assert ("note" in car["clusters"][0]) is noted


def test_the_report_shows_advice_cluster_figures_and_lists_background_images(
        tmp_path: Path) -> None:
    path_maps = tmp_path / "audit"
    data = car_clusters(path_maps, inside="0.8000", outside="0.1200", area="0.2000")
    results = path_maps / "results.csv"
    summary = summarize(results, THRESHOLDS)
    summary.clusters = cluster_classes(results, path_maps, 1000)
    summary.data["clusters"] = data
    members = data["per_class"]["car"]["clusters"][0]["members"]
    summary.cluster_rows = rows_at(results, set(members))
    summary.data["advice"] = advise(summary.data)
    write_report(summary, path_maps / "report.html", {}, path_maps)
    page = (path_maps / "report.html").read_text()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    # car: mean (21 * 0.12 + 9 * 0.8) / 30 = 0.324 < 0.5, 27 of 30 right.
    assert "attention mostly outside the object, predictions mostly right" in text
    assert "collect car images on other backgrounds" in text
    assert "0.12 / 0.80" in text and "0.86 / 1.00" in text
    assert "cluster 1: these 21 images are explained by the background" in text
    assert all(f">bg{i}.png</a>" in page for i in range(21))
    assert not any(f">car{i}.png</a>" in page for i in range(9))
