"""A detection bundle that decodes its own detections (``output = detections``,
torchvision's): its detections are the graph's, each seeded at its source entry; its
targets are checked as an anchors bundle's; its metadata round-trips; verification
catches a source that does not hold its detection's score. Hand-worked values; the
models themselves are in ``tests/exporter/test_detectors_torchvision.py`` (slow)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from onnxcam import BadTargetError, Contrast, Region, Weighting
from onnxcam.bundle import OUTPUT_DETECTIONS, BundleInfo
from onnxcam.engine.detections import decoded, joined_logits
from onnxcam.engine.targets import parse_targets, picked_rows, seeds
from onnxcam.errors import VerificationError
from onnxcam.exporter.verify.checks import sources_check

K, A = 3, 4  # classes, anchors: the logits are [1, K, A], their entries flat as [A, K]
INFO = BundleInfo(height=8, width=8, channels=3, preprocess="unit", layout="nchw",
                  activation_layout="nchw", target_layer="layer", num_classes=K,
                  labels=["cat", "dog", "owl"], gradient="analytic", batch_size=1,
                  output=OUTPUT_DETECTIONS)
BOXES = np.float32([[1, 1, 4, 4], [2, 0, 8, 5], [0, 0, 1, 1]])
SCORES = np.float32([0.9, 0.7, 0.2])
SOURCES = np.int64([7, 2, 9])  # anchor 2 class 1, anchor 0 class 2, anchor 3 class 0
LABELS = SOURCES % K


def test_detections_are_the_graphs_in_its_order() -> None:
    found = decoded(BOXES, SCORES, LABELS, SOURCES, INFO)
    assert [(d.label, d.anchor, d.rank) for d in found] == [("dog", 2, 0), ("owl", 0, 1),
                                                            ("cat", 3, 2)]
    assert found[1].box == (2.0, 0.0, 8.0, 5.0) and found[1].score == pytest.approx(0.7)
    assert [d.rank for d in decoded(BOXES, SCORES, LABELS, SOURCES, INFO, 2)] == [0, 1]
    assert decoded(BOXES[:0], SCORES[:0], LABELS[:0], SOURCES[:0], INFO) == []


def test_each_row_is_seeded_at_its_source() -> None:
    items = parse_targets(None, 1, INFO)
    rows = picked_rows(items, [decoded(BOXES, SCORES, LABELS, SOURCES, INFO)])
    seeded = seeds(rows, np.zeros((1, K, A), np.float32))
    flat = seeded.transpose(0, 2, 1).reshape(len(rows), -1)  # [rows, A * K], as sources
    np.testing.assert_array_equal(np.argmax(flat, axis=1), SOURCES)
    np.testing.assert_array_equal(flat.sum(axis=1), [1, 1, 1])
    dog = picked_rows(parse_targets("dog", 1, INFO), [decoded(BOXES, SCORES, LABELS, SOURCES,
                                                          INFO)])
    assert [r.name for r in dog] == ["dog#0"]


@pytest.mark.parametrize("target", [Contrast(0, 1), Region(0), Weighting(np.ones(K)),
                                    "all-positive"])
def test_other_targets_are_refused(target: object) -> None:
    with pytest.raises(BadTargetError, match="detection bundle"):
        parse_targets(target, 1, INFO)


def test_logits_of_other_widths_are_joined_padded_with_nan() -> None:
    """Faster R-CNN's anchors are its proposals, as many as each image's RPN keeps."""
    narrow = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    wide = np.arange(10, dtype=np.float32).reshape(1, 2, 5)
    joined = joined_logits([narrow, wide, narrow])
    assert joined.shape == (3, 2, 5)
    np.testing.assert_array_equal(joined[0, :, :3], narrow[0])
    assert np.isnan(joined[0, :, 3:]).all() and np.isnan(joined[2, :, 3:]).all()
    np.testing.assert_array_equal(joined[1], wide[0])
    np.testing.assert_array_equal(joined_logits([wide, wide]), np.concatenate([wide, wide]))


def test_metadata_round_trips() -> None:
    info = BundleInfo.from_metadata(INFO.to_metadata())
    assert info.output == OUTPUT_DETECTIONS and info.detector
    assert INFO.to_metadata()["onnxcam.format_version"] == "2"


def run_with(logits: np.ndarray, scores: np.ndarray, labels: np.ndarray, sources: np.ndarray
             ) -> Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]:
    """A bundle's run, as ``sources_check`` calls it, that gives these outputs."""
    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [logits, scores[None], labels[None], sources[None]]
    return run


def test_verification_holds_sources_to_their_scores() -> None:
    logits = np.random.default_rng(0).uniform(0, 1, (1, K, A)).astype(np.float32)
    scores = logits[0, SOURCES % K, SOURCES // K]
    images = np.zeros((2, 8, 8, 3), np.uint8)
    sources_check(run_with(logits, scores, LABELS, SOURCES), images)
    with pytest.raises(VerificationError, match="traced source"):
        sources_check(run_with(logits, scores + np.float32([0, 1e-3, 0]), LABELS, SOURCES),
                      images)
    with pytest.raises(VerificationError, match="traced source"):
        sources_check(run_with(logits, scores, (LABELS + 1) % K, SOURCES), images)
