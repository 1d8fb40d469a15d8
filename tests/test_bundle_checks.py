"""The bundle reader trusts nothing a bundle says: weights stored outside the file,
metadata out of bounds or at odds with the graph, ops off the allow-list are refused
before any session; so is a graph whose shapes need more memory than it is given."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hostile_bundles import detector_output_reshaped, reading_outside, with_bomb, with_metadata
from onnx import TensorProto, helper, numpy_helper

from onnxcam.bundle import read_bundle
from onnxcam.bundle_checks import ALLOWED_OPS, check_memory, check_ops, estimate_memory
from onnxcam.engine import Explainer
from onnxcam.errors import BundleError


def test_weights_read_from_outside_the_file_are_refused(cnn_bundle: Path,
                                                       tmp_path: Path) -> None:
    data, length = reading_outside(cnn_bundle, "credentials")
    secret = (bytes(range(1, 256)) * (length // 255 + 1))[:length]
    (tmp_path / "credentials").write_bytes(secret)
    bundle = tmp_path / "bundle.onnx"
    bundle.write_bytes(data)
    # The attack is real: onnxruntime alone loads the file's bytes as the weight, and
    # they come back in the logits.
    session = ort.InferenceSession(str(bundle), providers=["CPUExecutionProvider"])
    assert session.get_inputs()
    for source in (bundle, data):
        with pytest.raises(BundleError, match="outside its file \\(at 'credentials'\\)"):
            read_bundle(source)
        with pytest.raises(BundleError, match="outside its file"):
            Explainer(source, device="cpu")


@pytest.mark.parametrize(("changes", "refusal"), [
    ({"batch_size": "100000000"}, "batch size 100000000, outside \\[0, 4096\\]"),
    ({"input_height": "16000", "input_width": "16000"}, "input height 16000"),
    ({"input_channels": "0"}, "input channels 0"),
    ({"num_classes": "2000000000"}, "number of classes 2000000000"),
    ({"num_classes": "3"}, "5 labels for 3 classes"),
    ({"input_height": "32"}, "image input's axis 1 is 16, but the metadata says 32"),
    ({"batch_size": "4"}, "image input's axis 0 is None, but the metadata says 4"),
    ({"format_version": ""}, "format_version is '', not a number"),
    ({"layout": "16"}, "claims layout '16', not one of nhwc, nchw"),
    ({"preprocess": "imagenet"}, "claims preprocessing 'imagenet', not one of unit"),
    ({"gradient": "exact"}, "claims gradient 'exact', not one of analytic, fd"),
    ({"layers": '[{"name": "x", "index": 0, "layout": "hwc"}]'},
     "claims for layer 'x' activation layout 'hwc', not one of nhwc, nchw, ntc"),
    ({"output": "voxels"}, "claims output 'voxels', not one of classes, pixels"),
    ({"head_inputs": '[{"name": "x"}]'}, "incomplete or malformed"),
    ({"head_inputs": "{"}, "incomplete or malformed"),
    ({"format_version": "3"}, "bundle format 3 is newer than this onnxcam understands \\(2\\)"),
])
def test_metadata_is_held_to_bounds_and_to_the_graph(cnn_bundle: Path, changes: dict,
                                                     refusal: str) -> None:
    data = with_metadata(cnn_bundle, **changes)
    with pytest.raises(BundleError, match=refusal):
        read_bundle(data)


def test_a_cut_that_names_no_tensor_of_the_graph(cnn_bundle: Path) -> None:
    """A cut naming tensors the graph lacks reads, but the engine's cut refuses it as a
    bad bundle when several targets per image ask for it, and one class still runs."""
    import numpy as np

    from onnxcam.engine import Explainer

    data = with_metadata(cnn_bundle, head_inputs='[{"name": "nowhere", "batched": true, '
                                                 '"type": 1}, {"name": "onnxcam/seed", '
                                                 '"batched": true, "type": 1}]')
    ex = Explainer(data, device="cpu")
    images = np.zeros((1, 16, 16, 3), np.uint8)
    assert ex.explain(images, targets=1).targets.tolist() == [1]
    with pytest.raises(BundleError, match="cannot be cut at its layer"):
        ex.explain(images, targets=[[1, 2]])


def test_a_batch_axis_fixed_without_metadata_is_refused(cnn_bundle: Path) -> None:
    """A graph fixed at 3 images whose metadata says any batch: the engine would feed it
    another number, and onnxruntime fail mid-job (found by the bundle fuzzer)."""
    model = onnx.load(str(cnn_bundle))
    image = next(i for i in model.graph.input if i.name == "image")
    image.type.tensor_type.shape.dim[0].dim_value = 3
    with pytest.raises(BundleError, match="axis 0 is 3, but the metadata says None"):
        read_bundle(model.SerializeToString())


def test_a_good_bundle_still_reads(cnn_bundle: Path) -> None:
    bundle = read_bundle(cnn_bundle)
    assert (bundle.info.height, bundle.info.width, bundle.info.batch_size) == (16, 16, 0)
    maps = Explainer(cnn_bundle, device="cpu").explain(
        [np.full((16, 16, 3), 90, np.uint8)]).heatmaps
    assert np.isfinite(maps).all() and os.path.exists(cnn_bundle)


# -- the op allow-list --------------------------------------------------------------


def tiny_model(node: onnx.NodeProto, functions: tuple = ()) -> onnx.ModelProto:
    """x [2] float -> node -> y."""
    graph = helper.make_graph([node], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, functions=list(functions),
                             opset_imports=[helper.make_opsetid("", 17)])


def loop_around(inner: onnx.NodeProto) -> onnx.NodeProto:
    """A Loop of one trip whose body runs ``inner`` on the outer x."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), inner],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_node("Loop", ["", ""], ["y"], body=body, name="loop")


