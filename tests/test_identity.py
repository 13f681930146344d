"""Identity before kind (issue 18): a copy of a catalogue picture is answered with that product first.

Real weights and real catalogue pictures: each transform a screenshot applies (a crop, rescaling, a border,
letterboxing, a small turn, JPEG) is applied alone to pictures of the store, and the product must come
first from the index with no priors, and from one whose priors are made strong enough to overrule looks
(what a confident garment-kind head does), which the best match's closeness must switch off
(:class:`ffengine.recommend.PriorRamp`). Rates over many copies are ``bench/identity.py``'s.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from ffengine.embedder import Embedder
from ffengine.images import load_image
from ffengine.index import Index
from ffengine.projection import Reduction
from ffengine.prior import fit_priors
from ffengine.recommend import Recommender
from tests.conftest import shared_path

pytestmark = [pytest.mark.shared, pytest.mark.slow]

PRODUCTS = 600  # the store: catalog-10k's first products
COPIES = 12  # pictures copied per transform


def jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return load_image(buf.getvalue())


def letterbox(img: Image.Image) -> Image.Image:
    side = max(img.size)
    return ImageOps.pad(img, (side, side), color=(0, 0, 0))


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop 88%": lambda im: im.crop((im.width * 6 // 100, im.height * 6 // 100, im.width * 94 // 100, im.height * 94 // 100)),
    "two-thirds size": lambda im: im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.Resampling.BILINEAR),
    "twice the size": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC),
    "grey border": lambda im: ImageOps.expand(im, border=im.width // 10, fill=(128, 128, 128)),
    "letterboxed": letterbox,
    "turned 3°": lambda im: im.rotate(3, Image.Resampling.BILINEAR, fillcolor=(255, 255, 255)),
    "JPEG quality 40": lambda im: jpeg(im, 40),
}


@pytest.fixture(scope="module")
def store() -> tuple[Embedder, list, np.ndarray]:
    from ffengine.build import embed_catalog
    from ffengine.catalog import read_catalog

    embedder = Embedder.load(str(shared_path("models", "mobilenet_v2_imagenet.pth")), "cpu")
    catalog = read_catalog(shared_path("datasets", "catalog-10k", "products.csv"), limit=PRODUCTS)
    catalogue = embed_catalog(catalog, embedder, progress=False)
    return embedder, catalogue.products, catalogue.features


def recommender(store, *, prior_weight: float | None, ramp: bool = True) -> Recommender:
    embedder, products, feats = store
    priors = None if prior_weight is None else fit_priors(feats, [p.category for p in products], category_weight=prior_weight)
    index = Index(feats, products, fingerprint=embedder.fingerprint, projection=Reduction(None, True).fit(feats), priors=priors)
    return Recommender(embedder, index) if ramp else Recommender(embedder, index, ramp=None)


def firsts(rec: Recommender, products: list, transform: Callable[[Image.Image], Image.Image]) -> list[bool]:
    """Whether each copied product comes first (its own id, or another product with the same picture file)."""
    chosen = products[:: len(products) // COPIES][:COPIES]
    copies = [transform(load_image(p.image)) for p in chosen]
    answers = rec.recommend_features(rec.embedder.embed(copies), 5)
    return [bool(got) and Path(got[0].product.image).read_bytes() == Path(p.image).read_bytes() for p, got in zip(chosen, answers, strict=True)]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_copy_of_a_catalogue_picture_gets_its_product_first_with_and_without_priors(store, name: str) -> None:
    products = store[1]
    plain = firsts(recommender(store, prior_weight=None), products, TRANSFORMS[name])
    strong = firsts(recommender(store, prior_weight=0.5), products, TRANSFORMS[name])
    assert all(plain), (name, plain)
    assert all(strong), (name, strong)


def test_strong_priors_overrule_looks_without_the_ramp(store) -> None:
    """The case the rule is for: the same strong priors, always at full weight, push copies' products down."""
    products = store[1]
    demoted = [not hit for name in ("crop 88%", "grey border") for hit in firsts(recommender(store, prior_weight=0.5, ramp=False), products, TRANSFORMS[name])]
    assert sum(demoted) >= 2, demoted
