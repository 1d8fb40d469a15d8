"""What verification holds a two-stage detector's bundle to (Faster R-CNN, issue 22):
its per-proposal logits compared as sets of rows, and the float64 head's reference
kernels for RoiAlign and ScatterElements against onnx's own reference ops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxcam.exporter.verify.checks import PROPOSAL_TOLERANCE, Report, add_proposal_logits
from onnxcam.exporter.verify.kernels import REFERENCE_OPS


def proposal_logits(rows: int = 40, classes: int = 7, seed: int = 0) -> np.ndarray:
    """[1, K, R] softmax scores, as Faster R-CNN's per proposal."""
    raw = np.random.default_rng(seed).normal(size=(rows, classes))
    scores = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    return scores.T[None].astype(np.float32)


def checked(logits: np.ndarray, reference: np.ndarray) -> Report:
    report = Report()
    add_proposal_logits(report, logits, reference)
    return report


def test_proposals_in_another_order_pass() -> None:
    reference = proposal_logits()
    order = np.random.default_rng(1).permutation(reference.shape[2])
    moved = reference[:, :, order] + np.float32(1e-5)
    report = checked(moved, reference)
    assert report.ok and report.errors["logits"] < 1e-4


def test_a_wrong_row_fails() -> None:
    """The mutation: one proposal's scores replaced by another's, so that the rows are
    no longer one set though every row of the bundle still finds a near one."""
    reference = proposal_logits()
    wrong = reference.copy()
    wrong[:, :, 3] = wrong[:, :, 4]
    report = checked(wrong, reference)
    assert not report.ok and report.errors["logits"] > 10 * PROPOSAL_TOLERANCE


def test_another_count_of_proposals_fails() -> None:
    reference = proposal_logits()
    assert not checked(reference[:, :, 1:], reference).ok


def run_one(node: onnx.NodeProto, feeds: dict[str, np.ndarray], ours: bool) -> np.ndarray:
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
                        for name in feeds],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    evaluator = ReferenceEvaluator(model, new_ops=REFERENCE_OPS if ours else None)
    return evaluator.run(None, feeds)[0]


@pytest.mark.parametrize("mode", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("ratio", [2, 0])
def test_roi_align_kernel_is_onnx_reference(mode: str, ratio: int) -> None:
    rng = np.random.default_rng(0)
    # Inside, across the border, thinner than a pixel, off the map.
    feeds = {"x": rng.normal(size=(2, 3, 9, 11)),
             "rois": np.array([[0.5, 1.2, 7.3, 8.1], [-2, -3, 4, 5], [3, 3, 3.2, 3.1],
                               [8, 1, 20, 30]], np.float64),
             "batch": np.array([0, 1, 1, 0], np.int64)}
    node = helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], output_height=3,
                            output_width=4, sampling_ratio=ratio, spatial_scale=0.7,
                            coordinate_transformation_mode=mode)
    want = run_one(node, feeds, ours=False)
    np.testing.assert_allclose(run_one(node, feeds, ours=True), want, atol=1e-14)
    assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_elements_kernel_is_onnx_reference(axis: int, reduction: str) -> None:
    rng = np.random.default_rng(axis + 5)
    data = rng.normal(size=(5, 4, 3))
    shape = list(data.shape)
    shape[axis] = 2
    size = data.shape[axis]
    if reduction == "none":  # distinct targets along the axis, some negative
        picked = np.argsort(rng.random(size=data.shape), axis=axis)
        indices = np.take(picked, range(2), axis=axis) - size * (axis == 1)
    else:  # repeated targets add up
        indices = rng.integers(-size, size, size=shape)
    feeds = {"data": data, "indices": indices, "updates": rng.normal(size=shape)}
    node = helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"],
                            axis=axis, reduction=reduction)
    want = run_one(node, feeds, ours=False)
    np.testing.assert_array_equal(run_one(node, feeds, ours=True), want)
    assert not np.array_equal(want, data)
