"""Detection bundles in jobs, run without a broker: the message's ``max_detections`` and
detector targets, the record (a row per detection, its box in the image's own pixels),
its files as ``onnxcam explain`` names them, maps held against the in-process engine,
bad targets per image and hostile detection bundles per job."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from checks import assert_close
from hostile_bundles import detector_output_reshaped, with_metadata
from PIL import Image
from test_job_targets import documented_keys, run, stored
from tiny_detectors import LABELS, SIZE, tiny_yolo

import onnxcam
from onnxcam.bundle import read_bundle_info
from onnxcam.engine import Explainer, detections
from onnxcam.engine.targets import TOP_1
from onnxcam.errors import BadTargetError, BundleError, MalformedJobError
from onnxcam.worker.client import download
from onnxcam.worker.image_targets import image_targets
from onnxcam.worker.message import ImageRef, JobSpec, parse_job
from onnxcam.worker.records import DETECTIONS, detection_file_names, is_detection, record_rows
from onnxcam.worker.settings import load_settings
from onnxcam.worker.store import Store

# The keys of a detection's row: a row's of several targets, and explain --json's own.
ROW_KEYS = {"target", "target_name", "label", "flat", "files", "box", "score", "class",
            "anchor", "rank"}
IMAGE_KEYS = {"job", "index", "image", "status", "bundle", "method", "image_size",
              "timings", "logits"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("job-detections")


@pytest.fixture(scope="module")
def bundle(folder: Path) -> Path:
    path = folder / "tiny.cam.onnx"
    onnxcam.export(tiny_yolo(), path, preprocess="unit")
    return path


@pytest.fixture(scope="module")
def explainer(bundle: Path) -> Explainer:
    return Explainer(bundle, device="cpu")


@pytest.fixture(scope="module")
def images(folder: Path) -> list[Path]:
    """A 24 x 40 image (letterboxed into the 16 x 16 input) and a 16 x 16 one."""
    rng = np.random.default_rng(11)
    paths = []
    for index, (height, width) in enumerate([(24, 40), (SIZE, SIZE)]):
        paths.append(folder / f"img{index}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(paths[-1])
    return paths


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def spec_for(store: Store, bundle: Path | bytes, images: list[Path], targets: list[Any],
             max_detections: int | None = None, job: str = "job-1", **extra: Any) -> JobSpec:
    sha = store.put_bundle(bundle if isinstance(bundle, bytes) else bundle.read_bytes())
    refs = [ImageRef(path.name, path=str(path)) for path in images]
    return JobSpec(job, sha, refs, "gradcam", targets, max_detections=max_detections,
                   **extra)


# -- pure functions ---------------------------------------------------------------------


MESSAGE = {"v": 1, "bundle": "f" * 64, "method": "gradcam", "images": [{"path": "a"}]}


def test_max_detections_in_messages() -> None:
    for value in (1, 7, 1000):
        spec = parse_job({**MESSAGE, "max_detections": value}, "id")
        assert spec.max_detections == value
        assert parse_job(json.loads(json.dumps(spec.to_message())), "id") == spec
    old = parse_job(MESSAGE, "id")
    assert old.max_detections is None and "max_detections" not in old.to_message()
    for bad in (0, -3, 1001, 10**12, "5", True, 2.0, [3], {"n": 3}):
        with pytest.raises(MalformedJobError, match="max_detections must be an int in "
                                                    r"\[1, 1000\]"):
            parse_job({**MESSAGE, "max_detections": bad}, "id")


def test_detector_targets_in_messages(bundle: Path) -> None:
    info = read_bundle_info(bundle)
    read: list[str] = []

    def mask_of(reference: str) -> np.ndarray:
        read.append(reference)
        return np.ones((SIZE, SIZE), bool)

    assert image_targets(None, info, mask_of) == [TOP_1]
    assert image_targets("dog", info, mask_of) == [1]
    assert image_targets(2, info, mask_of) == [2]
    assert image_targets(["top:3", "owl"], info, mask_of) == ["top:3", 2]
    assert image_targets("top:1000", info, mask_of) == ["top:1000"]  # not bounded by K
    bad = [{"contrast": [0, 1]}, {"region": 0, "mask": "/no/such/mask.png"}, {"region": 1},
           {"weights": [1.0, 0.0, 0.0]}, "all-positive", "top:0", "top:1001", -1, 3, "eel",
           [None], [], True, 2.5]
    for entry in bad:
        with pytest.raises(BadTargetError):
            image_targets(entry, info, mask_of)
    assert read == []  # a region's mask is refused unread


def test_record_rows_of_a_detection_record() -> None:
    image = {"job": "j", "index": 0, "image": "a.png", "status": "ok", "logits": None}
    rows = [{"target": 1, "target_name": "dog#0", "label": "dog", "class": 1, "rank": 0,
             "box": [1.0, 2.0, 3.0, 4.0], "score": 0.9, "anchor": 7, "flat": False,
             "files": {}},
            {"target": 0, "target_name": "cat#2", "label": "cat", "class": 0, "rank": 2,
             "box": [0.0, 0.0, 5.0, 5.0], "score": 0.5, "anchor": 9, "flat": False,
             "files": {}}]
    flat = record_rows({**image, DETECTIONS: rows})
    assert flat == [{**image, **row} for row in rows]
    assert all(DETECTIONS not in row and is_detection(row) for row in flat)
    nothing = {**image, DETECTIONS: []}
    assert record_rows(nothing) == [nothing]
    assert detection_file_names(flat) == ["0.dog", "2.cat"]
    assert detection_file_names([{"rank": 0, "label": "a/b c"}] * 2) == ["0.a_b_c",
                                                                       "0.a_b_c-1"]
    # Records of other bundles read as before: one class, several targets, none found.
    one = {**image, "target": 3, "label": "3", "flat": False, "files": {}}
    several = {**image, "targets": [{"target": 1, "target_name": "1", "label": "1"}]}
    assert record_rows(one) == [one] and not is_detection(one)
    assert record_rows(several) == [{**image, "target": 1, "target_name": "1", "label": "1"}]
    assert not is_detection(record_rows(several)[0])


# -- the job body -----------------------------------------------------------------------


def test_rows_are_the_engines_detections(bundle: Path, explainer: Explainer,
                                         images: list[Path], store: Store,
                                         tmp_path: Path) -> None:
    """Every detection (3 kept) of the letterboxed image, the two best of the square one;
    maps against the in-process Explainer's, boxes back in each image's own pixels by
    hand: the 24 x 40 image is 10 x 16 (rounded) in the input, three rows of grey above
    it, so a box goes back by minus 3 rows, then times 40/16 across and 24/10 down."""
    rows = run(spec_for(store, bundle, images, [None, "top:2"], max_detections=3), store,
               images[0].parent)
    first = explainer.explain(str(images[0]), max_detections=3)
    second = explainer.explain(str(images[1]), targets="top:2", max_detections=3)
    assert [r["index"] for r in rows] == [0, 0, 0, 1, 1]
    assert set().union(*map(set, rows)) <= documented_keys()
    hand = [(np.array([0, 3, 0, 3]), np.array([40 / SIZE, 24 / 10] * 2)),
            (np.zeros(4), np.ones(4))]
    for image, expected in enumerate([first, second]):
        mine = [r for r in rows if r["index"] == image]
        offset, scale = hand[image]
        for position, (row, found) in enumerate(zip(mine, expected.detections)):
            assert set(row) == IMAGE_KEYS | ROW_KEYS
            assert row["logits"] is None and row["image_size"] == [[24, 40], [SIZE, SIZE]][image]
            assert (row["target_name"], row["target"], row["class"], row["label"],
                    row["anchor"], row["rank"]) == (f"{found.label}#{found.rank}", found.cls,
                                                    found.cls, LABELS[found.cls], found.anchor,
                                                    found.rank)
            assert row["score"] == pytest.approx(found.score, rel=1e-6)
            assert_close(row["box"], (np.array(found.box) - offset) * scale, 1e-3, "box")
            assert_close(stored(store, row, "raw"), expected.raw[position], 1e-6, "raw map")
            assert row["flat"] == bool(expected.flat[position])
            heatmap = stored(store, row, "heatmap")
            assert heatmap.shape == tuple(row["image_size"])
            if image == 1:  # square: no padding, the engine's heatmap as it is
                assert_close(heatmap, expected.heatmaps[position], 1e-3, "heatmap")
            overlay = Image.open(io.BytesIO(store.get(store.owns(row["files"]["overlay"]))))
            assert overlay.size == (row["image_size"][1], row["image_size"][0])
    names = set(store.names("jobs/job-1/"))
    assert {f"00000.{r}.{first.detections[r].label}{suffix}" for r in range(3)
            for suffix in (".npy", ".png", ".raw.npy")} <= names
    assert "00000.npy" not in names and "00001.npy" not in names
    summary = json.loads(store.get("jobs/job-1/summary.json"))
    assert [line["rows"] for line in summary["images"]] == [3, 2]
    # ``result --out``: the files as ``onnxcam explain`` names them, a record each.
    settings = load_settings(store_url=store.url)
    download("job-1", tmp_path / "out", settings)
    for row in rows:
        stem = tmp_path / "out" / f"img{row['index']}.{row['rank']}.{row['label']}"
        assert_close(np.load(f"{stem}.raw.npy"), stored(store, row, "raw"), 0, "raw file")
        assert json.loads(Path(f"{stem}.json").read_text())["box"] == row["box"]


def test_an_image_with_no_detection(bundle: Path, images: list[Path], store: Store,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detections, "CONFIDENCE", 0.9999)
    rows = run(spec_for(store, bundle, images[:1], [None]), store, images[0].parent)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0][DETECTIONS] == []
    assert set(rows[0]) == IMAGE_KEYS | {DETECTIONS}
    assert sorted(store.names("jobs/job-1/")) == ["00000.json", "summary.json"]


def test_bad_detector_targets_end_their_image_only(bundle: Path, images: list[Path],
                                                   store: Store) -> None:
    cases = {"contrast": {"contrast": [0, 1]}, "all-positive": "all-positive",
             "region with a missing mask": {"region": 0, "mask": "/no/such/mask.png"},
             "weights": {"weights": [0.0] * 960}, "top:0": "top:0", "top:1001": "top:1001",
             "no class -1": -1, "class 3 of 3": 3, "unknown label": "eel"}
    paths = [images[1]] * len(cases) + [images[1]]
    rows = run(spec_for(store, bundle, paths, [*cases.values(), "owl"], max_detections=5),
               store, images[0].parent)
    codes = {name: row["error"]["code"] for name, row in zip(cases, rows)}
    assert codes == dict.fromkeys(cases, "bad_target")
    assert all(len(row["error"]["message"]) < 600 for row in rows[:len(cases)])
    good = rows[len(cases):]
    assert good and all(r["status"] == "ok" and r["label"] == "owl" for r in good)


def test_faithfulness_is_refused_for_a_detector(bundle: Path, images: list[Path],
                                                store: Store) -> None:
    with pytest.raises(MalformedJobError, match="detection bundle"):
        run(spec_for(store, bundle, images[:1], [None], faithfulness_steps=4), store,
            images[0].parent)


def test_hostile_detection_bundles_end_the_job(bundle: Path, images: list[Path],
                                               store: Store) -> None:
    """Metadata and graph at odds: refused when the bundle is read (its declared shapes),
    or when it first runs (sizes its graph leaves free), never mid-way as a crash."""
    labels = json.dumps([*LABELS, "eel"])
    refused_at_load = {
        "no boxes": detector_output_reshaped(bundle, "boxes", None),
        "boxes of rank 2": detector_output_reshaped(bundle, "boxes", [0, -1]),
        "logits of rank 2": detector_output_reshaped(bundle, "logits", [0, -1]),
        "four classes": with_metadata(bundle, num_classes="4", labels=labels),
    }
    for name, data in refused_at_load.items():
        with pytest.raises(BundleError, match="detection bundle"):
            run(spec_for(store, data, images[:1], [None], job=f"job-{len(name)}"), store,
                images[0].parent)
    fewer = detector_output_reshaped(bundle, "boxes", [0, -1, 4], anchors=100)
    with pytest.raises(BundleError, match="gave logits"):
        run(spec_for(store, fewer, images[:1], [None], job="job-fewer"), store,
            images[0].parent)



@pytest.mark.slow
@pytest.mark.torch
def test_a_torchvision_detector_job(tmp_path: Path, store: Store) -> None:
    """A bundle that decodes its own detections (SSDlite, as its users export it) in a
    job: a row per detection, ranked as the model ranks them, its map the in-process
    engine's, its box the model's own (the image is the bundle's size: no resizing)."""
    pytest.importorskip("torchvision")
    import torchvision_detectors as tv

    name = "ssdlite320_mobilenet_v3_large"
    detector = tv.build(name, tmp_path)
    bundle = tmp_path / "ssd.cam.onnx"
    onnxcam.export(detector.path, bundle)
    path = tmp_path / "ssd.png"
    Image.fromarray(detector.image).save(path)
    rows = run(spec_for(store, bundle, [path], ["top:3"], max_detections=5), store, tmp_path)
    want = Explainer(bundle, device="cpu").explain(str(path), targets="top:3",
                                                   max_detections=5)
    assert len(rows) == len(want.detections) == 3
    for position, (row, found) in enumerate(zip(rows, want.detections)):
        assert (row["rank"], row["anchor"], row["class"]) == (position, found.anchor,
                                                              found.cls)
        assert row["score"] == pytest.approx(found.score, rel=1e-6)
        assert_close(row["box"], np.array(found.box), 1e-2, "box")
        assert_close(stored(store, row, "raw"), want.raw[position], 1e-6, "raw map")
