"""Safe image decoding and resizing: every failure is a BadImageError, never a crash;
and turning whatever a caller passes into the uint8 batch a bundle reads.

Only the formats of an allow-list are parsed at all, and Pillow's decompression-bomb
guard is set to the caller's pixel limit while decoding, so that the declared size,
and that of any image a container holds (ICO, ICNS), is checked before any pixel is
decoded.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from onnxcam.bundle import RESIZE_LETTERBOX, BundleInfo
from onnxcam.engine.maps import bilinear_taps
from onnxcam.errors import BadImageError, BadTargetError, MissingImageError
from onnxcam.words import clipped

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 64 * 2**20
# What cameras, browsers and data sets hold. Every other format Pillow knows (ICO,
# ICNS, DDS, EPS, PSD, ...) is never parsed unless a caller lists it.
DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow draws EPS by running Ghostscript on the file: no setting turns that on.
NEVER_READ = frozenset({"EPS"})

# Outside decode() Pillow's own guard is off: its global limit is the caller's only
# while decode() holds _PILLOW_GUARD (see _bomb_guard).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
_PILLOW_GUARD = threading.Lock()

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
LETTERBOX_GREY = 114  # ultralytics' LetterBox padding_value


@dataclass(frozen=True)
class Limits:
    """What ``decode`` accepts: pixels (checked before decoding), file bytes, and the
    Pillow formats it parses at all (names as ``Image.registered_extensions()`` gives
    them: PNG, JPEG, ...)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    formats: tuple[str, ...] = DEFAULT_FORMATS


def image_formats(names: Iterable[str]) -> tuple[str, ...]:
    """Format names checked against what this Pillow reads, upper case; a ValueError
    names an unknown one, or EPS (which Pillow would hand to Ghostscript)."""
    Image.init()
    formats = tuple(dict.fromkeys(name.strip().upper() for name in names if name.strip()))
    for name in formats:
        if name in NEVER_READ:
            raise ValueError(f"{name} is never read: Pillow would run Ghostscript on it")
        if name not in Image.OPEN:
            raise ValueError(f"{name} is not an image format this Pillow reads "
                             f"(it reads {', '.join(sorted(set(Image.OPEN) - NEVER_READ))})")
    return formats


def file_suffixes(formats: Iterable[str]) -> frozenset[str]:
    """The file name suffixes Pillow gives ``formats`` (``.jpg``, ``.jpeg``, ``.jfif``
    ... for JPEG): which files of a folder are images an engine with these formats reads."""
    Image.init()
    wanted = set(formats)
    return frozenset(suffix for suffix, name in Image.registered_extensions().items()
                     if name in wanted)


DEFAULT_LIMITS = Limits()


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


def read_bytes(path: str | Path, limits: Limits, name: str | None = None,
               follow_links: bool = True) -> bytes:
    """A regular file's bytes, refused from its size before it is read when over
    ``limits.max_bytes``. Errors name the file as ``name`` (default: the path).

    The checks are on the open file, so what is checked is what is read: a folder, a
    FIFO or a device is refused (opening never blocks), and with ``follow_links=False`` a
    link put in the path's last place after a caller resolved it is not followed."""
    shown = name or str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError as exc:
        raise MissingImageError(f"{shown}: no such file") from exc
    except (ValueError, OSError) as exc:  # ValueError: a NUL byte; OSError: ELOOP, EACCES, ...
        reason = getattr(exc, "strerror", None) or exc
        raise BadImageError(f"{shown}: cannot read ({reason})") from exc
    try:
        return _read_regular(descriptor, limits, shown)
    finally:
        os.close(descriptor)


