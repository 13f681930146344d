"""bench/quality.py's own arithmetic: colour agreement, prior re-weighting, photo picking, the sheet."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402
import quality_sheet  # noqa: E402

from ffengine.catalog import Product  # noqa: E402
from ffengine.prior import fit_priors  # noqa: E402
from ffengine.recommend import Recommendation  # noqa: E402


def products(colours: list[str], images: list[str] | None = None) -> list[Product]:
    images = images or [f"/img/{i}.jpg" for i in range(len(colours))]
    return [Product(id=str(i), title=f"p{i}", url=None, image=img, colour=c or None) for i, (c, img) in enumerate(zip(colours, images, strict=True))]


def recs(items: list[Product], rows: list[int]) -> list[Recommendation]:
    return [Recommendation(items[r], 0.0, n + 1) for n, r in enumerate(rows)]


def test_colour_agreement_leaves_out_the_query_and_copies_of_its_picture() -> None:
    items = products(["Red", "Red", "Red", "Blue", "Red", "Blue", ""], images=[f"/img/{i}.jpg" for i in range(6)] + ["/img/0.jpg"])
    feats = np.eye(7, dtype=np.float32)
    results = [
        recs(items, [0, 6, 1, 2, 3, 4]),  # itself and a copy (same image): left out; then Red, Red, Blue, Red -> 3/4
        recs(items, [0, 2, 3]),  # itself not returned; only three others: Red, Red, Blue -> 2/4 (a missing one is a miss)
    ]
    results += [[] for _ in range(5)]  # no results: 0 (the colourless product 6 is not counted)
    assert quality.colour_agreement(results, items, feats) == pytest.approx((0.75 + 0.5 + 0 + 0 + 0 + 0) / 6)


def test_colour_agreement_treats_identical_features_as_the_same_picture() -> None:
    items = products(["Red", "Red", "Red"])
    feats = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    assert quality.colour_agreement([recs(items, [1, 2]), [], []], items, feats, others=1) == pytest.approx(1 / 3)  # row 1 is row 0's copy


def test_reweighted_priors_equal_a_fit_with_those_weights() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 8)).astype(np.float32)
    cats = ["A"] * 20 + ["B"] * 20 + ["C"] * 20
    fitted = fit_priors(feats, cats, category_weight=0.3)
    again = quality.reweighted(fit_priors(feats, cats), category=0.3, kind=0.0)
    assert fitted is not None and again is not None
    np.testing.assert_allclose(again.bonus(feats[:5]), fitted.bonus(feats[:5]), rtol=1e-5)


def test_variant_weights_and_settings() -> None:
    d = next(v for v in quality.VARIANTS if v.key == "d")
    e = next(v for v in quality.VARIANTS if v.key == "e")
    assert d.at(0.1).category_weight == 0.1 and d.at(0.1).setting() == "category 0.1"
    assert e.at(1.0).kind_weight == 1.0 and e.at(1.0).category_weight == quality.CATEGORY_WEIGHT
    assert e.tune_on == ("validation",)


def test_pick_photos_is_a_fixed_rule_over_classes() -> None:
    labels = ["b", "a", "b", "c", "a", "a", "b"]
    assert quality_sheet.pick_photos(labels, count=4) == [1, 4, 0, 3]  # a's first two, b's first, c's first
    assert quality_sheet.pick_photos(labels, count=100) == [1, 4, 5, 0, 2, 6, 3]


def test_before_after_sheet(tmp_path: Path) -> None:
    pictures = []
    for i, colour in enumerate(["red", "blue", "green"]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (60, 80), colour).save(path)
        pictures.append(path)
    items = [Product(id=str(i), title=f"product {i}", url=None, image=str(p)) for i, p in enumerate(pictures)]
    out = quality_sheet.before_after(pictures[:2], ["one", "two"], [recs(items, [0, 1])] * 2, [recs(items, [2])] * 2, ("before", "after"), tmp_path / "s.png")
    with Image.open(out) as img:
        assert img.width > 2 * 6 * quality_sheet.THUMB and img.height > 2 * quality_sheet.THUMB