@pytest.mark.parametrize(("node", "functions", "refusal"), [
    (helper.make_node("Tanh", ["x"], ["y"], name="evil", domain="com.microsoft"), (),
     "op com.microsoft.Tanh \\(node 'evil'\\) is from a domain"),
    (helper.make_node("Fetch", ["x"], ["y"], name="n"), (), "op Fetch \\(node 'n'\\) is not"),
    (helper.make_node("ImageDecoder", ["x"], ["y"], name="n"), (), "op ImageDecoder"),
    (helper.make_node("RandomNormalLike", ["x"], ["y"], name="n"), (), "op RandomNormalLike"),
    (loop_around(helper.make_node("StringSplit", ["x"], ["y"], name="inside")), (),
     "op StringSplit \\(node 'inside'\\)"),
    (helper.make_node("Double", ["x"], ["y"], name="call", domain="mine"),
     (helper.make_function("mine", "Double", ["a"], ["b"],
                           [helper.make_node("Add", ["a", "a"], ["b"])],
                           [helper.make_opsetid("", 17)]),),
     "op mine.Double \\(node 'call'\\) is from a domain"),
])
def test_ops_off_the_allow_list_are_refused(node: onnx.NodeProto, functions: tuple,
                                            refusal: str) -> None:
    with pytest.raises(BundleError, match=refusal):
        check_ops(tiny_model(node, functions))


def test_standard_ops_pass_in_and_outside_subgraphs() -> None:
    check_ops(tiny_model(helper.make_node("Tanh", ["x"], ["y"], domain="ai.onnx")))
    check_ops(tiny_model(loop_around(helper.make_node("Relu", ["x"], ["y"]))))
    assert {"Conv", "Gemm", "Loop", "ConstantOfShape", "Resize"} <= ALLOWED_OPS
    assert not {"ImageDecoder", "RandomUniform", "SequenceAt", "StringSplit"} & ALLOWED_OPS


def test_read_bundle_names_a_refused_op(cnn_bundle: Path) -> None:
    model = onnx.load(str(cnn_bundle))
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    relu.domain = "com.evil"
    with pytest.raises(BundleError, match="op com.evil.Relu .node 'relu1'. is from a domain"):
        read_bundle(model.SerializeToString())


# -- the memory estimate -------------------------------------------------------------


