"""Category priors: fitted at index build, stored as plain arrays, used by the ranking exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v2

from ffengine.build import build_index
from ffengine.catalog import Product
from ffengine.embedder import Embedder
from ffengine.errors import IndexLoadError
from ffengine.index import Index, Reduction, write_index
from ffengine.prior import RARE_CLASS, LinearHead, fit_head, fit_priors
from ffengine.recommend import Recommender
from ffengine.weights import Preprocess, save_weights
from tests.conftest import make_image

DIM = 32
CATS = ["Shirts", "Jeans", "Heels", "Dresses"]


class FeatureOnly:
    def __init__(self, fingerprint: str = "fp", dim: int = DIM) -> None:
        self.fingerprint, self.dim = fingerprint, dim


def store(n: int = 400, seed: int = 0, categories: list[str | None] | None = None) -> tuple[np.ndarray, list[Product], np.ndarray]:
    """Products in clusters by category (class centre + noise), so a prior has something to learn."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CATS), DIM)).astype(np.float32) * 2
    label = np.arange(n) % len(CATS)
    feats = (centres[label] + rng.normal(size=(n, DIM))).astype(np.float32)
    cats = categories if categories is not None else [CATS[i] for i in label]
    prods = [Product(id=f"p{i}", title=f"P {i}", url=f"https://shop.example/{i}", image=f"/img/{i}.jpg", category=cats[i]) for i in range(n)]
    return feats, prods, centres


def brute(index: Index, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    """Rows by -d^2/2 + bonus[group] over the whole catalogue: what the pruned walk must return."""
    d = np.linalg.norm(index.vectors - index.projection.apply(q[None, :]), axis=1).astype(np.float64)
    score = -0.5 * d**2 + index.priors.bonus(q[None, :])[0][index.priors.product_group]
    if allowed is not None:
        score[~allowed] = -np.inf
    return list(np.lexsort((np.arange(len(score)), -score))[:k])


def test_fit_reports_classes_and_heldout_accuracy_and_learns_the_clusters() -> None:
    feats, prods, centres = store()
    priors = fit_priors(feats, [p.category for p in prods])
    info = priors.info["category"]
    assert info["classes"] == len(CATS) and info["rare_pooled"] == 0 and info["heldout"] > 0
    assert info["heldout_accuracy"] > 0.9  # well-separated clusters
    top = priors.top_classes(centres, k=2)
    assert [row["category"][0]["name"] for row in top] == CATS and all(row["category"][0]["p"] > 0.5 for row in top)


@pytest.mark.parametrize(("n", "weight"), [(400, 0.3), (2000, 0.3), (2000, 0.02)])
def test_ranking_with_priors_is_exactly_the_best_scores(n: int, weight: float) -> None:
    """Small: the shortlist holds every product; larger: groups beyond the shortlist's bound are searched."""
    feats, prods, _ = store(n)
    priors = fit_priors(feats, [p.category for p in prods], category_weight=weight)
    index = Index(feats, prods, fingerprint="fp", projection=Reduction(None, True).fit(feats), backend="exact", priors=priors)
    rec = Recommender(FeatureOnly(), index)  # type: ignore[arg-type]
    queries = np.random.default_rng(5).normal(size=(20, DIM)).astype(np.float32) * 2
    for q, got in zip(queries, rec.recommend_features(queries, k=7), strict=True):
        assert [int(r.product.id[1:]) for r in got] == brute(index, q, 7)
        assert all(a.distance <= b.distance for a, b in zip(got, got[1:], strict=False))
    women = rec.filter_mask({"category": frozenset({"dresses", "heels"})})
    [got] = rec.recommend_features(queries[:1], k=5, filters={"category": ["Dresses", "Heels"]})
    assert [int(r.product.id[1:]) for r in got] == brute(index, queries[0], 5, women)


def test_priors_survive_a_write_and_load(tmp_path: Path) -> None:
    feats, prods, _ = store()
    priors = fit_priors(feats, [p.category for p in prods])
    out = write_index(tmp_path / "idx", feats, prods, fingerprint="fp", catalog_hash="c", priors=priors)
    loaded = Index.load(out).priors
    assert loaded is not None and loaded.groups == priors.groups and loaded.info == priors.info
    np.testing.assert_array_equal(loaded.product_group, priors.product_group)
    q = feats[:9] + 0.1
    np.testing.assert_allclose(loaded.bonus(q), priors.bonus(q), rtol=1e-6)
    in_memory = Recommender(FeatureOnly(), Index(feats, prods, fingerprint="fp", projection=Index.load(out).projection, priors=priors))  # type: ignore[arg-type]
    from_disk = Recommender(FeatureOnly(), Index.load(out))  # type: ignore[arg-type]
    assert [[r.product.id for r in rs] for rs in from_disk.recommend_features(q, 5)] == [[r.product.id for r in rs] for rs in in_memory.recommend_features(q, 5)]
    (out / "prior_category_weight.npy").write_bytes((out / "prior_category_weight.npy").read_bytes()[:-8])
    with pytest.raises(IndexLoadError, match="prior_category_weight.npy does not match"):
        Index.load(out)


def test_a_catalogue_without_categories_works_as_before() -> None:
    feats, prods, _ = store(categories=[None] * 400)
    assert fit_priors(feats, [p.category for p in prods]) is None
    index = Index(feats, prods, fingerprint="fp", projection=Reduction(None, True).fit(feats))
    [got] = Recommender(FeatureOnly(), index).recommend_features(feats[3:4], k=3)  # type: ignore[arg-type]
    assert got[0].product.id == "p3"


def test_a_category_seen_once_is_pooled_and_still_found() -> None:
    cats = [CATS[i % len(CATS)] for i in range(400)]
    cats[7] = "Tiara"  # the only one
    feats, prods, _ = store(categories=cats)
    priors = fit_priors(feats, cats)
    info = priors.info["category"]
    assert info["classes"] == len(CATS) + 1 and info["rare_pooled"] == 1
    term = priors.terms[0]
    tiara = priors.groups.index("Tiara")
    assert term.head.classes[int(term.group_dist[tiara].argmax())] == RARE_CLASS
    index = Index(feats, prods, fingerprint="fp", projection=Reduction(None, True).fit(feats), priors=priors)
    [got] = Recommender(FeatureOnly(), index).recommend_features(feats[7:8], k=1)  # type: ignore[arg-type]
    assert got[0].product.id == "p7"  # its own picture still comes first


def test_kind_head_groups_products_without_category_by_what_they_show() -> None:
    feats, prods, centres = store(categories=[None] * 400)
    kinds = np.arange(400) % len(CATS)
    head = fit_head(feats, kinds, ["shirt", "pants", "shoes", "dress"], l2=1e-4)
    priors = fit_priors(feats, [None] * 400, kind_head=head)
    assert [t.name for t in priors.terms] == ["kind"] and set(priors.groups) == {"kind:shirt", "kind:pants", "kind:shoes", "kind:dress"}
    assert priors.top_classes(centres[3:4])[0]["kind"][0]["name"] == "dress"
    shoes = priors.groups.index("kind:shoes")
    assert priors.bonus(centres[2:3])[0].argmax() == shoes


def test_kind_head_travels_in_the_weights_file(tmp_path: Path) -> None:
    head = LinearHead(("dress", "other"), np.random.default_rng(0).normal(size=(1280, 2)).astype(np.float32), np.zeros(2, np.float32))
    torch.manual_seed(0)
    state = mobilenet_v2(weights=None).state_dict()
    prep = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = Embedder.load(str(save_weights(state, tmp_path / "plain.pth", prep)), "cpu", runtime="torch")
    tuned = Embedder.load(str(save_weights(state, tmp_path / "tuned.pth", prep, kind_head=head)), "cpu", runtime="torch")
    assert plain.kind_head is None and tuned.kind_head is not None and tuned.kind_head.classes == head.classes
    np.testing.assert_array_equal(tuned.kind_head.weight, head.weight)
    assert tuned.fingerprint == plain.fingerprint  # same features: the embedding cache and indexes are shared


def test_an_index_made_with_the_old_preprocessing_is_refused_by_name(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = mobilenet_v2(weights=None).state_dict()
    crop = Embedder.load(str(save_weights(state, tmp_path / "crop.pth", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, fit="crop"))), "cpu", runtime="torch")
    whole = Embedder.load(str(save_weights(state, tmp_path / "whole.pth", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))), "cpu", runtime="torch")
    (tmp_path / "images").mkdir()
    rows = ["id,title,url,image,category"]
    for i in range(6):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(make_image(i))
        rows.append(f"s{i},T {i},https://shop.example/{i},images/{i}.jpg,{'A' if i % 2 else 'B'}")
    (tmp_path / "products.csv").write_text("\n".join(rows) + "\n")
    build_index(tmp_path / "products.csv", tmp_path / "idx", crop, progress=False)
    assert whole.preprocess.fit == "whole" and crop.fingerprint[:16] == whole.fingerprint[:16] != "" and crop.fingerprint != whole.fingerprint
    with pytest.raises(IndexLoadError, match="other preprocessing \\(fit='crop'.*rebuild it with `ffengine index build`"):
        Index.load(tmp_path / "idx", expect_fingerprint=whole.fingerprint)
    with pytest.raises(IndexLoadError, match="other preprocessing"):
        Recommender(whole, Index.load(tmp_path / "idx"))


