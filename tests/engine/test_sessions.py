"""The sessions an Explainer holds and the model access methods get: pruning a graph to
some outputs, the split at the model input, the cut at the seed, masked scores and
gradients at moved inputs, each checked with numbers against numpy or the unsplit
bundle."""

from __future__ import annotations

from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cam_references import source_outputs
from onnx import TensorProto, helper, numpy_helper

from onnxcam.bundle import SEED, read_bundle
from onnxcam.engine.model_access import ModelAccess
from onnxcam.engine.sessions import Sessions, cut_at_seed, keep_outputs, split_at_model_input
from onnxcam.exporter import export
from onnxcam.exporter.preprocess import preprocess_numpy

# ------------------------------------------------------------------------------ keep_outputs


def three_outputs() -> onnx.ModelProto:
    """x [1, 1, 4, 4] -> pooled = relu(maxpool(x)), scaled = x * w, where = float(argmax)."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["p"], ["pooled"]),
        helper.make_node("Mul", ["x", "w"], ["scaled"]),
        helper.make_node("Cast", ["idx"], ["where"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in ("pooled", "scaled", "where")],
        [numpy_helper.from_array(np.full((1, 1, 4, 4), 3.0, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


X = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) - 6.0
POOLED = np.maximum(X.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4).max(-1), 0)


def test_keep_outputs_drops_other_branches_and_unread_pool_indices() -> None:
    model = keep_outputs(three_outputs(), ["pooled"])
    assert [o.name for o in model.graph.output] == ["pooled"]
    assert [n.op_type for n in model.graph.node] == ["MaxPool", "Relu"]
    assert list(model.graph.node[0].output) == ["p"]  # the indices went with their reader
    assert not model.graph.initializer
    np.testing.assert_array_equal(run(model, X)["pooled"][0, 0], POOLED)


def test_keep_outputs_keeps_pool_indices_that_are_read() -> None:
    model = keep_outputs(three_outputs(), ["pooled", "where"])
    assert list(model.graph.node[0].output) == ["p", "idx"]
    values = run(model, X)
    np.testing.assert_array_equal(values["pooled"][0, 0], POOLED)
    # MaxPool's indices are flat positions in the 4x4 input: the last of each window
    np.testing.assert_array_equal(values["where"][0, 0], [[5, 7], [13, 15]])


# ------------------------------------------------------------------------------ the split


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models.onnx_cnn`` with torch preprocessing and input gradients."""
    folder = tmp_path_factory.mktemp("sessions")
    source = folder / "onnx_cnn.onnx"
    onnx.save(models.onnx_cnn(), str(source))
    out = folder / "bundle.onnx"
    export(source, out, preprocess="torch", input_gradients=True)
    return out


@pytest.fixture(scope="module")
def sessions(bundle: Path) -> Sessions:
    read = read_bundle(bundle)
    return Sessions(bundle, read.data, read.info, device="cpu")


IMAGES = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
TARGETS = np.array([4, 0, 2], np.int64)


def whole(bundle: Path, names: list[str], images: np.ndarray = IMAGES) -> list[np.ndarray]:
    session = ort.InferenceSession(str(bundle), providers=["CPUExecutionProvider"])
    return session.run(names, {"image": images, "target": TARGETS})


def test_the_split_halves_compose_to_the_bundle(bundle: Path) -> None:
    read = read_bundle(bundle)
    front, back = split_at_model_input(onnx.load(str(bundle)), read.info)
    front_run = ort.InferenceSession(front.SerializeToString(), providers=["CPUExecutionProvider"])
    back_run = ort.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"])
    (model_input,) = front_run.run(None, {"image": IMAGES})
    want = preprocess_numpy(IMAGES, "torch").transpose(0, 3, 1, 2)
    np.testing.assert_allclose(model_input, want, rtol=1e-6, atol=1e-6)
    (logits,) = back_run.run(["logits"], {read.info.model_input: model_input})
    np.testing.assert_allclose(logits, whole(bundle, ["logits"])[0], rtol=1e-5, atol=1e-6)


