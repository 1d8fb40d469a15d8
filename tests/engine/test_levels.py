"""A detector explained per level: crops around cells and their gradients put back
(worked by hand), the metadata a hostile bundle may not claim, and the exporter's own
check, which must drop a local head that does not hold."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_detectors import images, tiny_yolo

import onnxcam
from onnxcam.bundle import KEY_LEVELS, BundleInfo, Level, read_bundle
from onnxcam.crops import crop_sums, crops, placed
from onnxcam.errors import BundleError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("levels") / "tiny.cam.onnx"
    onnxcam.export(tiny_yolo(), path, preprocess="unit")
    return path


def test_a_crop_at_a_corner_is_zero_beyond_the_map() -> None:
    level = Level(0, 0, 3, 4, radius=1, local=True)
    maps = np.arange(2 * 12, dtype=np.float32).reshape(1, 2, 3, 4)
    crop, mask = crops(maps, np.array([0, 0]), [0, 6], level)  # cells (0, 0) and (1, 2)
    # Channel 0 is 0..11 row by row: around (0, 0) only 0, 1, 4, 5 are on the map.
    np.testing.assert_array_equal(crop[0, 0], [[0, 0, 0], [0, 0, 1], [0, 4, 5]])
    np.testing.assert_array_equal(mask[0, 0], [[0, 0, 0], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(crop[1, 1], [[13, 14, 15], [17, 18, 19], [21, 22, 23]])
    assert mask[1].min() == 1


def test_crop_gradients_go_back_where_they_were_cut() -> None:
    level = Level(0, 0, 3, 4, radius=1, local=True)
    gradients = np.ones((2, 1, 3, 3), np.float32)
    whole = placed(gradients, [0, 11], level)  # the top-left and bottom-right corners
    np.testing.assert_array_equal(whole[0, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(whole[1, 0], [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    _, mask = crops(np.zeros((1, 1, 3, 4), np.float32), np.array([0, 0]), [0, 11], level)
    np.testing.assert_array_equal(crop_sums(gradients, mask), whole.sum(axis=(2, 3)))


def test_the_bundle_records_its_levels(bundle: Path) -> None:
    info = read_bundle(bundle).info
    # tiny_yolo: a 16x16 level at /model.0 and an 8x8 one at /model.1, 1x1 convolutions.
    assert info.levels == (Level(0, 0, 16, 16, 0, True), Level(1, 256, 8, 8, 0, True))
    assert [e.name for e in info.layers] == ["/model.0/act/Mul", "/model.1/act/Mul"]


@pytest.mark.parametrize("levels, problem", [
    ([{"layer": 0, "first": 0, "height": 16, "width": 16, "radius": 33, "local": True}],
     "that no detector has"),
    ([{"layer": 2, "first": 0, "height": 16, "width": 16, "radius": 0, "local": True}],
     "that no detector has"),
    ([{"layer": 0, "first": 0, "height": 16, "width": 16, "radius": 0, "local": True},
      {"layer": 1, "first": 200, "height": 8, "width": 8, "radius": 0, "local": True}],
     "that no detector has"),
    ([{"layer": 0, "first": 0, "height": 0, "width": 16, "radius": 0, "local": True}],
     "that no detector has"),
    ([{"layer": 0, "first": 0}], "malformed"),
])
def test_hostile_levels_are_refused(bundle: Path, tmp_path: Path, levels: list[object],
                                    problem: str) -> None:
    model = onnx.load(str(bundle))
    next(p for p in model.metadata_props if p.key == KEY_LEVELS).value = json.dumps(levels)
    with pytest.raises(BundleError, match=problem):
        read_bundle(model.SerializeToString())


def test_levels_belong_to_detectors_only(bundle: Path) -> None:
    props = dict(BundleInfo.from_metadata(
        {p.key: p.value for p in onnx.load(str(bundle)).metadata_props}).to_metadata())
    props["onnxcam.output"] = "classes"
    with pytest.raises(BundleError, match="only detectors"):
        BundleInfo.from_metadata(props)


def test_a_level_whose_grid_is_not_its_maps_is_refused(bundle: Path) -> None:
    model = onnx.load(str(bundle))
    entry = next(p for p in model.metadata_props if p.key == KEY_LEVELS)
    levels = json.loads(entry.value)
    levels[1].update(height=4, width=16)  # 64 anchors still, on another grid
    entry.value = json.dumps(levels)
    explainer = onnxcam.Explainer(model.SerializeToString(), device="cpu")
    with pytest.raises(BundleError, match="claims a 4x16 grid"):
        explainer.explain(images(1), max_detections=300)


def test_the_export_drops_local_heads_that_do_not_hold(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A local head whose crop misses part of what a score reads (its convolutions'
    reach undercounted) gives other gradients than the whole head: the export's check
    must see it and keep the levels without local heads (the engine then runs the
    whole head)."""
    from onnxcam.exporter.passes import local_heads

    monkeypatch.setattr(local_heads, "conv_extent", lambda node: 0)
    model = tiny_yolo()
    for node in model.graph.node:  # 3x3 class convolutions: each score reads 3x3 cells
        if "/cv3." in node.name:
            weight = next(t for t in model.graph.initializer if t.name == node.input[1])
            array = np.random.default_rng(1).normal(0, 0.5, (*weight.dims[:2], 3, 3))
            weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))
            for attribute in node.attribute:
                if attribute.name == "kernel_shape":
                    attribute.ints[:] = [3, 3]
                if attribute.name == "pads":
                    attribute.ints[:] = [1, 1, 1, 1]
    with caplog.at_level(logging.WARNING):
        onnxcam.export(model, tmp_path / "b.cam.onnx", preprocess="unit")
    assert "local heads do not hold" in caplog.text
    levels = read_bundle(tmp_path / "b.cam.onnx").info.levels
    assert [level.local for level in levels] == [False, False]
    monkeypatch.undo()  # the same model with its reach counted: the heads hold
    onnxcam.export(model, tmp_path / "c.cam.onnx", preprocess="unit")
    levels = read_bundle(tmp_path / "c.cam.onnx").info.levels
    assert [(level.local, level.radius) for level in levels] == [(True, 1), (True, 1)]


