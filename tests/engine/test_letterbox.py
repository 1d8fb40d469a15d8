"""Letterboxed bundles (ultralytics detectors): ``prepare`` resizes as ultralytics'
predict does, held against its own ``LetterBox`` on real photos, and ``placement``
maps boxes back to the image's pixels as its ``scale_boxes`` does."""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from onnxcam.bundle import RESIZE_LETTERBOX, BundleInfo
from onnxcam.engine.images import LETTERBOX_GREY, placement, prepare
from onnxcam.errors import BundleError

data = pytest.importorskip("skimage.data")

PHOTOS = ("coffee", "chelsea", "astronaut")  # 400x600, 300x451, 512x512
SIZES = ((128, 128), (96, 160), (640, 640))  # shrunk, off-square, enlarged


@pytest.fixture(scope="module")
def ultralytics() -> tuple[ModuleType, ModuleType]:
    """ultralytics' ``data.augment`` and ``utils.ops``, Pillow left as it was: importing
    ultralytics replaces ``PIL.Image.open`` (HEIF on demand), which the decoding tests
    of this process would meet."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    pristine = Image.open
    try:
        augment = pytest.importorskip("ultralytics.data.augment")
        ops = pytest.importorskip("ultralytics.utils.ops")
    finally:
        Image.open = pristine  # type: ignore[assignment]
    return augment, ops


def bundle_info(height: int, width: int, resize: str = RESIZE_LETTERBOX) -> BundleInfo:
    return BundleInfo(height=height, width=width, channels=3, preprocess="unit",
                      layout="nchw", activation_layout="nchw", target_layer="layer",
                      num_classes=80, labels=[], gradient="analytic", resize=resize)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", PHOTOS)
def test_prepare_letterboxes_as_ultralytics(ultralytics: tuple[ModuleType, ModuleType],
                                            name: str, size: tuple[int, int]) -> None:
    augment, _ = ultralytics
    photo = getattr(data, name)()
    want = augment.LetterBox(size, auto=False)(image=photo)  # predict's, at a fixed size
    got = prepare([photo], bundle_info(*size))[0]
    assert got.shape == want.shape
    # cv2 interpolates in 11-bit fixed point, onnxcam in float32: one grey level apart.
    assert np.abs(got.astype(int) - want).max() <= 1
    grey = np.all(want == LETTERBOX_GREY, axis=-1)
    assert photo.shape[0] == photo.shape[1] or grey.any()  # the padding was tested
    np.testing.assert_array_equal(got[grey], want[grey])


@pytest.mark.parametrize("shape", [(400, 600), (300, 451), (512, 512), (1000, 333)])
def test_placement_maps_boxes_back_as_scale_boxes(ultralytics: tuple[ModuleType, ModuleType],
                                                  shape: tuple[int, int]) -> None:
    _, ops = ultralytics
    boxes = np.array([[10.0, 20.0, 100.0, 90.0], [3.5, 7.25, 150.0, 120.0]])
    want = ops.scale_boxes((128, 160), boxes.copy(), shape)  # clipped to the image
    got = placement(*shape, bundle_info(128, 160)).to_image(boxes)
    got = np.clip(got, 0, [shape[1], shape[0]] * 2)
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_a_stretched_bundle_maps_its_whole_input_to_the_whole_image() -> None:
    where = placement(300, 451, bundle_info(128, 160, resize="bilinear"))
    np.testing.assert_allclose(where.to_image(np.array([0.0, 0.0, 160.0, 128.0])),
                               [0.0, 0.0, 451.0, 300.0])


def test_an_unknown_resize_is_refused() -> None:
    with pytest.raises(BundleError, match="resize 'sideways'"):
        dataclasses.replace(bundle_info(8, 8), resize="sideways").check_bounds()
    bundle_info(8, 8).check_bounds()


def test_maps_and_boxes_go_back_to_the_image_without_the_padding() -> None:
    """A 4x8 image sits in an 8x8 letterbox input at rows 2..5: its heatmap is the
    map's rows 2..5 (the padding's rows left out), and a box there is the whole image."""
    from onnxcam.engine.detections import in_image
    from onnxcam.engine.outputs import heatmap_on_image

    info = bundle_info(8, 8)
    raw = np.arange(64, dtype=np.float32).reshape(8, 8)
    got = heatmap_on_image(raw, 4, 8, info)
    np.testing.assert_allclose(got, (raw[2:6] / 63.0), atol=1e-6)
    assert in_image((0.0, 2.0, 8.0, 6.0), info, 4, 8) == (0.0, 0.0, 8.0, 4.0)
    stretched = dataclasses.replace(info, resize="bilinear")
    assert heatmap_on_image(raw, 4, 8, stretched).shape == (4, 8)
    assert in_image((0.0, 2.0, 8.0, 6.0), stretched, 4, 8) == (0.0, 1.0, 8.0, 3.0)
