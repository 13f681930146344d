"""Image files built to cost far more to decode than their size says: the probes of issue 20.

Shared by the tests (each one refused or decoded cheaply) and ``bench/hostile.py`` (what each
costs in CPU and memory). Every builder returns the encoded bytes and never holds the picture
decoded at full size itself.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

#: TIFF tag numbers used below (TIFF 6.0).
TIFF_TAGS = {
    "ImageWidth": 256,
    "ImageLength": 257,
    "BitsPerSample": 258,
    "Compression": 259,
    "Photometric": 262,
    "SamplesPerPixel": 277,
    "PlanarConfiguration": 284,
    "TileWidth": 322,
    "TileLength": 323,
    "TileOffsets": 324,
    "TileByteCounts": 325,
}
SHORT, LONG = 3, 4


def _segments(jpeg: bytes) -> tuple[bytes, list[bytes], bytes]:
    """A baseline-or-progressive JPEG split into its header (to the first SOS), its scans
    (each an SOS segment with its entropy-coded data, plus any tables right before the next one)
    and the EOI marker."""
    first = jpeg.index(b"\xff\xda")
    end = jpeg.rindex(b"\xff\xd9")
    body, scans, start = jpeg[first:end], [], 0
    while (nxt := body.find(b"\xff\xda", start + 2)) != -1:
        scans.append(body[start:nxt])
        start = nxt
    scans.append(body[start:])
    return jpeg[:first], scans, jpeg[end:]


def progressive_scan_bomb(width: int = 8_000, height: int = 6_000, scans: int = 3_000) -> bytes:
    """A flat grey progressive JPEG whose last AC scan is repeated ``scans`` times.

    Each repeat is under a hundred bytes (end-of-band runs over a flat picture), yet the decoder
    walks every block of the picture's coefficient buffer once per scan: the cost grows with
    scans x pixels, not with the file's size. libjpeg only warns about the repeated scans.
    """
    grey = Image.new("L", (width, height), 128)
    header, parts, eoi = _segments(_encode(grey, "JPEG", progressive=True, quality=75))
    return header + b"".join(parts) + parts[-1] * scans + eoi


def tiff_tile_bomb(side: int = 64, tile: int = 32_768) -> bytes:
    """A ``side`` x ``side`` greyscale TIFF stored as one deflated ``tile`` x ``tile`` tile.

    TIFF allows tiles larger than the picture; libtiff allocates a whole tile to decode one, so
    the picture size that a header check reads says nothing about the memory spent.
    """
    packer = zlib.compressobj(9)
    row = bytes(tile)
    data = b"".join(packer.compress(row) for _ in range(tile)) + packer.flush()
    entries = [
        ("ImageWidth", LONG, side),
        ("ImageLength", LONG, side),
        ("BitsPerSample", SHORT, 8),
        ("Compression", SHORT, 8),  # Adobe deflate
        ("Photometric", SHORT, 1),  # black is zero
        ("SamplesPerPixel", SHORT, 1),
        ("PlanarConfiguration", SHORT, 1),
        ("TileWidth", LONG, tile),
        ("TileLength", LONG, tile),
        ("TileOffsets", LONG, 0),  # filled in below
        ("TileByteCounts", LONG, len(data)),
    ]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for name, kind, value in entries:
        value = data_at if name == "TileOffsets" else value
        packed = struct.pack("<HH", value, 0) if kind == SHORT else struct.pack("<I", value)
        ifd += struct.pack("<HHI", TIFF_TAGS[name], kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + struct.pack("<I", 0) + data


def exif_bomb(fmt: str = "PNG", entries: int = 9_000_000, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small ``fmt`` (PNG or WebP) picture whose EXIF block says Orientation 6 and holds one tag
    of ``entries`` SHORT values.

    Pillow's ``exif_transpose`` parses the block, drops the orientation and writes the whole block
    back, unpacking every value into a Python int on the way.
    """
    count = 2
    ifd0 = 8
    values_at = ifd0 + 2 + 12 * count + 4
    exif = b"II*\x00" + struct.pack("<I", ifd0) + struct.pack("<H", count)
    exif += struct.pack("<HHI", 0x0112, SHORT, 1) + struct.pack("<HH", 6, 0)  # Orientation: rotate 90 CW to view
    exif += struct.pack("<HHII", 0x0213 + 0x1000, SHORT, entries, values_at)  # a private tag, huge
    exif += struct.pack("<I", 0) + bytes(2 * entries)
    picture = Image.new("RGB", size, (200, 30, 30))
    picture.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    return _encode(picture, fmt, exif=b"Exif\x00\x00" + exif if fmt == "WEBP" else exif, lossless=True)


def bmp_rle_bomb(width: int = 12_000, height: int = 4_000) -> bytes:
    """An 8-bit run-length BMP whose every row is one pixel and an end of line: four bytes a row,
    which Pillow's decoder, written in Python, pads out to the full width one byte at a time."""
    runs = b"\x01\x01\x00\x00" * height + b"\x00\x01"  # (1 pixel of colour 1, end of line) per row, end of bitmap
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset)
    return header + info + palette + runs


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
