"""The engine on detection bundles (tiny ultralytics-shaped graph): detections as
ultralytics' predict picks them (NMS against torchvision's and ultralytics' own), each a
row whose map is the whole bundle's fed one-hot ``target_weights`` at its class and
anchor, the targets that pick them, and ``onnxcam explain``'s files and JSON lines.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_detectors import ANCHORS, CLASSES, LABELS, SIZE, images, source_output, tiny_yolo

import onnxcam
from onnxcam import BadTargetError, Contrast, Explainer, Weighting
from onnxcam.bundle import (
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_BOXES,
    OUTPUT_CAM,
    OUTPUT_LOGITS,
)
from onnxcam.cli import main
from onnxcam.engine import detections
from onnxcam.engine.detections import nms
from onnxcam.engine.maps import resize_maps
from onnxcam.engine.sessions import Sessions
from onnxcam.runtime import cpu_session


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return tiny_yolo()


@pytest.fixture(scope="module")
def bundle(model: onnx.ModelProto, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_detector") / "tiny.cam.onnx"
    onnxcam.export(model, path, preprocess="unit")
    return path


@pytest.fixture(scope="module")
def explainer(bundle: Path) -> Explainer:
    return Explainer(bundle, device="cpu")


def whole(bundle: Path, pixels: np.ndarray, seeds: np.ndarray) -> dict[str, np.ndarray]:
    """The whole bundle in plain onnxruntime, a row per seed (``pixels``: one per row):
    logits, boxes, and the cam at each level's layer (``cam``, ``cam.1``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = cpu_session(bundle.read_bytes())
    names = [OUTPUT_LOGITS, OUTPUT_BOXES, OUTPUT_CAM, f"{OUTPUT_CAM}.1"]
    out = session.run(names, {INPUT_IMAGE: pixels, INPUT_TARGET: np.zeros(len(pixels), np.int64),
                              INPUT_TARGET_WEIGHTS: seeds})
    return dict(zip(names, out))


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    centres = rng.uniform(0, 100, (count, 2))
    sizes = rng.uniform(5, 40, (count, 2))
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms_is_torchvisions_batched_nms(iou: float) -> None:
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        boxes, scores = random_boxes(rng, 400), rng.uniform(0, 1, 400).astype(np.float32)
        classes = rng.integers(0, 4, 400)
        want = ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                               torch.from_numpy(classes), iou).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, classes, iou), want)
        np.testing.assert_array_equal(nms(boxes, scores, classes, iou, limit=5), want[:5])


def test_detections_are_ultralytics_predicts(explainer: Explainer, model: onnx.ModelProto
                                             ) -> None:
    """ultralytics' own non_max_suppression on the source model's raw output, with
    predict's defaults: the same anchors, classes and scores, in the same order."""
    pytest.importorskip("torch")
    os.environ.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false",
                       "YOLO_VERBOSE": "false"})
    torch = pytest.importorskip("torch")
    nms_module = pytest.importorskip("ultralytics.utils.nms")
    pixels = images(2)
    raw = torch.from_numpy(source_output(model, pixels))
    kept, anchors = nms_module.non_max_suppression(raw, 0.25, 0.7, max_det=300,
                                                   return_idxs=True)
    res = explainer.explain(pixels)
    for image in range(2):
        found = [d for d, i in zip(res.detections, res.image_index) if i == image]
        assert [d.anchor for d in found] == anchors[image].tolist()
        assert [d.cls for d in found] == kept[image][:, 5].int().tolist()
        np.testing.assert_allclose([d.score for d in found], kept[image][:, 4].numpy(),
                                   rtol=1e-6)
        np.testing.assert_allclose([d.box for d in found],
                                   np.clip(kept[image][:, :4].numpy(), 0, SIZE), atol=1e-4)


def test_rows_are_the_whole_bundle_fed_one_hot(explainer: Explainer, bundle: Path) -> None:
    pixels = images(2)
    res = explainer.explain(pixels, max_detections=4)
    assert res.image_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    seeds = np.zeros((8, CLASSES, ANCHORS), np.float32)
    for row, found in enumerate(res.detections):
        seeds[row, found.cls, found.anchor] = 1.0
    out = whole(bundle, pixels[res.image_index], seeds)
    # Each row at its own level's layer (stride 1: anchors 0 to 255; stride 2 after),
    # the stride-2 map brought to the stride-1 grid.
    fine = SIZE * SIZE
    own = [out[OUTPUT_CAM][row] if found.anchor < fine else
           resize_maps(out[f"{OUTPUT_CAM}.1"][row][None], SIZE, SIZE)[0]
           for row, found in enumerate(res.detections)]
    assert {found.anchor < fine for found in res.detections} == {True, False}
    np.testing.assert_allclose(res.raw, np.maximum(own, 0), rtol=1e-5, atol=1e-6)
    for row, found in enumerate(res.detections):
        image = int(res.image_index[row])
        scores = out[OUTPUT_LOGITS][row]  # [K, A]
        np.testing.assert_allclose(res.logits[row], scores[:, found.anchor], rtol=1e-6)
        assert (found.cls, found.score) == (int(scores[:, found.anchor].argmax()),
                                            pytest.approx(scores.max(axis=0)[found.anchor]))
        assert found.box == pytest.approx(np.clip(out[OUTPUT_BOXES][row, found.anchor], 0,
                                                  SIZE).tolist(), abs=1e-5)
        assert res.target_names[row] == f"{LABELS[found.cls]}#{found.rank}"
        assert res.targets[row] == found.cls
        assert found.rank == row - 4 * image
    # By hand: an image's best detection is its anchor of the highest score, whatever NMS.
    best = res.image_logits.max(axis=1).argmax(axis=1)
    assert [res.detections[0].anchor, res.detections[4].anchor] == best.tolist()


