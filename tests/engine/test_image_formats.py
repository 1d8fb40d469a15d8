"""Image formats by allow-list (issue 20, part 5): what ``decode`` parses at all, the
bomb check on what a container holds, and every failure of one image as bad_image."""

from __future__ import annotations

import io
import time

import hostile_images as hostile
import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from onnxcam.engine.images import (
    DEFAULT_FORMATS,
    DEFAULT_LIMITS,
    Limits,
    decode,
    image_formats,
    to_array,
)
from onnxcam.errors import BadImageError, OnnxcamError, SettingsError

EVERY_FORMAT = hostile.every_format()
# What a deployment could allow at most: all Pillow reads, less EPS.
ALL_READABLE = image_formats(name for name in (Image.init() or Image.OPEN) if name != "EPS")


def refusal(data: bytes, limits: Limits = DEFAULT_LIMITS, name: str = "x") -> str:
    with pytest.raises(BadImageError) as caught:
        decode(data, limits, name)
    assert caught.value.code == "bad_image"
    return str(caught.value)


def test_the_default_formats_are_read_and_no_other() -> None:
    assert set(DEFAULT_FORMATS) == {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
    picture = np.asarray(Image.new("RGB", (16, 12), (200, 40, 90)))
    for name, data in EVERY_FORMAT.items():
        if name in DEFAULT_FORMATS or name == "MPO":  # MPO is a JPEG with more pictures
            pixels = to_array(decode(data, Limits(), name), 3)
            # the colour back within lossy coding's error (JPEG, GIF's palette)
            assert np.abs(pixels.astype(int) - picture).max() <= 12, name
            continue
        message = refusal(data, name=name)
        assert message.startswith(f"{name}: "), message
        assert "not read here" in message or "not an image file" in message, message
    for name in ("ICO", "ICNS", "DDS", "EPS", "QOI", "PCX", "SGI", "JPEG2000"):
        message = refusal(EVERY_FORMAT[name], name="f")
        assert f"looks like {name}, a format not read here" in message, message
        assert "formats read: PNG, JPEG, WEBP, BMP, GIF, TIFF; ONNXCAM_IMAGE_FORMATS" in message


def test_a_format_outside_the_list_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No plugin but the allowed ones sees the bytes: EPS's parser (and with it
    Ghostscript) never runs, whatever else a deployment allows."""
    def parsed(self: object) -> None:
        raise AssertionError("the EPS plugin parsed the file")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", parsed)
    for limits in (Limits(), Limits(formats=ALL_READABLE)):
        message = refusal(hostile.eps(), limits, "drawing.eps")
        assert "looks like EPS" in message and "parsed" not in message, message
    with pytest.raises(ValueError, match="Ghostscript"):
        image_formats(["png", "eps"])
    with pytest.raises(ValueError, match="NOPE is not an image format"):
        image_formats(["NOPE"])
    assert image_formats([" png", "Jpeg ", ""]) == ("PNG", "JPEG")


def test_the_settings_read_and_check_the_list() -> None:
    from onnxcam.worker.settings import load_settings

    assert load_settings().limits.formats == DEFAULT_FORMATS
    assert load_settings(image_formats="png,ico").limits.formats == ("PNG", "ICO")
    assert load_settings(image_formats="").limits.formats == ()
    for bad in ("PNG,EPS", "PNG,NOPE"):
        with pytest.raises(SettingsError, match="ONNXCAM_IMAGE_FORMATS"):
            load_settings(image_formats=bad)


@pytest.mark.parametrize("name,side", [("ICO", 40_000), ("ICNS", 20_000)])
def test_a_container_is_checked_on_the_image_it_holds(name: str, side: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An ICO or ICNS entry says 256x256 (or 1024x1024) and holds a PNG of 1.6 Gpx:
    even where the format is allowed, the held PNG's size is refused before any of its
    pixels is decoded (Pillow's own guard, at the caller's limit)."""
    def decoded(self: object, *args: object) -> None:
        raise AssertionError("pixels were decoded")

    wrap = hostile.ico_with if name == "ICO" else hostile.icns_with
    data, pixels = wrap(hostile.huge_png(side, side)), side * side

    assert len(data) < 200_000
    assert name in refusal(data)  # not even parsed by default
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    started = time.perf_counter()
    message = refusal(data, Limits(formats=(name,)), "icon")
    assert message == (f"icon: {pixels} pixels is over the 64000000 pixel limit "
                       "(decompression bomb?)")
    assert time.perf_counter() - started < 1
    assert Image.MAX_IMAGE_PIXELS is None  # the guard is the caller's only while decoding


