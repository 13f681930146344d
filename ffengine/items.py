"""Which item? The garments an outfit photo shows, where they are, and what colour they are.

A photo of a person shows a top, trousers and shoes at once; the whole-photo search answers
with whatever dominates. Here the category prior's linear head (:mod:`ffengine.prior`) is read
as a detector: the store categories it finds likely are the photo's *items*, and each one's
class activation map (CAM, Zhou et al. 2016) - the category's weights applied to every cell of
the last feature map before it is pooled - says where that garment is. Because the head is
linear on the pooled features, the map is exact, not an approximation: the head's score is the
map's mean (over the features' length). Searching one item embeds the crop of its box.

Backbone features follow shape and texture more than colour, so an item is also matched on
the colour of its pixels: a hue/saturation/value histogram of the centre of the picture (the
crop is centred on the garment; a product shot is framed on the product), compared by
histogram intersection. The catalogue's histograms are computed at index build from the same
network input the features come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ffengine.prior import LinearHead

#: A category is offered as an item from this probability up (chosen on held-out outfit photos, bench/items.py).
ITEM_PROBABILITY = 0.05
#: At most this many items per photo (the bot's row of buttons).
MAX_ITEMS = 4
#: A box holds the CAM's cells at or above this share of its range (min 0, max 1).
BOX_LEVEL = 0.35
#: The crop adds this share of the box's size on each side (the garment's edges and some context).
BOX_MARGIN = 0.1
#: Weight of the colour match (histogram intersection, 0..1) beside the cosine similarity of the features.
COLOUR_WEIGHT = 3.0
#: Histogram layout: hue x saturation x value bins for coloured pixels, value bins for greys.
HUE_BINS, SAT_BINS, VAL_BINS = 8, 3, 3
COLOUR_BINS = HUE_BINS * SAT_BINS * VAL_BINS + VAL_BINS
#: Pixels with a saturation (0..255) below this are grey: their hue is noise.
GREY_SATURATION = 40
#: The histogram reads the picture at this size (a thumbnail has all the colour there is).
COLOUR_GRID = 56

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Item:
    """A garment in a photo: a store category, how likely, and where: ``(left, top, right, bottom)`` pixels."""

    category: str
    probability: float
    box: Box

    def to_json(self) -> dict[str, object]:
        return {"category": self.category, "probability": round(self.probability, 4), "box": list(self.box)}


def class_map(head: LinearHead, fmap: np.ndarray, cls: int) -> np.ndarray:
    """``(D, h, w)`` feature map -> ``(h, w)`` activation of class ``cls``: its weights applied to each cell."""
    return np.tensordot(head.weight[:, cls], fmap, axes=(0, 0))


def upsampled(cam: np.ndarray, size: int) -> np.ndarray:
    """A ``(h, w)`` map, bilinearly resized to ``(size, size)`` and scaled to 0..1."""
    big = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    low, high = float(big.min()), float(big.max())
    return (big - low) / (high - low) if high > low else np.ones_like(big)


def cam_box(cam: np.ndarray, width: int, height: int, level: float = BOX_LEVEL) -> Box:
    """The box, in a ``width x height`` picture, around the cells where ``cam`` reaches ``level`` of its range.

    The map covers the whole picture (the network sees it squashed to a square), so cells scale
    to pixels per axis.
    """
    grid = COLOUR_GRID
    ys, xs = np.nonzero(upsampled(cam, grid) >= level)
    return (
        int(xs.min() * width // grid),
        int(ys.min() * height // grid),
        int(-(-(xs.max() + 1) * width // grid)),
        int(-(-(ys.max() + 1) * height // grid)),
    )


def with_margin(box: Box, width: int, height: int, margin: float = BOX_MARGIN) -> Box:
    """``box`` grown by ``margin`` of its size on each side, kept inside the picture."""
    left, top, right, bottom = box
    dx, dy = int((right - left) * margin), int((bottom - top) * margin)
    return max(0, left - dx), max(0, top - dy), min(width, right + dx), min(height, bottom + dy)


def valid_box(box: Sequence[int], width: int, height: int) -> bool:
    """Whether ``box`` is a non-empty ``(left, top, right, bottom)`` inside a ``width x height`` picture."""
    if len(box) != 4 or not all(isinstance(v, int) for v in box):
        return False
    left, top, right, bottom = box
    return 0 <= left < right <= width and 0 <= top < bottom <= height


def find_items(
    head: LinearHead,
    proba: np.ndarray,
    fmap: np.ndarray,
    width: int,
    height: int,
    *,
    threshold: float = ITEM_PROBABILITY,
    limit: int = MAX_ITEMS,
) -> list[Item]:
    """One photo's likely items, most probable first: ``proba (C,)`` from ``head``, ``fmap (D, h, w)``.

    A class that pools rare categories names no store category and is never an item.
    """
    items: list[Item] = []
    for cls in np.argsort(-proba, kind="stable")[: limit + 1]:
        name, p = head.classes[cls], float(proba[cls])
        if p < threshold or len(items) == limit:
            break
        if name.startswith("("):  # the pooled rare categories
            continue
        items.append(Item(name, p, cam_box(class_map(head, fmap, int(cls)), width, height)))
    return items


def centre_weights(size: int = COLOUR_GRID) -> np.ndarray:
    """``(size, size)`` Gaussian weights, 1 at the centre, about 0.2 at the middle of each edge."""
    u = (np.arange(size) + 0.5) / size * 7 - 3.5  # the 7 x 7 feature map's cell units
    return np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / 8).astype(np.float32)


_CENTRE = centre_weights()


def colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """``(S, S, 3)`` uint8 network input -> ``(COLOUR_BINS,)`` float32 centre-weighted colour histogram, sum 1."""
    thumb = Image.fromarray(np.ascontiguousarray(pixels)).resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX)
    hsv = np.asarray(thumb.convert("HSV")).reshape(-1, 3).astype(np.int32)
    hue, sat, val = (hsv[:, 0] * HUE_BINS) >> 8, (hsv[:, 1] * SAT_BINS) >> 8, (hsv[:, 2] * VAL_BINS) >> 8
    coloured = (hue * SAT_BINS + sat) * VAL_BINS + val
    bins = np.where(hsv[:, 1] < GREY_SATURATION, HUE_BINS * SAT_BINS * VAL_BINS + val, coloured)
    hist = np.bincount(bins, weights=_CENTRE.reshape(-1), minlength=COLOUR_BINS).astype(np.float32)
    return hist / hist.sum()


def colour_match(query: np.ndarray, products: np.ndarray) -> np.ndarray:
    """Histogram intersection, 0..1: ``query (B,)`` against ``products (m, B)`` -> ``(m,)`` float32."""
    return np.minimum(products.astype(np.float32), query[None, :]).sum(axis=1)
