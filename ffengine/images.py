"""Decode untrusted image bytes into a clean RGB picture, or say why not.

Shoppers send anything: screenshots with alpha, CMYK JPEGs, rotated phone photos,
GIFs, 16-bit scans, truncated uploads, decompression bombs. Everything funnels through
:func:`load_image` so that the rest of the engine only ever sees RGB ``PIL.Image``;
:func:`network_input` then turns a picture into the network's fixed-size input.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ffengine.errors import ImageRejected

#: One mebibyte. Every byte limit is a whole number of MiB and every message prints MiB (:func:`format_mib`).
MIB = 1024 * 1024
#: Largest encoded file accepted (bytes): Telegram's own download limit, 20 MiB.
MAX_BYTES = 20 * MIB
#: Largest decoded picture accepted (pixels): a 50 MP photo is fine, a 1 GP bomb is not.
MAX_PIXELS = 50_000_000
#: Longest side accepted (pixels). Pillow pays for every row on its own (pointers, decoder state),
#: so a 1 x 40,000,000 strip passes the pixel limit yet costs far more than a photo.
MAX_SIDE = 12_000
#: Longest side at most this many times the shorter: nothing this thin is a photo of clothing.
MAX_ASPECT = 20
#: Decode JPEGs at reduced size when they are much bigger than this (long side, pixels).
DRAFT_SIDE = 512
#: Other formats cannot decode at reduced size; beyond this many pixels (more than a phone
#: photo) they are shrunk right after decoding, so later copies are of a small picture.
REDUCE_PIXELS = 16_000_000
#: Pixels shrunk at a time by :func:`_reduce`: copies of this size are all it adds.
BAND_PIXELS = 1_000_000
#: Modes whose pixels can be averaged as they are (palette indices and bit-packed or 16-bit
#: greyscale cannot: those become RGB first).
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")
#: Formats we decode. Others (EPS runs Ghostscript, PSD, ICO, FITS, ...) are refused
#: unopened: they are not what a phone sends and each extra parser is attack surface.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
#: Bytes asked of the kernel per read of a file.
READ_CHUNK = MIB
#: A JPEG decoder walks the picture's whole coefficient buffer once per scan, so a progressive file
#: of thousands of tiny scans costs scans x pixels of CPU whatever its size. This bounds that
#: product: an encoder's progressive scripts use about ten scans, so a 50 MP photo is well inside.
JPEG_SCAN_PIXELS = 1_500_000_000
#: Most scans a JPEG may have, however small the picture.
MAX_JPEG_SCANS = 1_000
#: Most marker segments a JPEG may have before its first picture ends (a photo has a few dozen);
#: bounds the walk that counts the scans, which runs in Python.
MAX_JPEG_SEGMENTS = 10_000
#: TIFF lets a tile be larger than the picture, and libtiff allocates whole tiles: a tile may cover
#: at most the picture, or this many pixels for small pictures (tiles of 256 or 512 are common).
TILE_PIXELS = 4_000_000
#: Where a JPEG's entropy-coded data ends: a marker other than a stuffed byte, fill or restart.
_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xff\xd0-\xd7])")
#: A marker at a segment boundary (fill bytes allowed before it).
_MARKER = re.compile(rb"\xff+([^\x00\xff])")
#: Markers that stand alone, with no length: restarts, TEM and SOI.
_STANDALONE = frozenset((0x01, 0xD8, *range(0xD0, 0xD8)))
_SOS, _EOI = 0xDA, 0xD9
#: EXIF orientation -> the transpose that shows the picture upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str]


def mib(size: int) -> str:
    """``size`` bytes as a number of MiB for a message: ``"20"``, ``"0.3"``.

    Limits are set in binary units; printing them as decimal megabytes made the same limit read
    "21 MB" in the CLI and "20 MB" in the bot, so every message about bytes goes through here.
    """
    return f"{size / MIB:.1f}".removesuffix(".0")


def format_mib(size: int) -> str:
    """``size`` bytes with its unit for a message: ``"20 MiB"``."""
    return f"{mib(size)} MiB"


def read_image_bytes(source: ImageSource, max_bytes: int = MAX_BYTES) -> bytes:
    """The encoded bytes of ``source`` (bytes or a path), refused before decoding if missing, empty or too large.

    Public so that callers which need the raw bytes too (the index build hashes them for its
    cache) apply exactly the same checks as :func:`load_image`. A path is read by
    :func:`_read_regular_file`: regular files only, and never more than ``max_bytes + 1`` bytes.
    Raises :class:`ImageRejected` (``not_found``, ``not_a_file``, ``unreadable``, ``empty``, ``too_large``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        if size > max_bytes:
            raise ImageRejected(_too_large(size, max_bytes), "too_large")
        data = bytes(source)
    else:
        data = _read_regular_file(Path(source), max_bytes)
    if not data:
        raise ImageRejected("The file is empty.", "empty")
    return data


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` bytes of the regular file at ``path``, else :class:`ImageRejected`.

    The size a file reports cannot be trusted: it is 0 for ``/dev/zero``, pipes, sockets and
    ``/proc`` files, and a file may grow while it is read. So only regular files are read, the
    type is taken from the opened descriptor (nothing can be swapped in between a check and
    the open), the open is non-blocking (a FIFO without a writer would otherwise wait forever),
    and the read stops one byte past the limit whatever the reported size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageRejected(f"File not found: {path}", "not_found") from None
    except IsADirectoryError:
        raise ImageRejected(_not_a_file(stat.S_IFDIR), "not_a_file") from None
    except OSError as exc:
        raise ImageRejected(f"Cannot read {path}: {exc.strerror}", "unreadable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected(_not_a_file(info.st_mode), "not_a_file")
        if info.st_size > max_bytes:
            raise ImageRejected(_too_large(info.st_size, max_bytes), "too_large")
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, READ_CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ImageRejected(f"Cannot read {path}: {exc.strerror}", "unreadable") from None
    finally:
        os.close(fd)
    if left <= 0:
        raise ImageRejected(_too_large(None, max_bytes), "too_large")
    return b"".join(chunks)


def _not_a_file(mode: int) -> str:
    kinds = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFIFO: "a pipe", stat.S_IFSOCK: "a socket"}
    return f"This is {kinds.get(stat.S_IFMT(mode), 'not a regular file')}, not an image file."


def _too_large(size: int | None, limit: int) -> str:
    got = f" ({format_mib(size)})" if size is not None else ""
    return f"The image is too large{got}; the limit is {format_mib(limit)}."


def load_image(
    source: ImageSource,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    draft_side: int | None = DRAFT_SIDE,
) -> Image.Image:
    """Decode ``source`` (bytes or a path) into an RGB image.

    Honours EXIF orientation, takes the first frame of animations and flattens
    transparency onto white (catalogue photos have white backgrounds).
    ``draft_side`` lets the JPEG decoder downscale by 2/4/8 while decoding (both sides
    stay at least ``draft_side``), which is several times faster for phone photos and
    loses nothing at 224 px network input; other formats bigger than :data:`REDUCE_PIXELS`
    are shrunk the same way right after decoding (:func:`_reduce`). The size limits
    (pixels, sides, aspect) are checked from the header, before any pixel is decoded, and so is
    what the size does not show (:func:`_check_cost`: JPEG scans, TIFF tiles, decoders in Python).

    Raises :class:`ImageRejected` with a user-readable message on bad input.
    """
    data = read_image_bytes(source, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_size(*img.size, max_pixels)
            _check_cost(img, data)
            if draft_side and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (draft_side, draft_side))
            img.seek(0)
            img.load()
            if draft_side:
                img = _reduce(img, draft_side)
            return _to_rgb(_upright(img))
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("The image is too big to open safely.", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected("This file is not an image I can read (try a JPEG or PNG photo).", "not_image") from None
    except Exception as exc:  # noqa: BLE001 - fuzzed files raise OSError, SyntaxError, struct.error, IndexError...
        kind = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageRejected("The image is damaged or incomplete; please send it again.", kind) from None


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse, from the header's size alone, a picture too costly to decode.

    The area bounds the pixel memory; the side and aspect bounds keep the row count (which
    costs memory of its own in Pillow) near that of a photo.
    """
    shown = f"{width}x{height} pixels"
    if width <= 0 or height <= 0:
        raise ImageRejected("The image has no pixels.", "empty")
    if width * height > max_pixels:
        raise ImageRejected(f"The image is too big ({shown}); the limit is {max_pixels / 1e6:.0f} megapixels.", "too_many_pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageRejected(
            f"The image is too long and thin ({shown}); one side may be at most {MAX_ASPECT} times the other.", "bad_shape"
        )
    if max(width, height) > MAX_SIDE:
        raise ImageRejected(f"The image is too big ({shown}); each side may be at most {MAX_SIDE} pixels.", "bad_shape")


def _check_cost(img: Image.Image, data: bytes) -> None:
    """Refuse, before decoding, a picture whose decoding costs far more than its size says.

    The probes of a progressive JPEG with thousands of scans, a TIFF with one huge tile and a BMP
    run-length file (decoded by Pillow in Python, byte by byte) each cost seconds of CPU or a GiB
    of memory from a picture that passes the size checks.
    """
    python_decoders = {tile.codec_name for tile in img.tile if tile.codec_name in Image.DECODERS}
    if python_decoders:
        raise ImageRejected(
            f"This {img.format} encoding ({', '.join(sorted(python_decoders))}) is not supported; please send a JPEG or PNG photo.",
            "unsupported",
        )
    pixels = img.width * img.height
    if img.format in ("JPEG", "MPO"):
        scans = jpeg_scans(data)
        if scans > min(MAX_JPEG_SCANS, max(1, JPEG_SCAN_PIXELS // pixels)):
            raise ImageRejected(f"This JPEG is built of {scans} scans, too many to open; please send an ordinary photo.", "too_costly")
    if img.format == "TIFF":
        tile = img.tag_v2.get(322, 0), img.tag_v2.get(323, 0)  # TileWidth, TileLength
        if isinstance(tile[0], int) and isinstance(tile[1], int) and tile[0] * tile[1] > max(pixels, TILE_PIXELS):
            raise ImageRejected(
                f"This TIFF stores its {img.width}x{img.height} picture in {tile[0]}x{tile[1]} tiles, too large to open.", "too_costly"
            )


def jpeg_scans(data: bytes, max_segments: int = MAX_JPEG_SEGMENTS) -> int:
    """How many scans (SOS segments) the first picture of the JPEG ``data`` has.

    Walks the marker segments to the first EOI, skipping each scan's entropy-coded data with a
    regular expression, so a thumbnail inside an EXIF block is not counted and the walk costs one
    step per segment. A damaged file ends the walk early: the decoder then says what is wrong.
    Raises :class:`ImageRejected` (``too_costly``) past ``max_segments`` segments.
    """
    pos, scans = 2, 0  # after SOI
    for _ in range(max_segments):
        marker = _MARKER.match(data, pos)
        if marker is None or marker[1][0] == _EOI:
            return scans
        kind, pos = marker[1][0], marker.end()
        if kind in _STANDALONE:
            continue
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if kind == _SOS:
            scans += 1
            end = _NEXT_MARKER.search(data, pos)
            if end is None:
                return scans
            pos = end.start()
    raise ImageRejected(f"This JPEG has more than {max_segments} parts, too many to open; please send an ordinary photo.", "too_costly")


def _upright(img: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says.

    Not ``ImageOps.exif_transpose``: it writes the EXIF block back without the orientation, and a
    block of millions of entries then costs seconds and a GiB. Only the one tag is read here.
    """
    method = _UPRIGHT.get(orientation) if isinstance(orientation := img.getexif().get(ExifTags.Base.Orientation), int) else None
    return img.transpose(method) if method is not None else img


def _reduce(img: Image.Image, draft_side: int) -> Image.Image:
    """A picture bigger than :data:`REDUCE_PIXELS` shrunk by a whole factor, both sides kept at least ``draft_side``.

    What JPEG's draft mode does while decoding, done after decoding for formats that cannot:
    the orientation fix, the conversion to RGB and the network's resize then copy a small
    picture instead of a huge one. Pictures up to phone size are returned untouched. It works
    band by band (Pillow's own reduce copies a whole RGBA picture to premultiply it), and the
    EXIF orientation is carried over explicitly: TIFF keeps it in tags that a copy lacks.
    """
    factor = min(img.size) // draft_side
    if factor < 2 or img.width * img.height <= REDUCE_PIXELS:
        return img
    orientation = img.getexif().get(ExifTags.Base.Orientation)
    width, height = img.size
    rows = factor * max(1, BAND_PIXELS // (width * factor))
    reduced: Image.Image | None = None
    for top in range(0, height, rows):
        band = img.crop((0, top, width, min(top + rows, height)))
        small = (band if band.mode in REDUCIBLE_MODES else _to_rgb(band)).reduce(factor)
        if reduced is None:
            reduced = Image.new(small.mode, (-(-width // factor), -(-height // factor)))
        reduced.paste(small, (0, top // factor))
    assert reduced is not None  # height > 0: checked from the header
    if orientation:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        reduced.info["exif"] = exif.tobytes()
    return reduced


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I") or img.mode == "F":
        img = _wide_to_l(img)
    return img.convert("RGB")


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit ``L`` by scaling, not clipping.

    Pillow's own ``convert`` clips 16-bit values at 255, turning a 16-bit scan white.
    ``I;16*`` is always 16-bit; ``I`` and ``F`` are scaled from 16-bit only when their
    values exceed 8 bits, and ``F`` in ``[0, 1]`` is stretched to ``[0, 255]``.
    """
    arr = np.asarray(img, dtype=np.float32)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or top > 255.0:
        arr = arr / 257.0
    elif img.mode == "F" and top <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def square_crop(img: Image.Image, resize: int, size: int) -> np.ndarray:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on a PIL image, as HWC uint8.

    Same pixels (to +-1 from float rounding), but done as one resample of just the cropped
    region straight to ``size`` (``box=``): no full-size intermediate, so it is about twice as
    fast, and a 1x5000 strip or a 50 MP photo costs no more memory than a thumbnail. The
    geometry is torchvision's exactly (integer resized size, rounded crop offset), so an
    index built here matches the study's extractor. Downscaling is antialiased (PIL's
    bilinear filter widens with the scale); beyond 6x, PIL first reduces by whole factors.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    # torchvision: the shorter side becomes ``resize``, the longer is truncated to an int ...
    rw, rh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    # ... then the crop starts at the rounded centre offset of that resized picture.
    left, top = round((rw - size) / 2), round((rh - size) / 2)
    sx, sy = w / rw, h / rh  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def whole_picture(img: Image.Image, size: int) -> np.ndarray:
    """The whole picture resampled to ``size`` x ``size`` (aspect not kept), as HWC uint8.

    Product shots are portrait and shoppers' photos any shape: a centre crop cuts the hem off a
    dress so that it looks like a top, while squashing keeps every garment whole at a fixed input
    size (so the compiled runtimes and batching are unchanged). Antialiased like :func:`square_crop`.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.uint8)


def network_input(img: Image.Image, fit: str, resize: int, size: int) -> np.ndarray:
    """A picture as the network sees it: ``fit="whole"`` (:func:`whole_picture`) or ``"crop"`` (the study's)."""
    if fit == "whole":
        return whole_picture(img, size)
    if fit == "crop":
        return square_crop(img, resize, size)
    raise ValueError(f"fit must be 'whole' or 'crop', got {fit!r}")
