"""The engine on YOLOv8n and YOLO11n exported as their users export them (static and
dynamic: both free the batch): every detection of one ``explain`` call against
ultralytics' own NMS, and its map, at its own level's layer through that level's local
head, against Grad-CAM by hand in float64 torch autograd
(``ultralytics_models.level_grad_cam``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnxcam
from onnxcam.engine.levels import level_of

if importlib.util.find_spec("ultralytics") is None:  # found, not imported at collection
    pytest.skip("ultralytics is not installed", allow_module_level=True)
pytest.importorskip("torch")

import ultralytics_models as um  # noqa: E402 - after the skips: it needs both
import zoo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]

MAP_TOLERANCE = 2e-3  # max |a - b| of min-max normalised maps (issue 22)
CASES = [("yolov8n", True), ("yolov8n", False), ("yolo11n", True)]


@pytest.fixture(scope="module", params=CASES,
                ids=[f"{name}-{'dynamic' if dynamic else 'static'}" for name, dynamic in CASES])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, Any, Path]:
    """(name, the torch model, its bundle)."""
    name, dynamic = request.param
    yolo, model = um.build(name)
    return name, model, um.export_bundle(yolo, name, tmp_path_factory.mktemp(name), dynamic)


def test_every_detection_matches_ultralytics_and_grad_cam_by_hand(
        case: tuple[str, Any, Path]) -> None:
    import torch
    from ultralytics.utils.nms import non_max_suppression

    name, model, bundle = case
    image = um.test_image()
    explainer = onnxcam.Explainer(bundle, device="cpu")
    assert [level.local for level in explainer.info.levels] == [True] * 3
    res = explainer.explain(image[None])
    with torch.no_grad():
        raw = model(um.unit_input(image[None]))[0]
    kept, anchors = non_max_suppression(raw, um.CONF, 0.7, max_det=300, return_idxs=True)
    assert [d.anchor for d in res.detections] == anchors[0].tolist()
    assert [d.cls for d in res.detections] == kept[0][:, 5].int().tolist()
    np.testing.assert_allclose([d.box for d in res.detections],
                               np.clip(kept[0][:, :4].numpy(), 0, um.SIZE), atol=1e-2)
    assert len(res.detections) >= 3  # the calibration left several to explain
    pairs = [(d.cls, d.anchor) for d in res.detections]
    reference = um.level_grad_cam(model, name, image, pairs)
    errors = np.abs(zoo.normalise(res.raw) - zoo.normalise(reference)).max(axis=(1, 2))
    assert errors.max() <= MAP_TOLERANCE, (pairs, errors)
    assert (reference.max(axis=(1, 2)) > 0).all()  # no flat map passes by matching one
    levels = [explainer.info.levels.index(level_of(explainer.info, a)) for _, a in pairs]
    assert len(set(levels)) >= 2, levels  # more than one level's local head is checked