def test_only_the_first_frame_or_page_is_decoded() -> None:
    """A GIF whose second frame is 65535x65535 and a TIFF whose second page declares
    60000x60000 decode as their first, 8x8; the others are never looked at."""
    started = time.perf_counter()
    for data in (hostile.gif_with_huge_second_frame(), hostile.tiff_with_huge_second_page()):
        image = decode(data, Limits(max_pixels=100), "frames")
        assert image.size == (8, 8)
    assert time.perf_counter() - started < 1
    big_first = io.BytesIO()
    Image.new("L", (200, 100)).save(big_first, format="GIF")
    assert "20000 pixels is over the 19999 pixel limit" in refusal(
        big_first.getvalue(), Limits(max_pixels=19_999))


def test_any_exception_while_reading_is_bad_image(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(hostile.mutated_dds(), Limits(formats=("DDS",)), "x.dds")
    assert message == "x.dds: cannot decode (NotImplementedError: Unimplemented pixel " \
                      "format 1515870810)"
    png = EVERY_FORMAT["PNG"]
    for error, words in ((MemoryError(), "out of memory while decoding"),
                         (RuntimeError("x" * 5000), "cannot decode (RuntimeError: xxx"),
                         (ValueError("odd"), "corrupt or truncated image (odd)")):
        def fails(self: object, *args: object, error: Exception = error) -> None:
            raise error

        with monkeypatch.context() as patch:
            patch.setattr(ImageFile.ImageFile, "load", fails)
            message = refusal(png, name="a.png")
        assert message.startswith(f"a.png: {words}"), message
        assert len(message) < 300  # a plugin's long message is cut


def test_truncated_and_mutated_files_of_every_format_end_with_a_code() -> None:
    """Every format Pillow writes, and the read-only ones crafted here, cut short and
    with bytes overwritten, every format allowed: each decodes or is bad_image; no
    other exception, nothing slow."""
    from onnxcam.bundle import BundleInfo
    from onnxcam.worker.jobs import load

    info = BundleInfo(height=8, width=8, channels=3, preprocess="unit", layout="NHWC",
                      activation_layout="NHWC", target_layer="x", num_classes=2,
                      labels=["a", "b"], gradient="analytic")
    files = {**EVERY_FORMAT, "DDS-mutated": hostile.mutated_dds(), "PSD": hostile.psd(),
             "XPM": hostile.xpm(), "GIF-frames": hostile.gif_with_huge_second_frame(),
             "TIFF-pages": hostile.tiff_with_huge_second_page()}
    limits = Limits(max_pixels=4_000_000, formats=ALL_READABLE)
    outcomes: dict[str, int] = {"ok": 0, "bad_image": 0}
    started = time.perf_counter()
    for seed, (name, data) in enumerate(sorted(files.items())):
        for mutant in [data, *hostile.mutations(data, seed)]:
            try:
                loaded = load(mutant, name, info, limits, 64)
            except OnnxcamError as exc:
                assert exc.code == "bad_image", (name, exc)
                outcomes["bad_image"] += 1
            else:
                assert loaded.model_input.shape == (8, 8, 3)
                outcomes["ok"] += 1
    assert time.perf_counter() - started < 20
    assert outcomes["ok"] > len(files) and outcomes["bad_image"] > len(files), outcomes
