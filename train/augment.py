"""Make studio catalogue photos look like shoppers' photos, without changing what the labels say.

Catalogue pictures are centred products on white; shoppers photograph clothes on beds,
floors and hangers, cropped, tilted, under warm or dim light. Each augmentation here
bridges one of those gaps:

* the white studio background is replaced by a procedural one (fabric stripes, checks,
  wood-like grain, gradients, noise) — only white pixels *connected to the border* are
  replaced, so a white shirt stays white;
* random crops, zoom-outs, small rotations and flips (framing);
* brightness, contrast and blur (lighting, focus).

No hue, saturation or white-balance change is ever applied: colour is a label.
Every function is deterministic given its ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from scipy import ndimage

#: A pixel is "studio white" when every channel is at least this bright.
WHITE_LEVEL = 243
#: Skip background replacement when the "backdrop" would cover more than this share (a white product).
MAX_BACKDROP = 0.9
#: ... or when what is left of the product would be a sliver (a white product fading into white).
MIN_PRODUCT = 0.12


def background_mask(img: Image.Image) -> np.ndarray:
    """``(H, W)`` bool: near-white pixels connected to the picture's border (the studio backdrop)."""
    arr = np.asarray(img.convert("RGB"))
    white = (arr >= WHITE_LEVEL).all(axis=-1)
    labels, _ = ndimage.label(white)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = border[border != 0]
    return np.isin(labels, border)


def procedural_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random surface: a muted base colour with stripes, checks, grain or a gradient, plus noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 220, size=3).astype(np.float32)
    base = base * 0.4 + base.mean() * 0.6  # muted, like bedding, floors, walls
    kind = rng.integers(0, 4)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:  # stripes (bed sheets, towels)
        period = rng.uniform(6, 40)
        pattern = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    elif kind == 1:  # checks (blankets, tiles)
        period = rng.uniform(8, 48)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == 2:  # wood-like grain (floors, tables)
        pattern = 0.5 + 0.5 * np.sin(u / rng.uniform(3, 10) + 3 * np.sin(yy / rng.uniform(20, 80)))
    else:  # smooth gradient (walls, shadows)
        pattern = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    second = rng.uniform(40, 220, size=3).astype(np.float32)
    second = second * 0.4 + second.mean() * 0.6
    mix = rng.uniform(0.1, 0.5)
    out = base[None, None, :] * (1 - mix * pattern[..., None]) + second[None, None, :] * (mix * pattern[..., None])
    out += rng.normal(0, rng.uniform(2, 12), size=out.shape).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def replace_background(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Composite the product onto a procedural surface (soft edge, so no white halo)."""
    mask = background_mask(img)
    if not mask.any() or mask.mean() > MAX_BACKDROP or mask.mean() > 1 - MIN_PRODUCT:
        return img
    mask = ndimage.binary_dilation(mask, iterations=2)  # swallow the JPEG halo around the product
    alpha = Image.fromarray((mask * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2))
    return Image.composite(procedural_background(img.size, rng), img, alpha)


def random_frame(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop in (closer shot) or zoom out (product smaller in the frame), flip, maybe rotate a little.

    New area is studio white, so that :func:`replace_background` covers it afterwards.
    """
    white = (255, 255, 255)
    w, h = img.size
    if rng.random() < 0.7:
        scale = rng.uniform(0.55, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(w * np.sqrt(scale * aspect))))
        ch = int(min(h, round(h * np.sqrt(scale / aspect))))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((left, top, left + cw, top + ch))
    else:
        pad = rng.uniform(1.1, 1.5)
        canvas = Image.new("RGB", (round(w * pad), round(h * pad)), white)
        canvas.paste(img, (int(rng.integers(0, canvas.width - w + 1)), int(rng.integers(0, canvas.height - h + 1))))
        img = canvas
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4:
        img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=white)
    return img


def relight(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and focus changes; never hue or saturation."""
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.65, 1.25)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return img


def shopper_view(img: Image.Image, rng: np.random.Generator, *, background_p: float = 0.8) -> Image.Image:
    """One augmented RGB view of a catalogue photo, as a shopper might have taken it."""
    img = random_frame(img.convert("RGB"), rng)
    if rng.random() < background_p:
        img = replace_background(img, rng)
    return relight(img, rng)
