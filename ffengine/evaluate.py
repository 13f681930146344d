"""How good are the recommendations? Category precision@k on labelled query photos, and search recall.

The labelled photos are ``../shared/datasets/queries`` (``labels.csv``: image, split, label);
``query_categories.csv`` says which catalogue categories count as a hit for each label.
The same scoring serves the quality benchmark and train/'s before/after comparison.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import numpy as np

from ffengine.catalog import CatalogReadResult, Product
from ffengine.errors import CatalogError
from ffengine.recommend import Recommendation

if TYPE_CHECKING:  # for annotations only: embed_photos imports ffengine.build when it runs
    from ffengine.build import FeatureExtractor

SPLITS = ("train", "validation", "test")


def read_queries(queries_dir: str | os.PathLike[str], split: str) -> list[tuple[Path, str]]:
    """``(photo path, label)`` for every row of ``labels.csv`` in ``split``, in file order."""
    root = Path(queries_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return [(root / row["image"], row["label"]) for row in csv.DictReader(fh) if row["split"] == split]


def read_category_map(path: str | os.PathLike[str]) -> dict[str, frozenset[str]]:
    """``query_categories.csv`` -> ``{query label: catalogue categories that count as a hit}``."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return {
            row["query_label"]: frozenset(c.strip() for c in row["catalog_categories"].split(";") if c.strip())
            for row in csv.DictReader(fh)
        }


@overload
def embed_photos(
    photos: Sequence[str | os.PathLike[str]],
    embedder: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike[str] | None = ...,
    progress: bool = ...,
    skip_unreadable: Literal[False] = ...,
) -> np.ndarray: ...


@overload
def embed_photos(
    photos: Sequence[str | os.PathLike[str]],
    embedder: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike[str] | None = ...,
    progress: bool = ...,
    skip_unreadable: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...


def embed_photos(
    photos: Sequence[str | os.PathLike[str]],
    embedder: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    skip_unreadable: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``(n, dim)`` features of photos, row-aligned with ``photos``, through the catalogue pipeline and its cache.

    One path for benchmarks and ``train/``, so both reuse the same cached features. By default a photo
    that cannot be embedded raises ``ValueError`` naming it (rows must stay aligned with labels);
    with ``skip_unreadable`` it gets a zero row instead and ``(features, ok (n,) bool)`` is returned
    for the caller to drop it.
    """
    feats, ok, problem = _embed_rows(photos, embedder, cache_dir, progress)
    if skip_unreadable:
        return feats, ok
    if problem:
        raise ValueError(f"{len(ok) - int(ok.sum())} photo(s) could not be embedded: {problem}")
    return feats


def _embed_rows(
    photos: Sequence[str | os.PathLike[str]], embedder: FeatureExtractor, cache_dir: str | os.PathLike[str] | None, progress: bool
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(features with zero rows for failures, ok mask, the first failure or "")``."""
    from ffengine.build import embed_catalog

    feats = np.zeros((len(photos), embedder.dim), np.float32)
    ok = np.zeros(len(photos), bool)
    if not photos:
        return feats, ok, ""
    products = [Product(id=str(i), title=Path(p).name, url=f"https://photos.invalid/{i}", image=str(Path(p).resolve())) for i, p in enumerate(photos)]
    read = CatalogReadResult(products, [], list(range(1, len(products) + 1)), Path("photos"))
    try:
        done = embed_catalog(read, embedder, cache_dir=cache_dir, progress=progress)
    except CatalogError as exc:  # not one photo could be embedded
        return feats, ok, str(exc)
    rows = [int(p.id) for p in done.products]
    feats[rows], ok[rows] = done.features, True
    return feats, ok, str(done.report.skipped[0]) if done.report.skipped else ""


@dataclass(frozen=True)
class PrecisionReport:
    """Mean precision@k over query photos, the same per query label, and how many photos."""

    mean: float
    per_class: dict[str, float]
    n: int

    def to_json(self) -> dict[str, object]:
        return {"mean": self.mean, "per_class": self.per_class, "n": self.n}


def category_precision(
    results: Sequence[Sequence[Recommendation]],
    labels: Sequence[str],
    category_map: dict[str, frozenset[str]],
    k: int = 5,
) -> PrecisionReport:
    """Hits among the first ``k`` results / ``k`` (missing results count as misses), averaged over photos."""
    if len(results) != len(labels):
        raise ValueError(f"{len(results)} result lists for {len(labels)} labels")
    unknown = sorted(set(labels) - set(category_map))
    if unknown:
        raise ValueError(f"labels without a category mapping: {', '.join(unknown)}")
    per_class: dict[str, list[float]] = defaultdict(list)
    scores = []
    for recs, label in zip(results, labels, strict=True):
        hits = sum(1 for r in recs[:k] if r.product.category in category_map[label])
        scores.append(hits / k)
        per_class[label].append(hits / k)
    mean = float(np.mean(scores)) if scores else 0.0
    return PrecisionReport(mean, {c: float(np.mean(v)) for c, v in sorted(per_class.items())}, len(scores))


def neighbour_recall(found_dist: np.ndarray, exact_dist: np.ndarray, rtol: float = 1e-4) -> float:
    """recall@k: share of returned neighbours at least as close as the exact k-th one, averaged over queries.

    ``found_dist`` are the true distances of the rows a search returned, ``exact_dist`` those of an
    exact search (both ``(m, k)``). Comparing distances, not row ids, counts a tie (catalogues hold
    identical pictures) as correct whichever of the tied rows was returned.
    """
    if found_dist.shape != exact_dist.shape or exact_dist.size == 0:
        raise ValueError(f"need matching non-empty (m, k) arrays, got {found_dist.shape} and {exact_dist.shape}")
    kth = exact_dist[:, -1:]
    return float(np.mean(found_dist <= kth * (1 + rtol) + 1e-6))
