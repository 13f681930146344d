"""Decode untrusted image bytes into a clean RGB picture, or say why not.

Shoppers send anything: screenshots with alpha, CMYK JPEGs, rotated phone photos,
GIFs, 16-bit scans, truncated uploads, decompression bombs. Everything funnels through
:func:`load_image` so that the rest of the engine only ever sees RGB ``PIL.Image``;
:func:`square_crop` then turns a picture into the network's fixed-size input.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ffengine.errors import ImageRejected

#: Largest encoded file accepted (bytes). Telegram's own download limit is 20 MB.
MAX_BYTES = 20 * 1024 * 1024
#: Largest decoded picture accepted (pixels): a 50 MP photo is fine, a 1 GP bomb is not.
MAX_PIXELS = 50_000_000
#: Decode JPEGs at reduced size when they are much bigger than this (long side, pixels).
DRAFT_SIDE = 512
#: Formats we decode. Others (EPS runs Ghostscript, PSD, ICO, FITS, ...) are refused
#: unopened: they are not what a phone sends and each extra parser is attack surface.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str]


def read_image_bytes(source: ImageSource, max_bytes: int = MAX_BYTES) -> bytes:
    """The encoded bytes of ``source`` (bytes or a path), refused before decoding if missing, empty or too large.

    Public so that callers which need the raw bytes too (the index build hashes them for its
    cache) apply exactly the same checks as :func:`load_image`; a path's size is checked
    before the file is read, so a huge file is never loaded into memory.
    Raises :class:`ImageRejected` (``not_found``, ``unreadable``, ``empty``, ``too_large``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageRejected(f"File not found: {path}", "not_found") from None
        except OSError as exc:
            raise ImageRejected(f"Cannot read {path}: {exc.strerror}", "unreadable") from None
        if size > max_bytes:
            raise ImageRejected(_too_large(size, max_bytes), "too_large")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageRejected(f"Cannot read {path}: {exc.strerror}", "unreadable") from None
    if not data:
        raise ImageRejected("The file is empty.", "empty")
    if len(data) > max_bytes:
        raise ImageRejected(_too_large(len(data), max_bytes), "too_large")
    return data


def _too_large(size: int, limit: int) -> str:
    return f"The image is too large ({size / 1e6:.1f} MB); the limit is {limit / 1e6:.0f} MB."


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
    loses nothing at 224 px network input. The pixel limit is checked from the header,
    before any pixel is decoded.

    Raises :class:`ImageRejected` with a user-readable message on bad input.
    """
    data = read_image_bytes(source, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageRejected("The image has no pixels.", "empty")
            if width * height > max_pixels:
                raise ImageRejected(
                    f"The image is too big ({width}x{height} pixels); the limit is {max_pixels / 1e6:.0f} megapixels.",
                    "too_many_pixels",
                )
            if draft_side and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (draft_side, draft_side))
            img.seek(0)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("The image is too big to open safely.", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected("This file is not an image I can read (try a JPEG or PNG photo).", "not_image") from None
    except Exception as exc:  # noqa: BLE001 - fuzzed files raise OSError, SyntaxError, struct.error, IndexError...
        kind = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageRejected("The image is damaged or incomplete; please send it again.", kind) from None


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
