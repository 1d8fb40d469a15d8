"""Image files an attacker would send a worker, built in code: containers that hide a
huge picture behind a small declared size (ICO, ICNS), a DDS Pillow cannot read, an
EPS that would start Ghostscript, frames and pages past the first, and one file of
every format this Pillow can write."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

HUGE_SIDE = 40_000  # 1.6 Gpx: 1.6 GB as one byte a pixel, and under 200 KB as a PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def huge_png(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """A valid black 1-bit grey PNG of width x height, written row by row so that
    building it never holds its pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body)
            + _chunk(b"IEND", b""))


def ico_with(png: bytes) -> bytes:
    """An ICO of one entry that declares 256x256 and holds ``png``."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def icns_with(png: bytes) -> bytes:
    """An ICNS whose 'ic10' (1024x1024 at 2x) icon is ``png``."""
    icon = b"ic10" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(icon)) + icon


def mutated_dds() -> bytes:
    """A DDS that Pillow wrote, its pixel format changed to a FourCC no decoder knows:
    Pillow raises NotImplementedError while opening it."""
    out = io.BytesIO()
    Image.new("RGBA", (8, 8), (10, 20, 30, 255)).save(out, format="DDS")
    data = bytearray(out.getvalue())
    flags_at = 4 + 72 + 4  # magic, the header up to its pixel format, that one's size
    struct.pack_into("<I", data, flags_at, 0x4)  # DDPF_FOURCC
    data[flags_at + 4:flags_at + 8] = b"ZZZZ"
    return bytes(data)


def eps() -> bytes:
    """A small EPS: Pillow reads its header itself, then runs Ghostscript to draw it."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
            b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def gif_with_huge_second_frame() -> bytes:
    """A GIF whose first frame is 8x8 and whose second frame's descriptor places a
    65535x65535 frame: only what a reader seeks to is ever decoded."""
    out = io.BytesIO()
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    first.save(out, format="GIF", save_all=True, append_images=[second])
    data = out.getvalue()
    second = data.rindex(b"\x2c")  # the last image descriptor
    while struct.unpack_from("<HH", data, second + 5) != (8, 8):
        second = data.rindex(b"\x2c", 0, second)
    return data[:second + 5] + struct.pack("<HH", 65535, 65535) + data[second + 9:]


def tiff_with_huge_second_page() -> bytes:
    """A two-page TIFF whose second page declares 60000x60000 pixels."""
    out = io.BytesIO()
    first, second = Image.new("L", (8, 8), 5), Image.new("L", (60_000, 1), 7)
    first.save(out, format="TIFF", save_all=True, append_images=[second])
    data = bytearray(out.getvalue())
    # The second page's ImageLength (tag 257, SHORT or LONG) becomes 60000.
    second_ifd = _tiff_ifds(bytes(data))[1]
    for offset in _tiff_entries(bytes(data), second_ifd):
        tag, kind = struct.unpack_from("<HH", data, offset)
        if tag == 257:
            struct.pack_into("<I" if kind == 4 else "<H", data, offset + 8, 60_000)
    return bytes(data)


def _tiff_ifds(data: bytes) -> list[int]:
    ifds, offset = [], struct.unpack_from("<I", data, 4)[0]
    while offset:
        ifds.append(offset)
        count = struct.unpack_from("<H", data, offset)[0]
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * count)[0]
    return ifds


def _tiff_entries(data: bytes, ifd: int) -> list[int]:
    count = struct.unpack_from("<H", data, ifd)[0]
    return [ifd + 2 + 12 * i for i in range(count)]


# Formats Pillow registers a writer for but cannot write without extra software or
# that write no image (plugins for formats handled elsewhere).
_NO_WRITER = {"BUFR", "GRIB", "HDF5", "WMF", "PDF"}
# What each format can hold; the rest get RGB.
_MODES = {"BLP": "RGBA", "DDS": "RGBA", "ICNS": "RGBA", "XBM": "1", "MSP": "1", "PALM": "P",
          "SPIDER": "F", "SGI": "RGB", "PCX": "RGB", "IM": "RGB"}


def every_format() -> dict[str, bytes]:
    """One small picture in each format this Pillow can write, by format name."""
    Image.init()
    files = {}
    for name in sorted(set(Image.SAVE) - _NO_WRITER):
        picture = Image.new("RGB", (16, 12), (200, 40, 90)).convert(_MODES.get(name, "RGB"))
        out = io.BytesIO()
        try:
            picture.save(out, format=name)
        except (OSError, ValueError, KeyError):  # a writer this build lacks (AVIF, say)
            continue
        files[name] = out.getvalue()
    return files


def read_only_formats() -> dict[str, bytes]:
    """Crafted files of formats Pillow reads but does not write."""
    return {"ICO-huge-png": ico_with(huge_png()), "ICNS-huge-png": icns_with(huge_png(20_000,
                                                                                       20_000)),
            "DDS-mutated": mutated_dds(), "EPS": eps(), "PSD": psd(), "XPM": xpm()}


def psd() -> bytes:
    """A one-channel 4x4 PSD, raw pixels."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 4, 4, 8, 1)
    return header + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + bytes(range(16))


def xpm() -> bytes:
    return (b'/* XPM */\nstatic char *x[] = {\n"2 2 2 1",\n"a c #FF0000",\n"b c #0000FF",\n'
            b'"ab",\n"ba"\n};\n')


def mutations(data: bytes, seed: int, count: int = 6) -> list[bytes]:
    """``data`` truncated at a few points and with bytes overwritten: deterministic."""
    import random

    rng = random.Random(seed)
    out = [data[:len(data) // 2], data[:max(1, len(data) // 10)], data[:-1]]
    for _ in range(count - len(out)):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        out.append(bytes(flipped))
    return out