def budget_model() -> onnx.ModelProto:
    """image uint8 [N, 4, 4, 3] -> Cast -> MatMul by w [3, 400] -> y; beside it, a
    ConstantOfShape of [1000, 1000] from an initializer and an Expand to [2000, 1000]
    from a Constant node."""
    shape = numpy_helper.from_array(np.array([1000, 1000], np.int64), "shape")
    weight = numpy_helper.from_array(np.ones((3, 400), np.float32), "w")
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
        helper.make_node("ConstantOfShape", ["shape"], ["filled"], name="fill"),
        helper.make_node("Constant", [], ["wide"], name="wide",
                         value=numpy_helper.from_array(np.array([2000, 1000], np.int64))),
        helper.make_node("Expand", ["one", "wide"], ["expanded"], name="expand"),
    ]
    graph = helper.make_graph(
        nodes, "budget",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 4, 4, 3]),
         helper.make_tensor_value_info("target", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in ("y", "filled", "expanded")],
        [shape, weight, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_estimate_counts_what_the_shapes_say() -> None:
    model = budget_model()
    before = model.SerializeToString()
    # By hand. Weights: w 3*400*4 = 4800, shape 2*8 = 16, one 4, the Constant 2*8 = 16.
    # Inputs at N = 8: image 8*48 = 384 bytes, target 8*8 = 64.
    # Working sets (weights aside): cast 384 + 8*48*4 = 1920; matmul 1536 + 8*4*4*400*4
    # = 206,336; fill 1000*1000*4 = 4,000,000; expand 16 + 2000*1000*4 = 8,000,016.
    estimate = estimate_memory(model, 8)
    assert (estimate.weights, estimate.inputs) == (4836, 448)
    assert (estimate.working_set, estimate.node) == (8_000_016, "expand (Expand)")
    assert estimate.total == 4836 + 448 + 8_000_016
    assert model.SerializeToString() == before  # the model itself is left alone
    # At N = 1 the image's share shrinks; the constants' do not.
    assert estimate_memory(model, 1).inputs == 48 + 8
    model.graph.node.pop()  # no Expand: the ConstantOfShape is the largest
    assert estimate_memory(model, 8).working_set == 4_000_000
    check_memory(model, 8, 4_005_300)
    with pytest.raises(BundleError, match="needs at least 3.82 MiB to run 8 image.*node fill "
                                          "\\(ConstantOfShape\\) 3.81 MiB.*budget of 3.81 MiB"):
        check_memory(model, 8, 4_000_000)


def test_explainer_refuses_a_bomb_before_any_session(cnn_bundle: Path) -> None:
    bomb = with_bomb(cnn_bundle, "ConstantOfShape", 1_500_000_000)  # 6 GB of float ones
    with pytest.raises(BundleError, match="needs at least 5.59 GiB to run 8 image"):
        Explainer(bomb, device="cpu", max_memory=2**30)
    image = [np.full((16, 16, 3), 90, np.uint8)]
    budgeted = Explainer(cnn_bundle, device="cpu", max_memory=2**30).explain(image)
    plain = Explainer(cnn_bundle, device="cpu").explain(image)
    assert np.array_equal(budgeted.logits, plain.logits)


@pytest.fixture(scope="module")
def detector_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_detectors import tiny_yolo

    from onnxcam.exporter import export

    path = tmp_path_factory.mktemp("detector") / "tiny.cam.onnx"
    export(tiny_yolo(), path, preprocess="unit")
    return path


def test_a_detection_bundle_that_is_what_it_says_passes(detector_bundle: Path) -> None:
    assert read_bundle(detector_bundle).info.output == "anchors"
    # Reshaped to its own shape: the same graph, whatever else the helper changes.
    same = detector_output_reshaped(detector_bundle, "logits", [0, 3, 320])
    assert read_bundle(same).info.num_classes == 3


@pytest.mark.parametrize(("change", "refusal"), [
    (("boxes", None), "without a boxes output"),
    (("logits", None), "without a logits output"),
    (("boxes", [0, -1]), "boxes output has 2 axes, not 3"),
    (("boxes", [0, -1, 2]), "the boxes' last axis: 2, not 4"),
    (("logits", [0, -1]), "logits output has 2 axes, not 3"),
    (("logits", [0, 1, 3, -1]), "logits output has 4 axes, not 3"),
    (("logits", [0, 1, -1]), "the logits' classes: 1, not 3"),
    (("logits", [0, 3, 160, 2]), "logits output has 4 axes"),
    (("boxes", [0, 160, 8]), "the boxes' last axis: 8, not 4"),
])
def test_a_detection_bundle_at_odds_with_its_graph_is_refused(
        detector_bundle: Path, change: tuple, refusal: str) -> None:
    data = detector_output_reshaped(detector_bundle, *change)
    with pytest.raises(BundleError, match=refusal.replace("(", "\\(")):
        read_bundle(data)


def test_a_detection_bundle_with_other_classes_or_anchors_is_refused(
        detector_bundle: Path, cnn_bundle: Path) -> None:
    labels = '["cat", "dog", "owl", "eel"]'
    with pytest.raises(BundleError, match="target_weights' classes: 3, not 4"):
        read_bundle(with_metadata(detector_bundle, num_classes="4", labels=labels))
    fewer = detector_output_reshaped(detector_bundle, "boxes", [0, 100, 4], anchors=100)
    with pytest.raises(BundleError, match="target_weights' anchors: 320, not 100"):
        read_bundle(fewer)
    # A classifier claiming to detect: logits [N, K], no boxes.
    with pytest.raises(BundleError, match="logits output has 2 axes, not 3"):
        read_bundle(with_metadata(cnn_bundle, output="anchors", format_version="2"))


def test_sizes_the_graph_leaves_free_are_checked_when_it_runs(detector_bundle: Path) -> None:
    """Fewer boxes than logits' anchors, with free sizes: read, then refused at its first
    run as a bundle error, before any detection is picked from it."""
    from tiny_detectors import images

    fewer = detector_output_reshaped(detector_bundle, "boxes", [0, -1, 4], anchors=100)
    explainer = Explainer(fewer, device="cpu")
    with pytest.raises(BundleError, match=r"gave logits \[1, 3, 320\] and boxes \[1, 100, 4\]"):
        explainer.explain(images(1))
