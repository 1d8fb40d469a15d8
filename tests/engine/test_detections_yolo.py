"""The engine on YOLOv8n exported as its users export it (dynamic: the trunk once, the
head per detection; static: batch 1, the whole bundle once per detection): every
detection of one ``explain`` call against ultralytics' own NMS and its map against
Grad-CAM by hand in float64 torch autograd (``ultralytics_models.grad_cam``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnxcam

if importlib.util.find_spec("ultralytics") is None:  # found, not imported at collection
    pytest.skip("ultralytics is not installed", allow_module_level=True)
pytest.importorskip("torch")

import ultralytics_models as um  # noqa: E402 - after the skips: it needs both
import zoo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]

MAP_TOLERANCE = 2e-3  # max |a - b| of min-max normalised maps (issue 22)
NAME = "yolov8n"


@pytest.fixture(scope="module")
def yolo() -> tuple[Any, Any]:
    return um.build(NAME)


@pytest.fixture(scope="module", params=[True, False], ids=["dynamic", "static"])
def bundle(request: pytest.FixtureRequest, yolo: tuple[Any, Any],
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(NAME)
    source = um.export_onnx(yolo[0], folder / f"{NAME}.onnx", dynamic=request.param)
    path = folder / f"{NAME}.cam.onnx"
    size = {"input_size": (um.SIZE, um.SIZE)} if request.param else {}
    onnxcam.export(source, path, preprocess="unit", **size)
    return path


def test_every_detection_matches_ultralytics_and_grad_cam_by_hand(
        yolo: tuple[Any, Any], bundle: Path) -> None:
    import torch
    from ultralytics.utils.nms import non_max_suppression

    model = yolo[1]
    image = um.test_image()
    res = onnxcam.Explainer(bundle, device="cpu").explain(image[None])
    with torch.no_grad():
        raw = model(um.unit_input(image[None]))[0]
    kept, anchors = non_max_suppression(raw, um.CONF, 0.7, max_det=300, return_idxs=True)
    assert [d.anchor for d in res.detections] == anchors[0].tolist()
    assert [d.cls for d in res.detections] == kept[0][:, 5].int().tolist()
    np.testing.assert_allclose([d.box for d in res.detections],
                               np.clip(kept[0][:, :4].numpy(), 0, um.SIZE), atol=1e-2)
    assert len(res.detections) >= 3  # the calibration left several to explain
    pairs = [(d.cls, d.anchor) for d in res.detections]
    reference = um.grad_cam(model, um.STRIDE8[NAME], image, pairs)
    errors = np.abs(zoo.normalise(res.raw) - zoo.normalise(reference)).max(axis=(1, 2))
    assert errors.max() <= MAP_TOLERANCE, (pairs, errors)
    assert (reference.max(axis=(1, 2)) > 0).all()  # no flat map passes by matching one