@pytest.mark.parametrize("method", ["xgradcam", "gradcam++", "eigencam"])
def test_local_heads_give_the_whole_heads_maps_in_chunks(bundle: Path, method: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Methods that read the gradient maps get them a few rows at a time; each row's
    map equals the whole head's at the row's own level (local heads switched off)."""
    from onnxcam.engine import explainer as explainer_module

    pixels = images(2)
    whole_heads = onnxcam.Explainer(bundle, device="cpu")
    monkeypatch.setattr(explainer_module, "has_local_heads", lambda info: False)
    want = whole_heads.explain(pixels, method=method, max_detections=5)
    monkeypatch.undo()
    monkeypatch.setattr(explainer_module, "HEAD_CHUNK", 2)
    got = onnxcam.Explainer(bundle, device="cpu").explain(pixels, method=method,
                                                          max_detections=5)
    assert [d.anchor for d in got.detections] == [d.anchor for d in want.detections]
    assert len(got.detections) == 10 and {d.anchor >= 256 for d in got.detections} == \
        {True, False}  # both levels, in chunks of 2
    np.testing.assert_allclose(got.raw, want.raw, rtol=1e-5, atol=1e-6)


def test_levels_that_miss_anchors_are_refused(tmp_path: Path) -> None:
    """A bundle whose levels leave anchors out would give them empty maps: refused."""
    path = tmp_path / "one.cam.onnx"
    onnxcam.export(tiny_yolo(), path, preprocess="unit", layer="/model.0/act/Mul")
    model = onnx.load(str(path))
    assert not read_bundle(path).info.levels  # one layer: no levels
    model.metadata_props.add(key=KEY_LEVELS, value=json.dumps(
        [{"layer": 0, "first": 0, "height": 16, "width": 16, "radius": 0, "local": False}]))
    explainer = onnxcam.Explainer(model.SerializeToString(), device="cpu")
    with pytest.raises(BundleError, match="levels hold 256 anchors; its logits have 320"):
        explainer.explain(images(1), method="scorecam")