def test_targets_pick_detections(explainer: Explainer) -> None:
    pixels = images(1)
    every = explainer.explain(pixels)
    assert len(every.detections) == 300  # max_detections: the tiny graph finds more
    dogs = explainer.explain(pixels, targets="dog")
    want = [d for d in every.detections if d.label == "dog"]
    assert dogs.detections == want and want
    rows = [every.detections.index(d) for d in want]
    np.testing.assert_allclose(dogs.raw, every.raw[rows], rtol=1e-6)
    top = explainer.explain(pixels, targets=[["top:3", 2]])
    owls = [d for d in every.detections if d.cls == 2]
    assert top.detections == every.detections[:3] + [d for d in owls if d.rank >= 3]
    assert len(set(top.target_names)) == len(top.target_names)


@pytest.mark.parametrize("target", [Contrast("cat", "dog"), "all-positive",
                                    Weighting(np.zeros((CLASSES, ANCHORS))), "top:1001"])
def test_other_targets_are_refused(explainer: Explainer, target: object) -> None:
    with pytest.raises(BadTargetError, match="detection|k must be"):
        explainer.explain(images(1), targets=target)


def test_max_detections_is_checked(explainer: Explainer) -> None:
    with pytest.raises(BadTargetError, match="max_detections"):
        explainer.explain(images(1), max_detections=0)


def test_the_repeat_path_gives_the_cut_paths_rows(bundle: Path, explainer: Explainer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed-batch bundles (and methods that rerun the model) run the whole bundle once
    per detection: the same rows and maps as the trunk once and the head per row."""
    pixels = images(2)
    cut = explainer.explain(pixels, max_detections=5)
    repeated = Explainer(bundle, device="cpu")
    monkeypatch.setattr(Sessions, "can_cut", property(lambda self: False))
    res = repeated.explain(pixels, max_detections=5)
    assert res.detections == cut.detections
    np.testing.assert_allclose(res.raw, cut.raw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.logits, cut.logits, rtol=1e-6)


def test_an_image_without_detections(bundle: Path, explainer: Explainer,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detections, "CONFIDENCE", 0.9999)
    res = explainer.explain(images(2))
    assert (len(res.raw), len(res.detections), res.logits.shape) == (0, 0, (0, CLASSES))
    assert res.image_logits.shape == (2, CLASSES, ANCHORS)


def test_explain_writes_a_map_per_detection(bundle: Path, explainer: Explainer,
                                            tmp_path: Path) -> None:
    """Files <stem>.<rank>.<label>, a JSON line per detection, its box in the image's
    own pixels: the 24x40 image is letterboxed into the 16x16 input as 10x16 (rounded)
    with three rows of grey above it, so a box goes back by minus 3 rows, then times
    40/16 across and 24/10 down."""
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["explain", str(bundle), str(tmp_path / "a.png"),
                                       "--out", str(tmp_path / "out"), "--json",
                                       "--max-detections", "3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    want = explainer.explain([tmp_path / "a.png"], max_detections=3)
    assert len(records) == 3
    for record, found in zip(records, want.detections):
        stem = tmp_path / "out" / f"a.{found.rank}.{found.label}"
        assert record["files"] == [f"{stem}.npy", f"{stem}.png"]
        assert np.load(f"{stem}.npy").shape == (24, 40)
        assert Image.open(f"{stem}.png").size == (40, 24)
        assert explainer.info.resize == "letterbox"
        offset, scale = np.array([0, 3, 0, 3]), np.array([40 / SIZE, 24 / 10] * 2)
        np.testing.assert_allclose(record["box"], (np.array(found.box) - offset) * scale,
                                   atol=0.01)
        assert (record["score"], record["class"], record["label"], record["anchor"]) == \
            (pytest.approx(found.score), found.cls, found.label, found.anchor)
        assert record["target_name"] == found.name


def test_explain_says_when_an_image_has_no_detection(bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detections, "CONFIDENCE", 0.9999)
    Image.fromarray(images(1)[0]).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["explain", str(bundle), str(tmp_path / "a.png"),
                                       "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"image": str(tmp_path / "a.png"), "detections": [],
                                         "files": []}
    assert "no detection" in result.stderr


def test_a_layer_strip_is_refused_for_a_detector_explained_per_level(
        bundle: Path, tmp_path: Path) -> None:
    Image.fromarray(images(1)[0]).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["explain", str(bundle), str(tmp_path / "a.png"),
                                       "--out", str(tmp_path / "out"), "--layers-strip"])
    assert result.exit_code != 0
    assert "own level's layer only" in result.output and "--layer" in result.output
    assert not (tmp_path / "out").exists()
