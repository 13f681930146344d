"""Recommendations: nearest first, duplicates collapsed, filters, model mismatch refused, evaluation maths."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffengine.catalog import Product
from ffengine.errors import ImageRejected, IndexLoadError
from ffengine.evaluate import category_precision, embed_photos, neighbour_recall, read_category_map, read_queries
from ffengine.images import load_image
from ffengine.index import Index, Projection, Reduction
from ffengine.recommend import Recommendation, Recommender
from ffengine.sheet import SheetRow, contact_sheet
from tests.conftest import make_image


class FeatureOnly:
    """Just what Recommender needs from an embedder when tests feed features directly."""

    def __init__(self, fingerprint: str, dim: int = 64) -> None:
        self.fingerprint = fingerprint
        self.dim = dim


def product(i: int, category: str = "Shirts", gender: str = "Men", image: str | None = None) -> Product:
    return Product(
        id=f"p{i}",
        title=f"Product {i}",
        url=f"https://shop.example/p{i}",
        image=image or f"/img/p{i}.jpg",
        category=category,
        gender=gender,
        extra={"master_category": "Apparel" if category != "Heels" else "Footwear"},
    )


DIM = 64


def catalogue(n: int = 300, seed: int = 0) -> tuple[np.ndarray, list[Product]]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, DIM)).astype(np.float32)
    cats = ["Shirts", "Jeans", "Heels"]
    prods = [product(i, cats[i % 3], "Women" if i % 2 else "Men") for i in range(n)]
    return feats, prods


def brute_force(feats: np.ndarray, q: np.ndarray, proj: Projection, rows: list[int], k: int) -> list[int]:
    d = np.linalg.norm(proj.apply(feats[rows]) - proj.apply(q[None, :]), axis=1)
    return [rows[i] for i in np.argsort(d)[:k]]


@pytest.fixture
def rec() -> Recommender:
    feats, prods = catalogue()
    index = Index(feats, prods, fingerprint="fp", projection=Reduction(16, True).fit(feats))
    return Recommender(FeatureOnly("fp"), index)  # type: ignore[arg-type]


def ids(recs: list[Recommendation]) -> list[str]:
    return [r.product.id for r in recs]


def test_nearest_first_with_ranks_and_distances(rec: Recommender) -> None:
    feats = rec.index.features
    q = feats[10] + 0.01 * np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    [recs] = rec.recommend_features(q[None, :], k=5)
    assert [r.rank for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0].product.id == "p10"
    assert ids(recs) == [f"p{i}" for i in brute_force(feats, q, rec.index.projection, list(range(len(feats))), 5)]
    assert all(a.distance <= b.distance for a, b in zip(recs, recs[1:], strict=False))
    assert len(rec.recommend_features(np.stack([q, q, q]), k=7)) == 3


def test_identical_duplicates_collapse_to_one() -> None:
    feats, prods = catalogue(60)
    feats[1] = feats[0]  # same picture listed twice under two ids
    feats[2] = feats[0] * (1 + 1e-7)  # same picture, embedded in another batch (float noise)
    prods[4] = product(4, image=prods[3].image)  # two rows pointing at one image file
    index = Index(feats, prods, fingerprint="fp", projection=Projection.identity(DIM), backend="exact")
    rec = Recommender(FeatureOnly("fp"), index)  # type: ignore[arg-type]
    [recs] = rec.recommend_features(feats[0][None, :], k=5)
    got = ids(recs)
    assert got[0] == "p0" and "p1" not in got and "p2" not in got and len(got) == 5
    [recs] = rec.recommend_features(feats[3][None, :], k=5)
    assert ids(recs)[0] == "p3" and "p4" not in ids(recs)
    # near but distinct pictures are not duplicates
    feats2 = feats.copy()
    feats2[1] = feats[0] + 0.05
    rec2 = Recommender(FeatureOnly("fp"), Index(feats2, prods, fingerprint="fp", projection=Projection.identity(DIM)))  # type: ignore[arg-type]
    assert ids(rec2.recommend_features(feats[0][None, :], k=2)[0]) == ["p0", "p1"]


@pytest.mark.parametrize(
    "filters",
    [
        {"category": "heels"},  # a third of the catalogue, case-insensitive
        {"category": "Heels", "gender": "Women"},  # a sixth: searched exactly over its rows
        {"category": ["Jeans", "Shirts"]},  # two thirds: over-fetch from the tree
        {"master_category": "Footwear"},  # a catalogue column kept in Product.extra
    ],
)
def test_filters_match_a_brute_force_search(rec: Recommender, filters: dict) -> None:
    feats, prods = rec.index.features, rec.index.products
    want = {k: {v.lower()} if isinstance(v, str) else {x.lower() for x in v} for k, v in filters.items()}

    def passes(p: Product) -> bool:
        return all(str(getattr(p, k, None) or p.extra.get(k, "")).lower() in vs for k, vs in want.items())

    rows = [i for i, p in enumerate(prods) if passes(p)]
    q = np.random.default_rng(7).normal(size=(4, DIM)).astype(np.float32)
    for query, recs in zip(q, rec.recommend_features(q, k=6, filters=filters), strict=True):
        assert all(passes(r.product) for r in recs)
        assert ids(recs) == [f"p{i}" for i in brute_force(feats, query, rec.index.projection, rows, 6)]


def test_filters_with_few_or_no_matches(rec: Recommender) -> None:
    q = rec.index.features[:1]
    assert rec.recommend_features(q, k=5, filters={"gender": "Unisex"}) == [[]]
    with pytest.raises(ValueError, match="cannot filter on 'flavour'"):
        rec.recommend_features(q, k=5, filters={"flavour": "salty"})
    with pytest.raises(ValueError, match="needs a string"):
        rec.recommend_features(q, k=5, filters={"category": 3})  # type: ignore[dict-item]


def test_more_duplicates_than_the_first_fetch(rec: Recommender) -> None:
    feats, prods = catalogue(200)
    feats[:40] = feats[0]  # 40 copies of one picture: the first fetch (k*2+8) is all duplicates
    index = Index(feats, prods, fingerprint="fp", projection=Projection.identity(DIM))
    got = Recommender(FeatureOnly("fp"), index).recommend_features(feats[:1], k=5)[0]  # type: ignore[arg-type]
    assert len(got) == 5 and got[0].product.id == "p0" and len({r.product.id for r in got}) == 5
    assert all(int(r.product.id[1:]) >= 40 for r in got[1:])


def test_model_mismatch_is_refused(random_embedder) -> None:
    feats = np.zeros((10, 1280), np.float32)
    index = Index(feats, catalogue(10)[1], fingerprint="some-other-model", projection=Projection.identity(1280))
    with pytest.raises(IndexLoadError, match="built by another model"):
        Recommender(random_embedder, index)


def test_recommend_a_photo_end_to_end(random_embedder, tmp_path: Path) -> None:
    photos = [make_image(seed) for seed in range(12)]
    paths = []
    for i, data in enumerate(photos):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    imgs = [Image.open(io.BytesIO(d)).convert("RGB") for d in photos]
    feats = random_embedder.embed(imgs)
    prods = [product(i, image=str(p)) for i, p in enumerate(paths)]
    rec = Recommender(random_embedder, Index(feats, prods, fingerprint=random_embedder.fingerprint, projection=Projection.identity(1280)))
    for source in (photos[4], paths[4], imgs[4]):  # bytes, a path, a decoded picture
        recs = rec.recommend(source, k=3)
        assert recs[0].product.id == "p4" and recs[0].distance < 1e-2 and len(recs) == 3
    with pytest.raises(ImageRejected):
        rec.recommend(b"definitely not a jpeg")
    # a contact sheet a person can look at: one row per query, query + k tiles wide
    sheet = contact_sheet(
        [SheetRow(imgs[4], "4.jpg", recs), SheetRow(None, "broken.jpg", error="not an image")], tmp_path / "s.png", k=3, thumb=64
    )
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.width > 4 * 64 and img.height > 2 * 64
        px = np.asarray(img.convert("RGB"))
    assert px.std() > 10  # pictures and text were drawn, not a blank canvas


def test_category_precision_counts_hits_and_misses() -> None:
    cmap = {"shirt": frozenset({"Shirts"}), "shoes": frozenset({"Heels", "Flats"})}

    def recs(*cats: str) -> list[Recommendation]:
        return [Recommendation(product(i, c), 0.1 * i, i + 1) for i, c in enumerate(cats)]

    results = [recs("Shirts", "Shirts", "Jeans", "Shirts", "Heels"), recs("Heels", "Flats"), recs("Heels", *["Flats"] * 6)]
    report = category_precision(results, ["shirt", "shoes", "shoes"], cmap, k=5)
    assert report.n == 3
    assert report.per_class == pytest.approx({"shirt": 0.6, "shoes": (0.4 + 1.0) / 2})
    assert report.mean == pytest.approx((0.6 + 0.4 + 1.0) / 3)
    with pytest.raises(ValueError, match="without a category mapping: hat"):
        category_precision(results, ["hat", "shoes", "shoes"], cmap)
    exact = np.array([[0.1, 0.2, 0.3], [1.0, 2.0, 2.0]])
    assert neighbour_recall(exact, exact) == 1.0
    # query 0 missed its 3rd neighbour; query 1 returned the other of two rows tied at 2.0 (still right)
    assert neighbour_recall(np.array([[0.1, 0.2, 0.5], [1.0, 2.0, 2.0]]), exact) == pytest.approx(5 / 6)


class CountingEmbedder:
    """A real embedder that counts the images it runs through the model (to see the cache at work)."""

    def __init__(self, inner) -> None:
        self.inner, self.fingerprint, self.dim, self.embedded = inner, inner.fingerprint, inner.dim, 0
        self.preprocess = inner.preprocess

    def prepare(self, images):
        return self.inner.prepare(images)

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.embedded += len(batch)
        return self.inner.embed_arrays(batch)


def test_embed_photos_keeps_rows_aligned_uses_the_cache_and_reports_bad_photos(random_embedder, tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.jpg" for i in range(4)]
    for i, path in enumerate(paths):
        path.write_bytes(make_image(i))
    bad, missing, cache = tmp_path / "bad.jpg", tmp_path / "gone.jpg", tmp_path / "cache"
    bad.write_bytes(b"not a photo")
    model = CountingEmbedder(random_embedder)

    feats = embed_photos(paths, model, cache_dir=cache)
    expected = random_embedder.embed([load_image(p) for p in paths])
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
    assert model.embedded == 4

    mixed = [paths[2], bad, paths[0], missing]
    with pytest.raises(ValueError, match=r"2 photo\(s\) could not be embedded: line 2 .*bad\.jpg"):
        embed_photos(mixed, model, cache_dir=cache)
    got, ok = embed_photos(mixed, model, cache_dir=cache, skip_unreadable=True)
    assert ok.tolist() == [True, False, True, False] and got.shape == (4, random_embedder.dim)
    np.testing.assert_array_equal(got[[0, 2]], feats[[2, 0]])  # straight from the cache, in input order
    assert not got[[1, 3]].any()
    assert model.embedded == 4  # nothing was embedded twice

    with pytest.raises(ValueError, match=r"2 photo\(s\) could not be embedded"):  # a ValueError even when all fail
        embed_photos([bad, missing], model)
    none, ok = embed_photos([bad, missing], model, skip_unreadable=True)
    assert not ok.any() and none.shape == (2, random_embedder.dim) and not none.any()
    assert embed_photos([], model).shape == (0, random_embedder.dim)


def test_reads_the_real_query_labels(shared) -> None:
    queries = shared("datasets", "queries")
    test = read_queries(queries, "test")
    assert len(test) == 372 and all(p.is_file() for p, _ in test[:20])
    cmap = read_category_map(shared("datasets", "query_categories.csv"))
    assert {label for _, label in test} == set(cmap)
    assert cmap["shirt"] == frozenset({"Shirts"}) and "Jeans" in cmap["pants"]
    with pytest.raises(ValueError, match="split must be one of"):
        read_queries(queries, "dev")