def _read_regular(descriptor: int, limits: Limits, shown: str) -> bytes:
    try:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise BadImageError(f"{shown}: is a folder, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(f"{shown}: not a regular file")
        if info.st_size > limits.max_bytes:
            raise BadImageError(f"{shown}: file is {info.st_size} bytes, over the "
                                f"{limits.max_bytes} limit")
        if info.st_size == 0:
            raise BadImageError(f"{shown}: empty file")
        with os.fdopen(os.dup(descriptor), "rb") as file:
            data = file.read(limits.max_bytes + 1)  # a file that grew since fstat stops here
    except OSError as exc:
        raise BadImageError(f"{shown}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > limits.max_bytes:
        raise BadImageError(f"{shown}: file grew over the {limits.max_bytes} limit")
    return data


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, name: str = "image") -> Image.Image:
    """Decode encoded bytes fully (the first frame or page only), refusing formats
    outside ``limits.formats`` unparsed, truncated files, and decompression bombs before
    their pixels are decoded. Any failure is a BadImageError."""
    if not data:
        raise BadImageError(f"{name}: empty file")
    if len(data) > limits.max_bytes:
        raise BadImageError(f"{name}: {len(data)} bytes, over the {limits.max_bytes} limit")
    with decoding(name), _bomb_guard(limits.max_pixels, name):
        try:
            # formats=: the other plugins are not even tried on the bytes.
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except UnidentifiedImageError:
            raise BadImageError(_unread(data, limits.formats, name)) from None
        image.load()  # the current frame: the first (GIF, WebP, PNG) or page (TIFF)
    return image


@contextmanager
def decoding(name: str) -> Iterator[None]:
    """Whatever reading or converting one image raises becomes that image's
    BadImageError: Pillow's plugins raise anything from SyntaxError to
    NotImplementedError (an unknown DDS pixel format), and a large image MemoryError."""
    try:
        yield
    except BadImageError:
        raise
    except MemoryError:
        raise BadImageError(f"{name}: out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(f"{name}: corrupt or truncated image ({clipped(str(exc))})") from exc
    except Exception as exc:  # noqa: BLE001 - a plugin's own failure ends this image only
        raise BadImageError(f"{name}: cannot decode ({type(exc).__name__}: {clipped(str(exc))})"
                            ) from exc


@contextmanager
def _bomb_guard(max_pixels: int, name: str) -> Iterator[None]:
    """Pillow's own bomb check at ``max_pixels``: it runs on the size an image declares
    as soon as it is opened, and on the image a container holds before that is decoded
    (ICO and ICNS embed PNGs of any size behind a 256x256 entry). Its limit is one
    global, so decodes take turns while it is set."""
    with _PILLOW_GUARD, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{int(found.group(1))} pixels" if found else "its size"
            raise BadImageError(f"{name}: {pixels} is over the {max_pixels} pixel limit "
                                "(decompression bomb?)") from None
        finally:
            Image.MAX_IMAGE_PIXELS = None


def _unread(data: bytes, formats: Sequence[str], name: str) -> str:
    """Why Pillow found no allowed format in ``data``: the format its first bytes show
    (from each plugin's signature test alone, nothing parsed), when it is not allowed."""
    Image.init()
    prefix = data[:16]
    for candidate in Image.ID:
        accept = Image.OPEN[candidate][1]
        try:
            matched = accept is not None and bool(accept(prefix))
        except Exception:  # noqa: BLE001 - a signature test that trips on short bytes
            matched = False
        if matched and candidate not in formats:
            allowed = ", ".join(formats) or "none"
            return (f"{name}: looks like {candidate}, a format not read here (formats "
                    f"read: {allowed}; ONNXCAM_IMAGE_FORMATS, or Limits.formats in the "
                    "library)")
    return f"{name}: not an image file"


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """uint8 [H, W, C] in RGB (C=3) or grey (C=1); alpha is dropped, palettes expanded,
    16-bit grey scaled down rather than clipped."""
    if image.mode.startswith("I"):
        wide = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(wide * 255.0 / 65535.0), 0, 255).astype(np.uint8)
        return array_image(scaled, channels)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def load_image(source: Any, channels: int = 3, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A path, encoded bytes, PIL image or array -> uint8 [H, W, C]."""
    if isinstance(source, (str, Path)):
        return to_array(decode(read_bytes(source, limits), limits, str(source)), channels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return to_array(decode(bytes(source), limits), channels)
    if isinstance(source, Image.Image):
        return to_array(source, channels)
    if isinstance(source, np.ndarray):
        return array_image(source, channels)
    raise BadImageError(f"unsupported image source: {_name(source)}")


def pixel_values(array: np.ndarray) -> np.ndarray:
    """A caller's pixels as uint8: uint8 as is, uint16 scaled from 0..65535 (unless all
    its values fit 0..255), other integers in 0..255, floats in 0..255 or in [0, 1]
    (pytorch-grad-cam's ``np.float32(img) / 255``), which are scaled by 255.

    Floats whose maximum is at most 1 are read as [0, 1]: read as 0..255 such an image
    would be black, so that reading is never the meant one. Anything outside these
    ranges (a normalised tensor with negative values, int32 values over 255) is refused
    rather than clipped into a silently different image.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16 and array.size and int(array.max()) > 255:
        # 16-bit pixels (PNG, TIFF): the full range, scaled down. One whose values all
        # fit 0..255 is read as those values, as for floats: read as 16-bit it would be
        # black, so that reading is never the meant one.
        wide = array.astype(np.float64) * (255.0 / 65535.0)
        return np.clip(np.rint(wide), 0, 255).astype(np.uint8)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) \
            or np.issubdtype(array.dtype, np.complexfloating):
        raise BadImageError(f"an image array must hold real numbers, not {array.dtype}")
    if array.size == 0:
        return array.astype(np.uint8)
    if not np.isfinite(array).all():
        raise BadImageError("an image array must hold finite numbers (found NaN or inf)")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        hint = (" (a normalised tensor? pass the image itself: the bundle embeds its "
                "preprocessing)") if low < 0 else ""
        raise BadImageError(f"image values span [{low:g}, {high:g}]; expected uint8, "
                            f"0..255 or floats in [0, 1]{hint}")
    unit = np.issubdtype(array.dtype, np.floating) and high <= 1.0
    scale = 255.0 if unit else 1.0
    return np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def array_image(array: np.ndarray, channels: int) -> np.ndarray:
    """Check a caller's array: [H, W], [H, W, 1|3|4], with values as ``pixel_values``
    accepts them."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise BadImageError(f"an image array must be [H, W] or [H, W, 1|3|4], got {array.shape}")
    array = pixel_values(array)
    array = array[..., :3] if array.shape[-1] == 4 else array
    if array.shape[-1] == channels:
        return array
    if channels == 1:
        grey = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]
    return np.repeat(array, 3, axis=-1)


def resize(array: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """Resize uint8 [H, W, C] to the bundle's size: stretched with Pillow's filter
    ``method``, or letterboxed (``letterbox``)."""
    if method == RESIZE_LETTERBOX:
        return letterbox(array, height, width)
    if array.shape[:2] == (height, width):
        return array
    resample = RESAMPLING.get(method, Image.Resampling.BILINEAR)
    channels = array.shape[-1]
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    resized = np.asarray(image.resize((width, height), resample), dtype=np.uint8)
    return resized[..., None] if resized.ndim == 2 else resized


@dataclass(frozen=True)
class Placement:
    """Where an image lies in the bundle's input: a point (x, y) of the image is at
    (left + x * scale_x, top + y * scale_y) there, in pixel-edge coordinates."""

    scale_x: float
    scale_y: float
    left: int = 0
    top: int = 0

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes [..., 4] (x0, y0, x1, y1) in the bundle's input pixels -> the image's
        own pixels (float64, not clipped to the image)."""
        offset = np.array([self.left, self.top] * 2, np.float64)
        scale = np.array([self.scale_x, self.scale_y] * 2, np.float64)
        return (np.asarray(boxes, np.float64) - offset) / scale


def placement(image_height: int, image_width: int, info: BundleInfo) -> Placement:
    """Where ``resize`` puts an image of this size in ``info``'s input."""
    if info.resize != RESIZE_LETTERBOX:
        return Placement(info.width / image_width, info.height / image_height)
    return _letterbox_placement(image_height, image_width, info.height, info.width)[0]


def _letterbox_placement(image_height: int, image_width: int, height: int, width: int
                         ) -> tuple[Placement, tuple[int, int]]:
    """ultralytics' ``LetterBox.get_params`` (centred, no stride rounding, scaling up
    allowed): the placement and the size (h, w) the image is resized to.

    The scales are those of the resize itself, rounded size over the image's, per
    axis: what ultralytics' ``scale_boxes`` divides a box by, after the padding.
    """
    ratio = min(height / image_height, width / image_width)
    # Python's round, as ultralytics: halves go to the even neighbour.
    inner = (max(round(image_height * ratio), 1), max(round(image_width * ratio), 1))
    top = round((height - inner[0]) / 2 - 0.1)
    left = round((width - inner[1]) / 2 - 0.1)
    return Placement(inner[1] / image_width, inner[0] / image_height, left, top), inner


def letterbox(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> [height, width, C] as ultralytics' predict feeds its models:
    resized keeping the aspect ratio by half-pixel bilinear interpolation (as
    ``cv2.resize`` INTER_LINEAR, to within one grey level), centred, grey 114 around."""
    where, (inner_h, inner_w) = _letterbox_placement(array.shape[0], array.shape[1],
                                                     height, width)
    inner = _bilinear(array, inner_h, inner_w)
    out = np.full((height, width, array.shape[-1]), LETTERBOX_GREY, np.uint8)
    out[where.top:where.top + inner_h, where.left:where.left + inner_w] = inner
    return out


def _bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel bilinear resize of uint8 [H, W, C], two taps per axis (no area
    averaging when shrinking: OpenCV's INTER_LINEAR has none either)."""
    if array.shape[:2] == (height, width):
        return array
    low, high, frac = bilinear_taps(height, array.shape[0])
    wide = array.astype(np.float32)
    tall = (wide[low] * (1 - frac)[:, None, None].astype(np.float32)
            + wide[high] * frac[:, None, None].astype(np.float32))
    low, high, frac = bilinear_taps(width, array.shape[1])
    both = (tall[:, low] * (1 - frac)[None, :, None].astype(np.float32)
            + tall[:, high] * frac[None, :, None].astype(np.float32))
    return np.clip(np.rint(both), 0, 255).astype(np.uint8)


# -- a bundle's batch: what ``Explainer.explain`` accepts, made ready to feed --


def as_image_list(images: Any) -> Any:
    """A 4-D array or a sequence of images as is; one image becomes a list of one."""
    if isinstance(images, np.ndarray):
        return images if images.ndim == 4 else [images]
    if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
        return [images]
    return images


def prepare(images: Any, info: BundleInfo, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Anything ``explain`` accepts -> uint8 [N, H, W, C] at the bundle's size."""
    images = as_image_list(images)
    if isinstance(images, np.ndarray):
        return check_batch(images, info, limits)
    return _stack([prepare_one(image, info, limits) for image in images], info)


def prepare_one(image: Any, info: BundleInfo, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """One image of any accepted kind -> uint8 [H, W, C] at the bundle's size."""
    return resize(load_image(image, info.channels, limits), info.height, info.width, info.resize)


def check_batch(batch: np.ndarray, info: BundleInfo,
                limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A 4-D batch as is when it already fits the bundle, else converted image by image."""
    # Values are judged over the whole batch, so that [0, 1] or 0..255 is one reading
    # for every image in it (a dark 0..255 image must not be scaled alone).
    batch = pixel_values(batch)
    if batch.shape[1:] == (info.height, info.width, info.channels):
        return batch
    return _stack([prepare_one(image, info, limits) for image in batch], info)


def _stack(images: list[np.ndarray], info: BundleInfo) -> np.ndarray:
    if not images:
        return np.zeros((0, info.height, info.width, info.channels), np.uint8)
    return np.stack(images)


def check_targets(targets: Any, count: int, info: BundleInfo) -> np.ndarray:
    """None (-1: each image's top-1), one class or ``count`` classes -> int64 [count].
    A class is its number or its label (``"cat"``)."""
    if targets is None:
        return np.full(count, -1, np.int64)
    if isinstance(targets, str) or np.isscalar(targets):
        targets = [targets] * count
    items = list(targets) if not isinstance(targets, np.ndarray) else targets.tolist()
    if len(items) != count or not all(isinstance(t, (str, int, np.integer)) and
                                      not isinstance(t, bool) for t in items):
        raise BadTargetError(f"targets must be None, a class (number or label), or {count} "
                             "classes")
    return np.array([info.class_index(t) for t in items], np.int64)
