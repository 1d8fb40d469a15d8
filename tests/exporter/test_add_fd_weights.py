"""Finite-difference channel weights on tiny heads built in code: where the
perturbation starts, when the tail is affine, and the weights themselves against
float64 central differences in numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from micrographs import draft_of, info, init, model_of, outputs_of
from onnx import helper

import onnxcam.exporter.passes.add_fd_weights as fd
from onnxcam.bundle import INPUT_IMAGE, INPUT_TARGET, OUTPUT_ACTIVATIONS, OUTPUT_WEIGHTS
from onnxcam.exporter.draft import Draft
from onnxcam.exporter.passes import run_passes
from onnxcam.exporter.passes.add_fd_weights import (
    add_fd_weights,
    affine_tail,
    perturbation_point,
)
from onnxcam.exporter.passes.probe_head import probe_head
from onnxcam.exporter.pipeline import PASSES
from onnxcam.exporter.vjp.context import TensorShape

HEIGHT, WIDTH, CHANNELS, CLASSES = 3, 4, 5, 4
RNG = np.random.default_rng(11)
FC = RNG.normal(0, 1, (CLASSES, CHANNELS)).astype(np.float32)
BIAS = RNG.normal(0, 0.1, CLASSES).astype(np.float32)
MIX = RNG.normal(0, 1, (CHANNELS, 3, 1, 1)).astype(np.float32)  # 1x1 conv, 3 -> C channels


def shape(*dims: int) -> TensorShape:
    return TensorShape(tuple(dims), (True,) + (False,) * (len(dims) - 1))


# --------------------------------------------------------------------------- perturbation_point


def pooled_head(after_transpose: str | None) -> tuple[onnx.GraphProto, dict[str, TensorShape]]:
    """feat (NHWC) -> Transpose to NCHW [-> after_transpose] -> GAP -> Flatten -> Gemm,
    with the bundle's ``activations`` Identity also reading feat."""
    nodes = [helper.make_node("Identity", ["feat"], [OUTPUT_ACTIVATIONS],
                              name="onnxcam/activations"),
             helper.make_node("Transpose", ["feat"], ["t"], name="t", perm=[0, 3, 1, 2])]
    x = "t"
    if after_transpose:
        nodes.append(helper.make_node(after_transpose, ["t"], ["u"], name="u"))
        x = "u"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
              helper.make_node("Gemm", ["f", "fc", "bias"], ["s"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "head", [info("feat", ["N", HEIGHT, WIDTH, CHANNELS])],
                              [info("s", None)], [init("fc", FC), init("bias", BIAS)])
    shapes = {"feat": shape(1, HEIGHT, WIDTH, CHANNELS), "t": shape(1, CHANNELS, HEIGHT, WIDTH),
              "u": shape(1, CHANNELS, HEIGHT, WIDTH), "g": shape(1, CHANNELS, 1, 1),
              "f": shape(1, CHANNELS), "s": shape(1, CLASSES)}
    return graph, shapes


def test_perturbation_point_follows_a_uniform_shift_through_pooling() -> None:
    """A channel-uniform shift of feat (NHWC, channel axis 3) is the same shift of
    channel 1 after the Transpose, the pool and the Flatten."""
    graph, shapes = pooled_head(None)
    assert perturbation_point(graph, "feat", 3, shapes) == ("f", 1)


@pytest.mark.parametrize("op", ["Relu", "Tanh"])
def test_perturbation_point_stops_before_an_op_that_bends_the_shift(op: str) -> None:
    graph, shapes = pooled_head(op)
    assert perturbation_point(graph, "feat", 3, shapes) == ("t", 1)


def test_affine_tail_is_gemm_alone() -> None:
    graph, shapes = pooled_head(None)
    assert affine_tail(graph, "f", "s", shapes, 1) is True
    assert affine_tail(graph, "t", "s", shapes, 1) is False  # a map, not a vector
    bent = helper.make_graph(
        [helper.make_node("Relu", ["f"], ["r"]),
         helper.make_node("Gemm", ["r", "fc", "bias"], ["s"], transB=1)],
        "bent", [info("f", None)], [info("s", None)], [init("fc", FC), init("bias", BIAS)])
    assert affine_tail(bent, "f", "s", shapes, 1) is False
    reads_more = helper.make_graph(
        [helper.make_node("Add", ["f", "other"], ["sum"]),
         helper.make_node("Gemm", ["sum", "fc", "bias"], ["s"], transB=1)],
        "reads_more", [info("f", None), info("other", None)], [info("s", None)],
        [init("fc", FC), init("bias", BIAS)])
    assert affine_tail(reads_more, "f", "s", {**shapes, "other": shape(1, CHANNELS)}, 1) is False


# --------------------------------------------------------------------------- the weights


def classifier(op: str | None) -> onnx.ModelProto:
    """NCHW x (3 channels) -> 1x1 conv to C -> feat [-> op] -> GAP -> Flatten -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "mix"], ["feat"], name="conv")]
    x = "feat"
    if op:
        nodes.append(helper.make_node(op, ["feat"], ["bent"], name="bend"))
        x = "bent"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat", "fc", "bias"], ["scores"], name="fc",
                               transB=1)]
    return model_of(nodes, [info("x", ["N", 3, HEIGHT, WIDTH])], [info("scores", ["N", CLASSES])],
                    [init("mix", MIX), init("fc", FC), init("bias", BIAS)])


def head_in_numpy(op: str | None, feat: np.ndarray) -> np.ndarray:
    """The scores from feat [B, C, H, W] in float64."""
    bent = {None: lambda a: a, "Tanh": np.tanh, "Sigmoid": lambda a: 1 / (1 + np.exp(-a))}[op]
    return bent(feat).mean(axis=(2, 3)) @ FC.T.astype(np.float64) + BIAS


def fd_draft(op: str | None) -> Draft:
    draft = draft_of(classifier(op), "nchw", [("feat", "nchw")], (HEIGHT, WIDTH, 3),
                     gradient="fd")
    return run_passes(draft, PASSES[: PASSES.index(probe_head) + 1])


def reference_weights(op: str | None, feat: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """weights[n, k] = d score / d (all of channel k) / (H W), by float64 central
    differences, far more exact than the bundle's float32 forward differences."""
    weights = np.zeros((len(feat), CHANNELS))
    for n in range(len(feat)):
        step = 1e-6 * float(np.abs(feat[n]).mean())
        for k in range(CHANNELS):
            moved = np.zeros_like(feat[n : n + 1])
            moved[:, k] = step
            plus = head_in_numpy(op, feat[n : n + 1] + moved)[0, chosen[n]]
            minus = head_in_numpy(op, feat[n : n + 1] - moved)[0, chosen[n]]
            weights[n, k] = (plus - minus) / (2 * step) / (HEIGHT * WIDTH)
    return weights


def run_weights(draft: Draft, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    images = np.random.default_rng(seed).integers(0, 256, (3, HEIGHT, WIDTH, 3), np.uint8)
    target = np.array([-1, 0, CLASSES - 1], np.int64)
    got = outputs_of(draft.model, {INPUT_IMAGE: images, INPUT_TARGET: target})
    return got, np.where(target < 0, got["logits"].argmax(axis=1), target)


def test_affine_tail_slopes_are_exact() -> None:
    """GAP then Gemm: the slopes come from the unit basis, exactly FC[t] / (H W)."""
    draft = fd_draft(None)
    assert add_fd_weights(draft) is True
    assert (draft.gradient, draft.fd_step, draft.fd_chunk) == ("fd", 1.0, 0)
    assert not any(node.op_type == "Loop" for node in draft.graph.node)
    got, chosen = run_weights(draft, seed=1)
    np.testing.assert_allclose(got[OUTPUT_WEIGHTS], FC[chosen] / (HEIGHT * WIDTH), rtol=1e-5)
    feat = got[OUTPUT_ACTIVATIONS].astype(np.float64)
    np.testing.assert_allclose(got[OUTPUT_WEIGHTS], reference_weights(None, feat, chosen),
                               rtol=1e-5)


@pytest.mark.parametrize("op", ["Tanh", "Sigmoid"])
def test_loop_slopes_match_float64_differences(op: str) -> None:
    """A head bent before the pool: the Loop moves each channel of the map up and
    down in turn, and the tail (Tanh or Sigmoid, GAP, Gemm) runs in float64."""
    draft = fd_draft(op)
    assert add_fd_weights(draft) is True
    assert (draft.fd_step, draft.fd_chunk) == (fd.STEP_FLOAT64, 1)
    assert any(node.op_type == "Loop" for node in draft.graph.node)
    got, chosen = run_weights(draft, seed=2)
    feat = got[OUTPUT_ACTIVATIONS].astype(np.float64)
    want = reference_weights(op, feat, chosen)
    # Central differences in float64: only the float32 output rounds.
    np.testing.assert_allclose(got[OUTPUT_WEIGHTS], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_float32_fallback_when_an_op_lacks_a_double_kernel(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Without a float64 kernel for Tanh the tail stays float32, with a larger step:
    central differences are then second-order, within 1e-4 of the scale here."""
    monkeypatch.setattr(fd, "DOUBLE_OPS", fd.DOUBLE_OPS - {"Tanh"})
    draft = fd_draft("Tanh")
    assert add_fd_weights(draft) is True
    assert draft.fd_step == fd.STEP_FLOAT32
    got, chosen = run_weights(draft, seed=3)
    want = reference_weights("Tanh", got[OUTPUT_ACTIVATIONS].astype(np.float64), chosen)
    assert np.abs(got[OUTPUT_WEIGHTS] - want).max() <= 1e-4 * np.abs(want).max()


def test_add_fd_weights_twice_changes_nothing() -> None:
    draft = fd_draft("Tanh")
    assert add_fd_weights(draft) is True
    before = draft.model.SerializeToString(deterministic=True)
    assert add_fd_weights(draft) is False
    assert draft.model.SerializeToString(deterministic=True) == before
