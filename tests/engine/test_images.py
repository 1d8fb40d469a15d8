"""Unit tests of ``worker.images`` (safe decoding, conversion, resizing, a bundle's batch)
and ``worker.maps``."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from onnxcam.bundle import BundleInfo
from onnxcam.engine.images import (
    Limits,
    array_image,
    as_image_list,
    check_targets,
    decode,
    load_image,
    prepare,
    read_bytes,
    resize,
    to_array,
)
from onnxcam.engine.maps import (
    COLORMAPS,
    heatmaps,
    interpolation_matrix,
    jet,
    normalize,
    overlay,
    resize_maps,
)
from onnxcam.errors import BadImageError, BadTargetError

# ------------------------------------------------------------------------------ helpers


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb_picture(height: int = 24, width: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (8-bit grey) claiming width x height, and almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decoding blow up, to prove a check happens before it."""

    def load(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)


# ------------------------------------------------------------------------------ bad files


def test_truncated_png_and_jpeg(tmp_path: Path) -> None:
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        data = encoded(rgb_picture(64, 64), fmt)
        path = tmp_path / f"cut.{suffix}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(BadImageError, match="truncated") as caught:
            load_image(path)
        assert str(path) in str(caught.value)
        with pytest.raises(BadImageError):
            load_image(data[: len(data) // 2])


def test_jpeg_missing_only_its_end_marker_is_refused(tmp_path: Path) -> None:
    data = encoded(rgb_picture(64, 64), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(BadImageError, match=str(path)):
        load_image(path)


@pytest.mark.parametrize("kind", ["empty", "text", "folder", "missing", "garbage"])
def test_not_an_image(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("just some text, not pixels\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(BadImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(str(path) + ":")
    assert "\n" not in message


def test_empty_and_text_bytes() -> None:
    with pytest.raises(BadImageError, match="empty"):
        load_image(b"")
    with pytest.raises(BadImageError, match="not an image"):
        load_image(b"hello, world")
    with pytest.raises(BadImageError, match="not an image"):
        decode(b"hello, world", name="greeting.png")


def test_over_max_bytes(tmp_path: Path) -> None:
    data = encoded(rgb_picture(), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    limits = Limits(max_bytes=len(data) - 1)
    with pytest.raises(BadImageError, match="limit") as caught:
        load_image(path, 3, limits)
    assert str(path) in str(caught.value) and str(len(data) - 1) in str(caught.value)
    with pytest.raises(BadImageError, match="limit"):
        read_bytes(path, limits)
    with pytest.raises(BadImageError, match="limit"):
        load_image(data, 3, limits)
    assert load_image(path, 3, Limits(max_bytes=len(data))).shape == (24, 32, 3)


def test_unsupported_sources() -> None:
    for source in (42, None, object(), [1, 2, 3]):
        with pytest.raises(BadImageError, match="unsupported"):
            load_image(source)


# ------------------------------------------------------------------------------ bombs


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path,
                                                              no_decoding: None) -> None:
    data = png_header_only(20000, 20000)
    assert len(data) < 200
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(BadImageError) as caught:
        load_image(path, 3, Limits(max_pixels=1_000_000))
    assert time.perf_counter() - start < 0.5
    message = str(caught.value)
    assert str(path) in message and "pixel" in message and "limit" in message


def test_pillow_written_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    """A real 1-bit PNG of 4000x4000 pixels (a few kB on disk) over a 1M-pixel limit."""
    path = tmp_path / "bomb.png"
    Image.new("1", (4000, 4000)).save(path)
    assert path.stat().st_size < 100_000
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load",
                      lambda self, *a, **k: pytest.fail("pixels were decoded"))
        start = time.perf_counter()
        with pytest.raises(BadImageError) as caught:
            load_image(path, 3, Limits(max_pixels=1_000_000))
        assert time.perf_counter() - start < 0.5
    message = str(caught.value)
    assert str(path) in message and "16000000 pixels" in message and "1000000" in message
    assert "limit" in message


def test_image_exactly_at_the_pixel_limit_is_accepted() -> None:
    data = encoded(rgb_picture(20, 50), "PNG")
    assert load_image(data, 3, Limits(max_pixels=1000)).shape == (20, 50, 3)
    with pytest.raises(BadImageError, match="999"):
        load_image(data, 3, Limits(max_pixels=999))


@pytest.mark.parametrize("size,limit", [((20000, 20000), 1_000_000),
                                        ((10000, 8000), 100_000_000)])
def test_the_configured_pixel_limit_governs(size: tuple[int, int], limit: int) -> None:
    width, height = size
    with pytest.raises(BadImageError) as caught:
        decode(png_header_only(width, height), Limits(max_pixels=limit), "x.png")
    message = str(caught.value)
    if width * height > limit:
        assert str(limit) in message
    else:  # allowed by the limit: it gets as far as decoding, and the data is missing
        assert "truncated" in message and "bomb" not in message


# ------------------------------------------------------------------------------ modes


def test_rgba_drops_alpha() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    data = encoded(Image.fromarray(rgba, "RGBA"), "PNG")
    got = load_image(data, 3)
    assert got.dtype == np.uint8 and got.shape == (10, 12, 3)
    np.testing.assert_array_equal(got, rgba[..., :3])
    assert load_image(data, 1).shape == (10, 12, 1)


def test_palette_is_expanded() -> None:
    palette_image = rgb_picture(12, 14).quantize(colors=16)
    assert palette_image.mode == "P"
    got = load_image(encoded(palette_image, "PNG"), 3)
    np.testing.assert_array_equal(got, np.asarray(palette_image.convert("RGB")))
    grey = load_image(encoded(palette_image, "PNG"), 1)
    np.testing.assert_array_equal(grey[..., 0], np.asarray(palette_image.convert("L")))


def test_palette_with_transparency() -> None:
    palette_image = rgb_picture(12, 14).quantize(colors=8)
    data = encoded(palette_image, "PNG", transparency=0)
    assert load_image(data, 3).shape == (12, 14, 3)


def sixteen_bit_grey() -> tuple[np.ndarray, bytes]:
    values = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    return values, encoded(Image.fromarray(values), "PNG")


def test_sixteen_bit_grey_loads() -> None:
    values, data = sixteen_bit_grey()
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    grey = load_image(data, 1)
    assert grey.dtype == np.uint8 and grey.shape == (30, 40, 1)
    rgb = load_image(data, 3)
    assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values, data = sixteen_bit_grey()
    want = values.astype(np.float64) * 255 / 65535
    got = load_image(data, 1)[..., 0].astype(np.float64)
    assert np.abs(got - want).max() <= 1.0


def test_cmyk_jpeg() -> None:
    cmyk = rgb_picture(20, 16).convert("CMYK")
    data = encoded(cmyk, "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "CMYK"
    got = load_image(data, 3)
    assert got.shape == (20, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(decoded.convert("RGB")))
    assert load_image(data, 1).shape == (20, 16, 1)


def test_grey_file_for_rgb_and_rgb_file_for_grey(tmp_path: Path) -> None:
    picture = rgb_picture(9, 11)
    grey_path = tmp_path / "grey.png"
    picture.convert("L").save(grey_path)
    rgb_path = tmp_path / "rgb.png"
    picture.save(rgb_path)
    as_rgb = load_image(grey_path, 3)
    assert as_rgb.shape == (9, 11, 3)
    np.testing.assert_array_equal(as_rgb[..., 0], as_rgb[..., 1])
    np.testing.assert_array_equal(as_rgb[..., 0], np.asarray(picture.convert("L")))
    as_grey = load_image(rgb_path, 1)
    assert as_grey.shape == (9, 11, 1)
    np.testing.assert_array_equal(as_grey[..., 0], np.asarray(picture.convert("L")))


def test_pil_image_sources() -> None:
    picture = rgb_picture(7, 5)
    np.testing.assert_array_equal(load_image(picture, 3), np.asarray(picture))
    assert load_image(picture.convert("LA"), 3).shape == (7, 5, 3)
    assert load_image(picture.convert("I"), 1).shape == (7, 5, 1)
    assert to_array(picture, 1).shape == (7, 5, 1)


# ------------------------------------------------------------------------------ arrays


def test_array_grey_to_rgb_repeats() -> None:
    grey = np.random.default_rng(2).integers(0, 256, (6, 7), dtype=np.uint8)
    for source in (grey, grey[..., None]):
        got = array_image(source, 3)
        assert got.shape == (6, 7, 3) and got.dtype == np.uint8
        for c in range(3):
            np.testing.assert_array_equal(got[..., c], grey)
        np.testing.assert_array_equal(array_image(source, 1)[..., 0], grey)


def test_array_rgb_to_grey_uses_luma() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    got = array_image(rgb, 1)
    assert got.shape == (6, 7, 1) and got.dtype == np.uint8
    want = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert np.abs(got[..., 0].astype(np.float64) - want).max() <= 0.5 + 1e-4
    # agrees with Pillow's own conversion to within one grey level
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), np.int16)
    assert np.abs(got[..., 0].astype(np.int16) - pillow).max() <= 1
    np.testing.assert_array_equal(array_image(rgb, 3), rgb)


def test_array_rgba_drops_alpha() -> None:
    rgba = np.random.default_rng(4).integers(0, 256, (5, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(array_image(rgba, 3), rgba[..., :3])
    assert array_image(rgba, 1).shape == (5, 5, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16])
def test_numeric_arrays_in_0_255_are_accepted(dtype) -> None:
    values = np.random.default_rng(5).uniform(0, 255, (8, 9, 3))
    if np.issubdtype(dtype, np.integer):
        values = np.round(values)
    got = array_image(values.astype(dtype), 3)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.rint(values.astype(dtype).astype(np.float64)))
    np.testing.assert_array_equal(load_image(values.astype(dtype), 3), got)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_rejected(bad: float) -> None:
    array = np.full((4, 4, 3), 100.0)
    array[1, 2, 0] = bad
    with pytest.raises(BadImageError, match="finite"):
        array_image(array, 3)
    with pytest.raises(BadImageError):
        load_image(array.astype(np.float32), 1)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (4,), (0, 4, 3),
                                   (4, 0)])
def test_badly_shaped_arrays_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(BadImageError):
        array_image(np.zeros(shape, np.uint8), 3)


def test_non_numeric_arrays_are_rejected() -> None:
    with pytest.raises(BadImageError):
        array_image(np.full((3, 3, 3), "x"), 3)
    with pytest.raises(BadImageError):
        array_image(np.empty((3, 3, 3), object), 3)



# ------------------------------------------------------------------------------ a bundle's batch


def grey_info(height: int = 6, width: int = 10) -> BundleInfo:
    return BundleInfo(height=height, width=width, channels=1, preprocess="unit", layout="nchw",
                      activation_layout="nchw", target_layer="feat", num_classes=4, labels=[],
                      gradient="analytic")


def test_one_image_becomes_a_list_of_one() -> None:
    picture = rgb_picture()
    array = np.zeros((5, 5, 3), np.uint8)
    batch = np.zeros((2, 5, 5, 3), np.uint8)
    for single in ("a.png", Path("a.png"), b"bytes", picture, array):
        listed = as_image_list(single)
        assert len(listed) == 1 and listed[0] is single
    assert as_image_list(batch) is batch
    several = [array, picture]
    assert as_image_list(several) is several


def test_prepare_converts_and_resizes_each_image_with_pillow() -> None:
    info = grey_info()
    colour = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    picture = rgb_picture(12, 20, seed=2)
    got = prepare([colour, picture], info)
    assert got.dtype == np.uint8 and got.shape == (2, 6, 10, 1)
    luma = np.rint(colour.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    want_colour = np.asarray(Image.fromarray(luma).resize((10, 6), Image.Resampling.BILINEAR))
    want_picture = np.asarray(picture.convert("L").resize((10, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got[0, ..., 0], want_colour)
    np.testing.assert_array_equal(got[1, ..., 0], want_picture)
    assert prepare([], info).shape == (0, 6, 10, 1)
    ready = np.zeros((3, 6, 10, 1), np.uint8)
    assert prepare(ready, info) is ready  # a batch that fits is not copied


def classes(labels: list[str], count: int = 4) -> BundleInfo:
    return BundleInfo(height=2, width=2, channels=3, preprocess="unit", layout="nhwc",
                      activation_layout="nhwc", target_layer="x", num_classes=count,
                      labels=labels, gradient="analytic")


def test_check_targets() -> None:
    info = classes([])
    np.testing.assert_array_equal(check_targets(None, 3, info), [-1, -1, -1])
    np.testing.assert_array_equal(check_targets(2, 3, info), [2, 2, 2])
    got = check_targets(np.array([3, 0, 1], np.int32), 3, info)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [3, 0, 1])
    with pytest.raises(BadTargetError, match=r"^target 4 is outside \[0, 4\)$"):
        check_targets([0, 4, 1], 3, info)
    with pytest.raises(BadTargetError, match="^targets must be None, a class .* or 3 classes$"):
        check_targets([0, 1], 3, info)
    with pytest.raises(BadTargetError, match="^targets must be None"):
        check_targets([0.0, 1.0, 2.0], 3, info)


def test_targets_by_label_with_a_suggestion_for_a_typo() -> None:
    info = classes(["cat", "dog", "coffee mug", "7"])
    np.testing.assert_array_equal(check_targets("dog", 2, info), [1, 1])
    np.testing.assert_array_equal(check_targets(["coffee mug", 0, "2"], 3, info), [2, 0, 2])
    # a label that reads as a number is the label, not the number
    np.testing.assert_array_equal(check_targets("7", 1, info), [3])
    with pytest.raises(BadTargetError, match="^no class labelled 'caat'; did you mean 'cat'\\?$"):
        check_targets("caat", 1, info)
    with pytest.raises(BadTargetError, match="the bundle has no labels; give a class number"):
        check_targets("cat", 1, classes([]))
    with pytest.raises(BadTargetError, match=r"^target 9 is outside \[0, 4\)$"):
        check_targets("9", 1, info)


# ------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("channels", [1, 3])
def test_resize_is_pillow_bilinear(channels: int) -> None:
    array = np.random.default_rng(6).integers(0, 256, (23, 37, channels), dtype=np.uint8)
    got = resize(array, 16, 12)
    assert got.shape == (16, 12, channels) and got.dtype == np.uint8
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    want = np.asarray(image.resize((12, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got.reshape(want.shape), want)
    assert resize(array, 23, 37) is array
    nearest = resize(array, 46, 74, "nearest")
    np.testing.assert_array_equal(nearest[::2, ::2], array)


# ------------------------------------------------------------------------------ maps


def reference_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR, one output pixel at a time: half-pixel centres, edges clamped."""
    n, h, w = maps.shape
    out = np.zeros((n, height, width))
    for y in range(height):
        sy = min(max((y + 0.5) * h / height - 0.5, 0.0), h - 1.0)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = min(max((x + 0.5) * w / width - 0.5, 0.0), w - 1.0)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, y, x] = ((1 - fy) * (1 - fx) * maps[:, y0, x0] + (1 - fy) * fx * maps[:, y0, x1]
                            + fy * (1 - fx) * maps[:, y1, x0] + fy * fx * maps[:, y1, x1])
    return out


@pytest.mark.parametrize("source,target", [
    ((7, 7), (28, 28)),  # integer upscale
    ((8, 8), (32, 32)),
    ((5, 6), (17, 23)),  # non-integer, non-square
    ((16, 12), (5, 7)),  # downscale
    ((1, 1), (4, 6)),  # a single value
    ((3, 9), (3, 4)),  # one axis unchanged
    ((6, 6), (6, 6)),  # identity
])
def test_resize_maps_matches_per_pixel_half_pixel_bilinear(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    maps = np.random.default_rng(7).normal(size=(3, *source)).astype(np.float32)
    got = resize_maps(maps, *target)
    assert got.shape == (3, *target) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_resize(maps.astype(np.float64), *target),
                               rtol=1e-5, atol=1e-6)


def test_interpolation_matrix_rows_are_convex() -> None:
    for size_out, size_in in ((28, 7), (5, 16), (9, 9), (4, 1)):
        matrix = interpolation_matrix(size_out, size_in)
        assert matrix.shape == (size_out, size_in)
        assert (matrix >= 0).all()
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)


def test_normalize_min_max_per_map() -> None:
    maps = np.random.default_rng(8).uniform(-3, 5, (4, 6, 7)).astype(np.float32)
    got = normalize(maps)
    assert got.shape == maps.shape
    np.testing.assert_allclose(got.min(axis=(1, 2)), 0.0, atol=1e-7)
    np.testing.assert_allclose(got.max(axis=(1, 2)), 1.0, rtol=1e-6)
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(got, (maps - low) / (high - low + 1e-7), rtol=1e-6, atol=1e-7)


def test_normalize_constant_and_zero_maps_stay_finite() -> None:
    maps = np.stack([np.zeros((3, 3)), np.full((3, 3), 4.0)]).astype(np.float32)
    got = normalize(maps)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, 0.0)


def test_heatmaps_are_in_unit_range_at_the_requested_size() -> None:
    raw = np.maximum(np.random.default_rng(9).normal(size=(2, 5, 5)), 0).astype(np.float32)
    raw[1] = 0.0  # an all-zero map (e.g. a class with no positive evidence)
    got = heatmaps(raw, 20, 30)
    assert got.shape == (2, 20, 30) and got.dtype == np.float32
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_allclose(got[0], reference_resize(
        (raw[:1] - raw[0].min()) / (raw[0].max() - raw[0].min() + 1e-7), 20, 30)[0], atol=1e-6)


def test_jet_colours() -> None:
    values = np.linspace(0, 1, 11).reshape(1, 11)
    colours = jet(values)
    assert colours.shape == (1, 11, 3) and colours.dtype == np.uint8
    # OpenCV's COLORMAP_JET in RGB: dark blue at 0, green-ish middle, dark red at 1
    np.testing.assert_allclose(jet(np.array(0.0)), [0, 0, 128], atol=2)
    np.testing.assert_allclose(jet(np.array(1.0)), [128, 0, 0], atol=2)
    np.testing.assert_allclose(jet(np.array(0.5)), [128, 255, 128], atol=3)
    np.testing.assert_array_equal(jet(np.array(-1.0)), jet(np.array(0.0)))
    np.testing.assert_array_equal(jet(np.array(2.0)), jet(np.array(1.0)))
    reds, blues = colours[0, :, 0].astype(int), colours[0, :, 2].astype(int)
    assert reds[-1] > reds[0] and blues[0] > blues[-1]


@pytest.mark.parametrize("channels", [1, 3])
def test_overlay_shapes_and_blend(channels: int) -> None:
    rng = np.random.default_rng(10)
    image = rng.integers(0, 256, (9, 13, channels), dtype=np.uint8)
    heat = rng.uniform(0, 1, (9, 13)).astype(np.float32)
    got = overlay(image, heat)
    assert got.shape == (9, 13, 3) and got.dtype == np.uint8
    rgb = np.repeat(image, 3, axis=-1) if channels == 1 else image
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), rgb)
    np.testing.assert_array_equal(overlay(image, heat, alpha=1.0), jet(heat))
    want = 0.5 * rgb.astype(np.float64) + 0.5 * jet(heat).astype(np.float64)
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-6


def test_colormaps_against_their_references() -> None:
    """jet against OpenCV (pytorch-grad-cam's colouring), viridis, turbo and inferno
    against matplotlib,
    hot and gray at hand-worked points."""
    import cv2
    from matplotlib import colormaps

    values = np.linspace(0, 1, 256)
    opencv = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None],
                               cv2.COLORMAP_JET)[:, 0, ::-1]
    assert np.abs(jet(values).astype(int) - opencv.astype(int)).max() <= 4
    for name in ("viridis", "turbo", "inferno"):
        theirs = np.rint(colormaps[name](values)[:, :3] * 255)
        assert np.abs(COLORMAPS[name](values).astype(int) - theirs).max() <= 8, name
    np.testing.assert_array_equal(COLORMAPS["hot"](np.array([0, 1 / 3, 0.5, 2 / 3, 1])),
                                  [[0, 0, 0], [255, 0, 0], [255, 128, 0], [255, 255, 0],
                                   [255, 255, 255]])
    np.testing.assert_array_equal(COLORMAPS["gray"](np.array([0.0, 0.5, 1.0])),
                                  [[0, 0, 0], [128, 128, 128], [255, 255, 255]])


def test_overlay_colormap_and_alpha_are_checked() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    heat = np.linspace(0, 1, 16).reshape(4, 4)
    np.testing.assert_array_equal(overlay(image, heat, 1.0, "gray")[..., 0],
                                  np.rint(heat * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="unknown colormap 'parula'; choose from jet, viridis"):
        overlay(image, heat, colormap="parula")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        overlay(image, heat, alpha=1.5)