@pytest.mark.shared
@pytest.mark.slow
def test_the_category_prior_finds_the_right_kind_of_garment_more_often(shared, real_weights: Path) -> None:
    """Real weights, a real catalogue subset and real shoppers' photos: the prior must pay for itself."""
    from ffengine.build import embed_catalog
    from ffengine.catalog import read_catalog
    from ffengine.evaluate import category_precision, embed_photos, read_category_map, read_queries

    data = shared("datasets")
    embedder = Embedder.load(str(real_weights), "cpu")
    catalogue = embed_catalog(read_catalog(data / "catalog-10k" / "products.csv", limit=1500), embedder, progress=False)
    photos = read_queries(data / "queries", "validation")[::2]
    feats = embed_photos([p for p, _ in photos], embedder)
    labels, cmap = [label for _, label in photos], read_category_map(data / "query_categories.csv")
    priors = fit_priors(catalogue.features, [p.category for p in catalogue.products])
    precision = {}
    for name, prior in (("plain", None), ("prior", priors)):
        index = Index(catalogue.features, catalogue.products, fingerprint=embedder.fingerprint, projection=Reduction(None, True).fit(catalogue.features), priors=prior)
        precision[name] = category_precision(Recommender(embedder, index).recommend_features(feats, 5), labels, cmap).mean
    assert priors.info["category"]["heldout_accuracy"] > 0.7
    assert precision["prior"] > precision["plain"] + 0.02, precision
