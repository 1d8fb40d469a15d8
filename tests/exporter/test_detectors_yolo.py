"""Ultralytics YOLOv8n and YOLO11n, exported as their users export them, made into
detection bundles: each of the five best (class, anchor) pairs of an image explained
through ``target_weights`` in plain onnxruntime, against Grad-CAM by hand in float64
torch autograd on the ultralytics model itself; logits and boxes against its output.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxcam.bundle import (
    HEAD_NONE,
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_ANCHORS,
    OUTPUT_BOXES,
    OUTPUT_CAM,
    OUTPUT_LOGITS,
    SEED,
    read_bundle_info,
)
from onnxcam.runtime import cpu_session

# Found, not imported: importing ultralytics at collection would swap Pillow's Image.open
# for every test of the run (ultralytics_models imports it and gives it back).
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics is not installed", allow_module_level=True)
pytest.importorskip("torch")

import ultralytics_models as um  # noqa: E402 - after the skips: it needs both
import zoo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]

MAP_TOLERANCE = 2e-3  # max |a - b| of min-max normalised maps (issue 22)
PAIRS = 5


@pytest.fixture(scope="module", params=[(name, dynamic) for name in um.STRIDE8
                                        for dynamic in (False, True)],
                ids=lambda p: f"{p[0]}-{'dynamic' if p[1] else 'static'}")
def yolo_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[str, Any, Path]:
    """(name, the torch model, its bundle), exported by ultralytics then onnxcam."""
    name, dynamic = request.param
    yolo, model = um.build(name)
    return name, model, um.export_bundle(yolo, name, tmp_path_factory.mktemp(name), dynamic)


def run_rows(bundle: Path, image: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle on ``image`` once per row of ``weights``, in one batch where the
    bundle's batch is free, else one run a row."""
    info = read_bundle_info(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the initializer that is also an input
        session = cpu_session(bundle.read_bytes())
    names = [OUTPUT_LOGITS, OUTPUT_BOXES, OUTPUT_ACTIVATIONS, OUTPUT_CAM]
    chunk = info.batch_size or len(weights)
    runs = []
    for start in range(0, len(weights), chunk):
        rows = weights[start:start + chunk]
        runs.append(session.run(names, {
            INPUT_IMAGE: np.repeat(image[None], len(rows), axis=0),
            INPUT_TARGET: np.zeros(len(rows), np.int64), INPUT_TARGET_WEIGHTS: rows}))
    return {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(names)}


def one_hot(pairs: list[tuple[int, int]], classes: int, anchors: int) -> np.ndarray:
    weights = np.zeros((len(pairs), classes, anchors), np.float32)
    for row, (cls, anchor) in enumerate(pairs):
        weights[row, cls, anchor] = 1.0
    return weights


def torch_output(model: Any, image: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(um.unit_input(image[None]))[0][0].numpy()


def test_bundle_is_a_detection_bundle(yolo_bundle: tuple[str, Any, Path]) -> None:
    name, _, bundle = yolo_bundle
    info = read_bundle_info(bundle)
    assert (info.output, info.head, info.num_classes, info.gradient) == \
        (OUTPUT_ANCHORS, HEAD_NONE, 80, "analytic")
    assert info.batch_size == 0  # static exports too: their [1, C, -1] Reshapes freed
    # The neck's stride-8 output, the module the reference hooks.
    assert info.target_layer.startswith(f"/{um.STRIDE8[name]}/"), info.target_layer


def test_logits_and_boxes_are_the_models(yolo_bundle: tuple[str, Any, Path]) -> None:
    _, model, bundle = yolo_bundle
    image = um.test_image()
    want = torch_output(model, image)
    out = run_rows(bundle, image, one_hot([(0, 0)], 80, want.shape[1]))
    np.testing.assert_allclose(out[OUTPUT_LOGITS][0], want[4:], atol=1e-4)
    centre, size = want[:2].T, want[2:4].T
    corners = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    np.testing.assert_allclose(out[OUTPUT_BOXES][0], corners, rtol=1e-4, atol=1e-2)
    assert (want[4:] > um.CONF).sum() >= 3  # the calibration left findings to explain


def test_five_best_detections_match_grad_cam_by_hand(yolo_bundle: tuple[str, Any, Path]
                                                     ) -> None:
    name, model, bundle = yolo_bundle
    image = um.test_image()
    pairs = um.top_pairs(model, image, PAIRS)
    reference = um.grad_cam(model, um.STRIDE8[name], image, pairs)
    out = run_rows(bundle, image, one_hot(pairs, 80, torch_output(model, image).shape[1]))
    errors = np.abs(zoo.normalise(out[OUTPUT_CAM]) - zoo.normalise(reference)).max(axis=(1, 2))
    assert errors.max() <= MAP_TOLERANCE, (pairs, errors)
    assert (reference.max(axis=(1, 2)) > 0).all()  # no flat map passes by matching one


def test_the_engines_cut_runs_the_trunk_once(yolo_bundle: tuple[str, Any, Path]) -> None:
    """Static and dynamic exports alike (both free the batch): the trunk once for the
    image, the head once per detection (``head_cut``, as the engine runs many targets),
    against the reference maps."""
    import onnx

    from onnxcam.head_cut import split_at_layers

    name, model, bundle = yolo_bundle
    info = read_bundle_info(bundle)
    image = um.test_image()
    pairs = um.top_pairs(model, image, PAIRS)
    trunk, head = split_at_layers(onnx.load(str(bundle)), info.head_inputs)
    boundary = [h for h in info.head_inputs if h.name != SEED]
    values = cpu_session(trunk.SerializeToString()).run([h.name for h in boundary],
                                                        {INPUT_IMAGE: image[None]})
    feeds = {h.name: np.repeat(value, len(pairs), axis=0) if h.batched else value
             for h, value in zip(boundary, values)}
    seeds = one_hot(pairs, 80, torch_output(model, image).shape[1])
    (cams,) = cpu_session(head.SerializeToString()).run([OUTPUT_CAM], {**feeds, SEED: seeds})
    reference = um.grad_cam(model, um.STRIDE8[name], image, pairs)
    errors = np.abs(zoo.normalise(cams) - zoo.normalise(reference)).max(axis=(1, 2))
    assert errors.max() <= MAP_TOLERANCE, (pairs, errors)
