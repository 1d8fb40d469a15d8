"""Detection bundles from a tiny graph written as ultralytics exports YOLO (raw head, no
NMS, one output [N, 4 + K, A], its metadata): what the exporter finds in it, the boxes
and logits against the source's own output, gradients of one detection against the
head worked by hand, and what is refused. The real YOLOv8n and YOLO11n are in
``test_detectors_yolo.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tiny_detectors import (
    ANCHORS,
    CLASSES,
    LABELS,
    METADATA,
    SIZE,
    WIDTH,
    images,
    source_output,
    tiny_yolo,
)

import onnxcam
from onnxcam.bundle import (
    HEAD_NONE,
    INPUT_IMAGE,
    INPUT_TARGET,
    INPUT_TARGET_WEIGHTS,
    OUTPUT_ACTIVATIONS,
    OUTPUT_ANCHORS,
    OUTPUT_BOXES,
    OUTPUT_GRADIENTS,
    OUTPUT_LOGITS,
    RESIZE_LETTERBOX,
    read_bundle_info,
)
from onnxcam.errors import ExportError, UnsupportedModelError
from onnxcam.runtime import cpu_session


def run(bundle: Path, pixels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = cpu_session(bundle.read_bytes())
    names = [OUTPUT_LOGITS, OUTPUT_BOXES, OUTPUT_ACTIVATIONS, OUTPUT_GRADIENTS]
    out = session.run(names, {INPUT_IMAGE: pixels, INPUT_TARGET: np.zeros(len(pixels), np.int64),
                              INPUT_TARGET_WEIGHTS: weights})
    return dict(zip(names, out))


@pytest.fixture(scope="module", params=[True, False], ids=["concat", "sliced"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[onnx.ModelProto, Path]:
    model = tiny_yolo(concat_boxes=request.param)
    bundle = tmp_path_factory.mktemp("tiny_yolo") / "tiny.cam.onnx"
    onnxcam.export(model, bundle, preprocess="unit")
    return model, bundle


def test_a_yolo_export_becomes_an_anchors_bundle(tiny: tuple[onnx.ModelProto, Path]) -> None:
    info = read_bundle_info(tiny[1])
    assert (info.output, info.head, info.num_classes, info.gradient) == \
        (OUTPUT_ANCHORS, HEAD_NONE, CLASSES, "analytic")
    assert tuple(info.labels) == LABELS  # the model's own names
    # The larger of the two maps the head reads.
    assert info.target_layer == "/model.0/act/Mul"
    # The scores are found before the Concat whether the box rows come in one part or
    # two, so each level's stack is found and gets its local head.
    assert [(level.first, level.local) for level in info.levels] == [(0, True), (256, True)]
    assert info.batch_size == 0 and info.head_inputs
    assert info.resize == RESIZE_LETTERBOX  # as ultralytics' predict feeds it


def test_logits_are_the_scores_and_boxes_their_corners(tiny: tuple[onnx.ModelProto, Path]
                                                       ) -> None:
    model, bundle = tiny
    pixels = images(2)
    want = source_output(model, pixels)
    out = run(bundle, pixels, np.ones((2, CLASSES, ANCHORS), np.float32))
    np.testing.assert_allclose(out[OUTPUT_LOGITS], want[:, 4:], rtol=1e-6, atol=1e-6)
    centre, size = want[:, :2].transpose(0, 2, 1), want[:, 2:4].transpose(0, 2, 1)
    corners = np.concatenate([centre - size / 2, centre + size / 2], axis=2)
    np.testing.assert_allclose(out[OUTPUT_BOXES], corners, rtol=1e-6, atol=1e-5)


def test_a_detections_gradient_is_the_head_worked_by_hand(tiny: tuple[onnx.ModelProto, Path]
                                                          ) -> None:
    """A stride-1 anchor's score is sigmoid(w_c . x[:, y, x] + b_c) of the layer's map at
    that anchor alone: its gradient is s (1 - s) w_c there and zero elsewhere."""
    model, bundle = tiny
    weights_of = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = weights_of["/model.2/cv3.0/Conv.w"][:, :, 0, 0].astype(np.float64)
    cls, anchor = 2, 37
    seed = np.zeros((1, CLASSES, ANCHORS), np.float32)
    seed[0, cls, anchor] = 1.0
    out = run(bundle, images(1), seed)
    score = float(out[OUTPUT_LOGITS][0, cls, anchor])
    want = np.zeros((WIDTH, SIZE, SIZE))
    # The stride-2 level reads the same map too: its anchors are not this one.
    want[:, anchor // SIZE, anchor % SIZE] = score * (1 - score) * w[cls]
    np.testing.assert_allclose(out[OUTPUT_GRADIENTS][0], want, atol=1e-7)


def test_detectors_get_no_finite_differences(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="detector .* needs analytic gradients"):
        onnxcam.export(tiny_yolo(), tmp_path / "b.onnx", gradient="fd")


def test_a_softmax_head_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="probabilities its head outputs"):
        onnxcam.export(tiny_yolo(), tmp_path / "b.onnx", head="softmax")


def test_an_export_with_nms_is_refused(tmp_path: Path) -> None:
    metadata = {**METADATA, "args": "{'nms': True}"}
    with pytest.raises(UnsupportedModelError, match="nms=False"):
        onnxcam.export(tiny_yolo(metadata=metadata), tmp_path / "b.onnx")


def test_without_the_metadata_the_output_is_refused_as_before(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="neither a score vector"):
        onnxcam.export(tiny_yolo(metadata={}), tmp_path / "b.onnx")


def test_the_cut_trunk_gives_the_boxes_and_the_head_each_detection(
        tiny: tuple[onnx.ModelProto, Path]) -> None:
    """The engine's cut (``head_cut``): the trunk once, with the boxes NMS needs, then
    one row per detection through the head, as the whole bundle gives them."""
    from onnxcam.bundle import SEED
    from onnxcam.head_cut import split_at_layers

    model, bundle = tiny
    info = read_bundle_info(bundle)
    trunk, head = split_at_layers(onnx.load(str(bundle)), info.head_inputs)
    pixels = images(1)
    trunk_session = cpu_session(trunk.SerializeToString())
    names = [o.name for o in trunk_session.get_outputs()]
    values = dict(zip(names, trunk_session.run(names, {INPUT_IMAGE: pixels})))
    seeds = np.zeros((3, CLASSES, ANCHORS), np.float32)
    for row, (cls, anchor) in enumerate([(0, 5), (2, 200), (1, ANCHORS - 1)]):
        seeds[row, cls, anchor] = 1.0
    feeds = {h.name: np.repeat(values[h.name], 3, axis=0) if h.batched else values[h.name]
             for h in info.head_inputs if h.name != SEED}
    (cut,) = cpu_session(head.SerializeToString()).run([OUTPUT_GRADIENTS],
                                                       {**feeds, SEED: seeds})
    whole = run(bundle, np.repeat(pixels, 3, axis=0), seeds)
    np.testing.assert_allclose(values[OUTPUT_BOXES], whole[OUTPUT_BOXES][:1], rtol=1e-6)
    np.testing.assert_allclose(cut, whole[OUTPUT_GRADIENTS], rtol=1e-5, atol=1e-7)


def test_without_module_paths_the_layer_must_be_named(tmp_path: Path) -> None:
    model = tiny_yolo()
    for each in model.graph.node:
        each.name = ""
    with pytest.raises(UnsupportedModelError, match="pass --layer"):
        onnxcam.export(model, tmp_path / "b.onnx")
    onnxcam.export(model, tmp_path / "b.onnx", layer="/model.0/act/Mul_output_0")
    assert read_bundle_info(tmp_path / "b.onnx").output == OUTPUT_ANCHORS


def test_layers_stars_the_detectors_default(tmp_path: Path) -> None:
    """``onnxcam layers`` marks the layers the export takes (the maps the head's levels
    read), not the output's Concat, which the generic rule would take for a map."""
    from click.testing import CliRunner

    from onnxcam.cli import main

    source = tmp_path / "tiny.onnx"
    onnx.save(tiny_yolo(), source)
    result = CliRunner().invoke(main, ["layers", str(source)])
    assert result.exit_code == 0, result.output
    starred = [line.split()[1] for line in result.output.splitlines() if line.startswith("*")]
    assert starred == ["/model.0/act/Mul", "/model.1/act/Mul"]
