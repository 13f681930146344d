"""A contact sheet: each query photo beside its recommendations, with titles, for a person to judge.

Numbers say how often the category matches; only looking says whether the results are any good.
One row per query photo; remote product images (http URLs) are shown as a labelled placeholder
because drawing a sheet must not hit the network.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ffengine.errors import FFError
from ffengine.images import load_image
from ffengine.recommend import Recommendation

THUMB = 160
CAPTION_LINES = 3
PAD = 8
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (225, 225, 225)
TEXT = (20, 20, 20)
ERROR_TEXT = (170, 0, 0)
BOX_COLOURS = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48)]


@dataclass(frozen=True)
class SheetRow:
    """One query: its picture (None if it could not be read), a caption, results or an error."""

    query: Image.Image | None
    caption: str
    results: Sequence[Recommendation] = ()
    error: str | None = None
    boxes: Sequence[tuple[tuple[int, int, int, int], str]] = ()  # (box in the query's pixels, label) to draw on it


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def thumbnail(img: Image.Image | None, size: int, note: str = "") -> Image.Image:
    """``img`` fitted into a ``size`` square on white; a grey placeholder with ``note`` when absent."""
    tile = Image.new("RGB", (size, size), BACKGROUND if img is not None else PLACEHOLDER)
    if img is None:
        ImageDraw.Draw(tile).text((6, size // 2 - 6), note, fill=TEXT, font=font(11))
        return tile
    pic = img.copy()
    pic.thumbnail((size, size), Image.Resampling.LANCZOS)
    tile.paste(pic, ((size - pic.width) // 2, (size - pic.height) // 2))
    return tile


def with_boxes(img: Image.Image | None, boxes: Sequence[tuple[tuple[int, int, int, int], str]]) -> Image.Image | None:
    """A copy of ``img`` with each box outlined and labelled (the items ``recommend --items`` found)."""
    if img is None or not boxes:
        return img
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, min(out.size) // 80)
    label_font = font(max(12, min(out.size) // 14))
    for (box, label), colour in zip(boxes, BOX_COLOURS * len(boxes), strict=False):
        draw.rectangle(box, outline=colour, width=width)
        draw.text((box[0] + width + 2, box[1] + width), label, fill=colour, font=label_font, stroke_width=2, stroke_fill=BACKGROUND)
    return out


def product_picture(image_ref: str) -> tuple[Image.Image | None, str]:
    """Load a product's local image; remote or unreadable ones give a placeholder note."""
    if image_ref.startswith(("http://", "https://")):
        return None, "(remote image)"
    try:
        return load_image(image_ref), ""
    except FFError:
        return None, "(image unreadable)"


def wrap(text: str, width: int, lines: int) -> list[str]:
    out = textwrap.wrap(text, width=width) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(width - 1, 1)] + "…"
    return out


def contact_sheet(rows: Sequence[SheetRow], out: str | os.PathLike[str], *, k: int = 5, thumb: int = THUMB) -> Path:
    """Draw ``rows`` (query, then up to ``k`` results each) into a PNG at ``out``; returns its path."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    line_h = 14
    cell_w, cell_h = thumb + PAD, thumb + PAD + line_h * CAPTION_LINES + PAD
    sheet = Image.new("RGB", (PAD + cell_w * (k + 1), PAD + cell_h * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    small = font(11)
    chars = max(8, thumb // 7)
    for r, row in enumerate(rows):
        y = PAD + r * cell_h
        sheet.paste(thumbnail(with_boxes(row.query, row.boxes), thumb, "(unreadable)"), (PAD, y))
        caption = wrap(f"query: {row.caption}", chars, CAPTION_LINES)
        draw.multiline_text((PAD, y + thumb + 4), "\n".join(caption), fill=TEXT, font=small, spacing=2)
        if row.error:
            text = "\n".join(wrap(row.error, chars * k, CAPTION_LINES))
            draw.multiline_text((PAD + cell_w, y + thumb // 2 - 10), text, fill=ERROR_TEXT, font=font(13), spacing=2)
            continue
        for c, rec in enumerate(row.results[:k], start=1):
            x = PAD + c * cell_w
            picture, note = product_picture(rec.product.image)
            sheet.paste(thumbnail(picture, thumb, note), (x, y))
            label = wrap(f"{rec.rank}. {rec.product.title}", chars, CAPTION_LINES - 1) + [f"d={rec.distance:.3f}"]
            draw.multiline_text((x, y + thumb + 4), "\n".join(label), fill=TEXT, font=small, spacing=2)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
