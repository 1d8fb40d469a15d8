"""Energy-in-box, the pointing game and RISE's AUCs against hand-computed numbers and
a plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam.audit.metrics import box_region, energy_in_box, mask_region, pointing_hit
from onnxcam.engine import Explainer
from onnxcam.engine.faithfulness import blur, deletion_insertion_auc, trapezoid_auc
from onnxcam.errors import BadRowError
from onnxcam.scores import softmax


def test_box_pixels_are_half_open_and_fractions_go_by_pixel_centres() -> None:
    region = box_region((1, 2, 4, 5), 6, 6)
    expected = np.zeros((6, 6), bool)
    expected[2:5, 1:4] = True
    assert (region == expected).all()
    # x centres 1.5, 2.5, 3.5 are in [1.4, 3.6); of the y centres only 1.5 is in [0.6, 2.4)
    assert (box_region((1.4, 0.6, 3.6, 2.4), 6, 6) == _block(6, 6, 1, 2, 1, 4)).all()
    # cut at the image's border
    assert box_region((-5, -5, 2, 2), 4, 4).sum() == 4


def _block(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    block = np.zeros((height, width), bool)
    block[y0:y1, x0:x1] = True
    return block


def test_a_box_outside_the_image_is_a_row_error() -> None:
    with pytest.raises(BadRowError, match="covers no pixel"):
        box_region((10, 10, 20, 20), 8, 8)


def test_energy_in_box_by_hand() -> None:
    heatmap = np.full((4, 4), 0.5, np.float32)
    heatmap[0:2, 0:2] = 1.0  # mass 4 inside, 12 * 0.5 = 6 outside
    region = _block(4, 4, 0, 2, 0, 2)
    assert energy_in_box(heatmap, region) == pytest.approx(0.4)
    assert energy_in_box(heatmap, ~region) == pytest.approx(0.6)
    assert energy_in_box(np.ones((4, 4)), region) == pytest.approx(region.mean())


def test_an_empty_heatmap_has_no_energy_and_misses() -> None:
    region = _block(4, 4, 0, 2, 0, 2)
    assert energy_in_box(np.zeros((4, 4)), region) == 0.0
    assert pointing_hit(np.zeros((4, 4)), region) is False


def test_pointing_hit_and_ties_in_row_major_order() -> None:
    heatmap = np.zeros((4, 4), np.float32)
    heatmap[3, 3] = 1.0
    assert pointing_hit(heatmap, _block(4, 4, 2, 4, 2, 4))
    assert not pointing_hit(heatmap, _block(4, 4, 0, 2, 0, 2))
    heatmap[0, 1] = 1.0  # a tie: (0, 1) comes first
    assert pointing_hit(heatmap, _block(4, 4, 0, 1, 1, 2))


def test_masks_are_nonzero_pixels_resized_by_nearest_neighbour() -> None:
    mask = np.array([[0, 255], [0, 0]], np.uint8)
    assert (mask_region(mask, 4, 4) == _block(4, 4, 0, 2, 2, 4)).all()
    assert (mask_region(np.stack([mask] * 3, -1), 2, 2) == (mask > 0)).all()
    with pytest.raises(BadRowError, match="no nonzero"):
        mask_region(np.zeros((3, 3), np.uint8), 3, 3)


def test_trapezoid_auc_by_hand() -> None:
    assert trapezoid_auc(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert trapezoid_auc(np.array([1.0, 1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.375)


def test_blur_keeps_flat_images_and_matches_a_direct_convolution() -> None:
    flat = np.full((1, 10, 12, 3), 77, np.uint8)
    assert (blur(flat) == 77).all()
    image = np.random.default_rng(0).integers(0, 256, (1, 9, 11, 1)).astype(np.uint8)
    sigma = 5 * 11 / 224
    radius = 1  # ceil(2 * sigma) for an 11-pixel side
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    padded = np.pad(image[0, ..., 0].astype(np.float64), radius, mode="edge")
    expected = np.zeros((9, 11))
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            expected += kernel[dy, dx] * padded[dy : dy + 9, dx : dx + 11]
    assert np.abs(blur(image)[0, ..., 0] - np.rint(expected)).max() <= 1


class LeftHalfBrightness:
    """Class 0's probability is the mean brightness of the left half, over 255."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        share = batch[:, :, : batch.shape[2] // 2].astype(np.float64).mean(axis=(1, 2, 3)) / 255
        share = np.clip(share, 1e-9, 1 - 1e-9)
        return np.stack([np.log(share / (1 - share)), np.zeros_like(share)], axis=1)


def test_deletion_auc_by_hand() -> None:
    """White image, saliency on the left half: deleting most salient first takes the
    probability from 1 to 0 linearly over the first half of the pixels."""
    images = np.full((1, 4, 4, 1), 255, np.uint8)
    heatmap = np.zeros((1, 4, 4), np.float32)
    heatmap[:, :, :2] = 1.0
    deletion, insertion = deletion_insertion_auc(LeftHalfBrightness(), images, heatmap, [0],
                                                 steps=4)
    assert deletion[0] == pytest.approx(0.25, abs=1e-6)  # 1, 0.5, 0, 0, 0
    assert insertion[0] == pytest.approx(1.0, abs=1e-6)  # a white image blurs to white
    deletion, _ = deletion_insertion_auc(LeftHalfBrightness(), images, 1 - heatmap, [0],
                                         steps=4)
    assert deletion[0] == pytest.approx(0.75, abs=1e-6)  # 1, 1, 1, 0.5, 0


def reference_auc(explainer: Explainer, image: np.ndarray, heatmap: np.ndarray, target: int,
                  steps: int) -> tuple[float, float]:
    """One perturbed image at a time, pixel by pixel, as written in RISE."""
    height, width = heatmap.shape
    order = np.argsort(-heatmap.reshape(-1), kind="stable")
    start = blur(image[None])[0]
    curves: dict[str, list[float]] = {"deletion": [], "insertion": []}
    for k in range(steps + 1):
        count = int(round(k * height * width / steps))
        deleted, inserted = image.copy(), start.copy()
        for pixel in order[:count]:
            y, x = divmod(int(pixel), width)
            deleted[y, x] = 0
            inserted[y, x] = image[y, x]
        for name, picture in (("deletion", deleted), ("insertion", inserted)):
            probability = softmax(explainer.predict(picture[None]).astype(np.float64))
            curves[name].append(float(probability[0, target]))
    return tuple(float(trapezoid_auc(np.array(curves[n]))) for n in curves)  # type: ignore


def test_aucs_match_the_reference_on_a_tiny_model(audit_explainer: Explainer) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    explanation = audit_explainer.explain(images)
    deletion, insertion = deletion_insertion_auc(
        audit_explainer, images, explanation.heatmaps, explanation.targets, steps=8)
    for n in range(3):
        expected = reference_auc(audit_explainer, images[n], explanation.heatmaps[n],
                                 int(explanation.targets[n]), 8)
        assert (deletion[n], insertion[n]) == pytest.approx(expected, abs=1e-5)
    assert ((deletion > 0) & (deletion < 1) & (insertion > 0) & (insertion < 1)).all()
