"""docs/quality.png: fixed validation photos with their five results before and after, side by side.

Drawn with :func:`ffengine.sheet.contact_sheet` (one sheet per side), joined under a title band.
Photos are picked by a fixed rule (:func:`pick_photos`), never by how their results look.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ffengine.images import load_image
from ffengine.recommend import Recommendation
from ffengine.sheet import SheetRow, contact_sheet, font

THUMB = 112
MAX_BYTES = 2_000_000
TITLE_H = 30
GAP = 16


def pick_photos(labels: Sequence[str], count: int = 12) -> list[int]:
    """The first photo of each class in file order, then each class's second, ... until ``count``; in class order."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < count and any(len(rows) > depth for rows in by_class.values()):
        picked += [rows[depth] for _, rows in sorted(by_class.items()) if len(rows) > depth][: count - len(picked)]
        depth += 1
    return sorted(picked, key=lambda i: (labels[i], i))


def side(photos: Sequence[Path], captions: Sequence[str], results: Sequence[Sequence[Recommendation]], tmp: Path, name: str) -> Image.Image:
    rows = [SheetRow(load_image(p), c, r) for p, c, r in zip(photos, captions, results, strict=True)]
    return Image.open(contact_sheet(rows, tmp / f"{name}.png", k=5, thumb=THUMB)).convert("RGB")


def before_after(
    photos: Sequence[Path],
    captions: Sequence[str],
    before: Sequence[Sequence[Recommendation]],
    after: Sequence[Sequence[Recommendation]],
    titles: tuple[str, str],
    out: Path,
) -> Path:
    """Write ``out``: each photo's ``before`` results on the left, ``after`` on the right, under ``titles``."""
    with tempfile.TemporaryDirectory() as tmp:
        left = side(photos, captions, before, Path(tmp), "before")
        right = side(photos, captions, after, Path(tmp), "after")
    sheet = Image.new("RGB", (left.width + GAP + right.width, TITLE_H + max(left.height, right.height)), (255, 255, 255))
    sheet.paste(left, (0, TITLE_H))
    sheet.paste(right, (left.width + GAP, TITLE_H))
    draw = ImageDraw.Draw(sheet)
    draw.line([(left.width + GAP // 2, 0), (left.width + GAP // 2, sheet.height)], fill=(160, 160, 160), width=2)
    for x, title in ((8, titles[0]), (left.width + GAP + 8, titles[1])):
        draw.text((x, 8), title, fill=(0, 0, 0), font=font(15))
    return save_small(sheet, out)


def save_small(img: Image.Image, out: Path, max_bytes: int = MAX_BYTES) -> Path:
    """PNG at full colour if it fits ``max_bytes``, else with a 256-colour palette."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > max_bytes:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(buf, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return out
