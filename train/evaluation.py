"""The engine's quality benchmark for training: category precision@5 on labelled shopper photos.

Photos are embedded once per backbone by :func:`ffengine.evaluate.embed_photos` and cached by
content hash (:class:`ffengine.cache.EmbeddingCache`), so evaluating several projections of the same
backbone (before/after a feedback retrain) costs one pass, and a second run costs none.
The validation split is what training may look at; the test split is only for reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffengine.embedder import Embedder
from ffengine.evaluate import PrecisionReport, category_precision, embed_photos, read_category_map, read_queries
from ffengine.index import Index
from ffengine.recommend import Recommender
from train.errors import TrainingError

#: Where to find labelled shopper photos when a command is not told (``labels.csv`` + photos).
EVAL_QUERIES_ENV = "FFENGINE_EVAL_QUERIES"


@dataclass(frozen=True)
class LabelledPhotos:
    """Photos of one split with their labels, and which catalogue categories count as a hit per label."""

    paths: list[Path]
    labels: list[str]
    category_map: dict[str, frozenset[str]]

    @classmethod
    def read(
        cls, queries_dir: Path, split: str, *, categories: Path | None = None, limit: int | None = None, seed: int = 0
    ) -> LabelledPhotos:
        """``queries_dir/labels.csv`` rows of ``split`` (a seeded subsample of ``limit``, stratified by order)."""
        if not (queries_dir / "labels.csv").is_file():
            raise TrainingError(f"{queries_dir} has no labels.csv (image,split,label); point --queries at a labelled photo folder")
        categories = categories or queries_dir.parent / "query_categories.csv"
        if not categories.is_file():
            raise TrainingError(f"no {categories}: it says which catalogue categories match each photo label")
        rows = read_queries(queries_dir, split)
        if limit is not None and limit < len(rows):
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
            rows = [rows[i] for i in keep]
        if not rows:
            raise TrainingError(f"{queries_dir}/labels.csv has no photos in the {split!r} split")
        return cls([p for p, _ in rows], [label for _, label in rows], read_category_map(categories))


def default_eval_queries() -> Path | None:
    """``FFENGINE_EVAL_QUERIES`` if it names a folder with ``labels.csv``."""
    value = os.environ.get(EVAL_QUERIES_ENV, "").strip()
    return Path(value) if value and (Path(value) / "labels.csv").is_file() else None


@dataclass
class Benchmark:
    """Labelled photos embedded once by one backbone; scores any index of that backbone."""

    photos: LabelledPhotos
    embedder: Embedder
    feats: np.ndarray

    @classmethod
    def prepare(cls, photos: LabelledPhotos, embedder: Embedder, cache_dir: Path | None) -> Benchmark:
        feats, ok = embed_photos(photos.paths, embedder, cache_dir=cache_dir, skip_unreadable=True)
        if not ok.all():
            keep = np.flatnonzero(ok)
            photos = LabelledPhotos([photos.paths[i] for i in keep], [photos.labels[i] for i in keep], photos.category_map)
            feats = np.ascontiguousarray(feats[keep])
        if not len(feats):
            raise TrainingError("none of the labelled photos could be read")
        return cls(photos, embedder, feats)

    def score(self, index: Index) -> PrecisionReport:
        """Category precision@5 of ``index`` (which must come from the same backbone)."""
        results = Recommender(self.embedder, index).recommend_features(self.feats, k=5)
        return category_precision(results, self.photos.labels, self.photos.category_map, k=5)
