"""Safe image decoding and resizing: every failure is a BadImageError, never a crash.

Pillow's decompression-bomb guard is set explicitly, and the pixel count is checked
from the header before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from onnxcam.errors import BadImageError, MissingImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 64 * 2**20

# Pillow's own guard is switched off on purpose: decode() checks the caller's limit
# from the header, before any pixel is decoded, so that limit is the one that holds.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


DEFAULT_LIMITS = Limits()


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else type(source).__name__


def read_bytes(path: str | Path, limits: Limits, name: str | None = None) -> bytes:
    """A local file's bytes, refused from its size before it is read when over
    ``limits.max_bytes``. Errors name the file as ``name`` (default: the path)."""
    path = Path(path)
    shown = name or str(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise BadImageError(f"{shown}: file is {size} bytes, over the {limits.max_bytes} limit")
        if size == 0:
            raise BadImageError(f"{shown}: empty file")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingImageError(f"{shown}: no such file") from exc
    except IsADirectoryError as exc:
        raise BadImageError(f"{shown}: is a folder, not an image") from exc
    except OSError as exc:
        raise BadImageError(f"{shown}: cannot read ({exc.strerror or exc})") from exc


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, name: str = "image") -> Image.Image:
    """Decode encoded bytes fully, refusing truncated files and decompression bombs."""
    if not data:
        raise BadImageError(f"{name}: empty file")
    if len(data) > limits.max_bytes:
        raise BadImageError(f"{name}: {len(data)} bytes, over the {limits.max_bytes} limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise BadImageError(
                    f"{name}: {width}x{height} pixels is over the {limits.max_pixels} limit "
                    "(decompression bomb?)"
                )
            image.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(f"{name}: not an image file") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    return image


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


def array_image(array: np.ndarray, channels: int) -> np.ndarray:
    """Check a caller's array: [H, W], [H, W, 1|3|4], uint8 or floats in 0..255."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise BadImageError(f"an image array must be [H, W] or [H, W, 1|3|4], got {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise BadImageError("an image array must hold finite numbers")
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    array = array[..., :3] if array.shape[-1] == 4 else array
    if array.shape[-1] == channels:
        return array
    if channels == 1:
        grey = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]
    return np.repeat(array, 3, axis=-1)


def resize(array: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """Resize uint8 [H, W, C] to the bundle's size with Pillow."""
    if array.shape[:2] == (height, width):
        return array
    resample = RESAMPLING.get(method, Image.Resampling.BILINEAR)
    channels = array.shape[-1]
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    resized = np.asarray(image.resize((width, height), resample), dtype=np.uint8)
    return resized[..., None] if resized.ndim == 2 else resized
