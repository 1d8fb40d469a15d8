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
from onnx import TensorProto, helper, numpy_helper

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

SIZE, CLASSES, WIDTH = 16, 3, 4
ANCHORS = SIZE * SIZE + (SIZE // 2) ** 2  # a stride-1 and a stride-2 level
LABELS = ("cat", "dog", "owl")
METADATA = {"author": "Ultralytics", "task": "detect", "end2end": "False",
            "names": "{0: 'cat', 1: 'dog', 2: 'owl'}", "args": "{'nms': None}"}


def tiny_yolo(seed: int = 0, concat_boxes: bool = True,
              metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """A SiLU conv trunk (``/model.0``), a strided conv (``/model.1``) and a Detect
    head (``/model.2``) reading both: per level a 1x1 box conv and a 1x1 class conv,
    flattened over the anchors, a sigmoid on the classes, concatenated as ultralytics
    does ([boxes, scores] on axis 1); without ``concat_boxes`` the centres and sizes
    are separate parts of that Concat, as in no export, so the output must be sliced."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def conv(x: str, cin: int, cout: int, name: str, kernel: int = 1, stride: int = 1) -> str:
        w = const(f"{name}.w", rng.normal(0, 0.5, (cout, cin, kernel, kernel)).astype(np.float32))
        b = const(f"{name}.b", rng.normal(0, 0.1, cout).astype(np.float32))
        return node("Conv", [x, w, b], name, kernel_shape=[kernel, kernel],
                    pads=[kernel // 2] * 4, strides=[stride, stride])

    def silu(x: str, name: str) -> str:
        return node("Mul", [x, node("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")

    p1 = silu(conv("images", 3, WIDTH, "/model.0/conv/Conv", 3), "/model.0/act")
    p2 = silu(conv(p1, WIDTH, WIDTH, "/model.1/conv/Conv", 3, 2), "/model.1/act")
    flat = {rows: const(f"shape{rows}", np.array([0, rows, -1], np.int64))
            for rows in (4, CLASSES)}
    boxes, scores = [], []
    for level, x in enumerate((p1, p2)):
        box = conv(x, WIDTH, 4, f"/model.2/cv2.{level}/Conv")
        cls = conv(x, WIDTH, CLASSES, f"/model.2/cv3.{level}/Conv")
        boxes.append(node("Reshape", [box, flat[4]], f"/model.2/Reshape_{level}"))
        scores.append(node("Reshape", [cls, flat[CLASSES]], f"/model.2/Reshape_c{level}"))
    box = node("Concat", boxes, "/model.2/Concat", axis=2)
    box = node("Mul", [box, const("scale", np.array(4.0, np.float32))], "/model.2/Mul")
    score = node("Sigmoid", [node("Concat", scores, "/model.2/Concat_1", axis=2)],
                 "/model.2/Sigmoid")
    parts = [box] if concat_boxes else [
        node("Slice", [box, const(f"s{a}", np.array([a], np.int64)),
                       const(f"e{a}", np.array([a + 2], np.int64)),
                       const(f"x{a}", np.array([1], np.int64))], f"/model.2/Slice_{a}")
        for a in (0, 2)]
    nodes.append(helper.make_node("Concat", [*parts, score], ["output0"],
                                  name="/model.2/Concat_3", axis=1))
    graph = helper.make_graph(
        nodes, "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       ["batch", 4 + CLASSES, ANCHORS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8, producer_name="pytorch")
    for key, value in (METADATA if metadata is None else metadata).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def images(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), np.uint8)


def source_output(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    """The source model's own output on ``pixels`` (x / 255, NCHW)."""
    x = (pixels.astype(np.float32) / 255).transpose(0, 3, 1, 2)
    return cpu_session(model.SerializeToString()).run(None, {"images": x})[0]


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


def test_the_engine_refuses_detection_bundles_for_now(tiny: tuple[onnx.ModelProto, Path]
                                                      ) -> None:
    """Until the engine picks detections, explaining a detection bundle is a clear
    BundleError, not class maps summed over every anchor."""
    from onnxcam import BundleError, Explainer

    with pytest.raises(BundleError, match="cannot yet pick and explain their detections"):
        Explainer(tiny[1], device="cpu").explain(images(1))


def test_layers_stars_the_detectors_default(tmp_path: Path) -> None:
    """``onnxcam layers`` marks the layer the export takes (the larger map the head
    reads), not the output's Concat, which the generic rule would take for a map."""
    from click.testing import CliRunner

    from onnxcam.cli import main

    source = tmp_path / "tiny.onnx"
    onnx.save(tiny_yolo(), source)
    result = CliRunner().invoke(main, ["layers", str(source)])
    assert result.exit_code == 0, result.output
    starred = [line.split()[1] for line in result.output.splitlines() if line.startswith("*")]
    assert starred == ["/model.0/act/Mul"]