def test_sessions_run_pruned_of_the_gradients_nobody_asked_for(sessions: Sessions,
                                                               bundle: Path) -> None:
    logits_only = sessions.session_for(["logits", "cam"])
    assert "input_gradients" not in {o.name for o in logits_only.get_outputs()}
    got = sessions.run(["logits", "input_gradients"], {"image": IMAGES, "target": TARGETS})
    for value, want in zip(got, whole(bundle, ["logits", "input_gradients"])):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-7)


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_seed_cut_halves_compose_to_the_bundle(bundle: Path) -> None:
    """The forward pass once, then the backward pass from its tensors and a seed, give
    the whole bundle's gradients, weights and cam for the target the seed picks."""
    cut = cut_at_seed(onnx.load(str(bundle)), make_session)
    assert cut is not None and cut.targets == ("gradients", "weights", "cam")
    names = list(dict.fromkeys(["logits", "activations", *cut.boundary]))
    values = dict(zip(names, cut.forward.run(names, {"image": IMAGES})))
    seed = np.eye(5, dtype=np.float32)[TARGETS]
    got = cut.backward.run(list(cut.targets), {**{n: values[n] for n in cut.boundary},
                                               SEED: seed})
    for value, want in zip([values["logits"], *got],
                           whole(bundle, ["logits", *cut.targets])):
        assert value.shape == want.shape
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)


def test_no_seed_cut_where_the_backward_pass_reads_the_target(bundle: Path) -> None:
    """A backward pass that reads the target other than through the seed cannot take
    the forward pass's tensors, computed without one: no cut (each target then runs
    the whole bundle)."""
    model = onnx.load(str(bundle))
    (maker,) = [node for node in model.graph.node if "cam" in node.output]
    maker.output[list(maker.output).index("cam")] = "cam_before"
    model.graph.node.extend([
        helper.make_node("Cast", ["target"], ["target_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["target_float", "zero"], ["nothing"]),
        helper.make_node("Add", ["cam_before", "nothing"], ["cam"])])
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    assert cut_at_seed(model, make_session) is None
    assert cut_at_seed(onnx.load(str(bundle)), make_session) is not None


# ------------------------------------------------------------------------------ model access


@pytest.mark.parametrize("chunk", [2, 32])
def test_masked_scores_are_the_source_models_scores(sessions: Sessions, chunk: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Target logits of input x mask, against the source model on numpy-masked inputs,
    with the masks asked for in chunks (and the progress told each chunk's share)."""
    monkeypatch.setattr("onnxcam.engine.model_access.SCORE_BATCH", chunk)
    shares: list[float] = []
    access = ModelAccess(sessions, IMAGES, shares.append)
    masks = np.random.default_rng(4).uniform(0, 1, (3, 5, 16, 16)).astype(np.float32)
    asked: list[tuple[int, int, int]] = []

    def make(n: int, start: int, stop: int) -> np.ndarray:
        asked.append((n, start, stop))
        return masks[n, start:stop]

    got = access.masked_scores(make, 5, TARGETS)
    assert max(stop - start for _, start, stop in asked) == min(chunk, 5)
    assert sum(shares) == pytest.approx(3.0)
    scores = source_outputs(models.onnx_cnn(), ["logits"])
    model_input = preprocess_numpy(IMAGES, "torch").transpose(0, 3, 1, 2)
    for n in range(3):
        want = scores(model_input[n][None] * masks[n][:, None])[0][:, TARGETS[n]]
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-5)


def test_gradients_at_the_model_input_are_the_bundles(sessions: Sessions, bundle: Path) -> None:
    access = ModelAccess(sessions, IMAGES)
    np.testing.assert_allclose(access.model_input_nhwc(), preprocess_numpy(IMAGES, "torch"),
                               rtol=1e-6, atol=1e-6)
    got = access.gradients_at(access.model_input, TARGETS)
    (want,) = whole(bundle, ["input_gradients"])
    assert got.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
