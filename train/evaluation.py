"""The engine's quality benchmark for training: category precision@5 on labelled shopper photos.

Photos are embedded once per backbone and cached by content hash
(:class:`ffengine.cache.EmbeddingCache`), so evaluating several projections of the same
backbone (before/after a feedback retrain) costs one pass, and a second run costs none.
The validation split is what training may look at; the test split is only for reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffengine.cache import EmbeddingCache, content_hash
from ffengine.embedder import Embedder
from ffengine.errors import ImageRejected
from ffengine.evaluate import PrecisionReport, category_precision, read_category_map, read_queries
from ffengine.images import load_image
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


def embed_photos(paths: Sequence[Path], embedder: Embedder, cache_dir: Path | None, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, 1280), ok (n,) bool)``: each photo's backbone features, from the cache when there.

    A photo that cannot be read gets a zero row and ``ok=False`` (callers drop it).
    """
    cache = EmbeddingCache(cache_dir, embedder.fingerprint, embedder.dim) if cache_dir is not None else None
    feats = np.zeros((len(paths), embedder.dim), np.float32)
    ok = np.zeros(len(paths), bool)

    def read(path: Path) -> tuple[str, bytes] | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return content_hash(data), data

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        blobs = list(pool.map(read, paths))
        todo = []
        for i, blob in enumerate(blobs):
            if blob is None:
                continue
            hit = cache.get(blob[0]) if cache is not None else None
            if hit is not None:
                feats[i], ok[i] = hit, True
            else:
                todo.append(i)

        def decode(i: int) -> np.ndarray | None:
            try:
                return embedder.prepare([load_image(blobs[i][1])])[0]  # type: ignore[index]
            except ImageRejected:
                return None

        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            arrays = list(pool.map(decode, chunk))
            good = [(i, a) for i, a in zip(chunk, arrays, strict=True) if a is not None]
            if not good:
                continue
            out = embedder.embed_arrays(np.stack([a for _, a in good]))
            for (i, _), f in zip(good, out, strict=True):
                feats[i], ok[i] = f, True
                if cache is not None:
                    cache.put(blobs[i][0], f)  # type: ignore[index]
    return feats, ok


@dataclass
class Benchmark:
    """Labelled photos embedded once by one backbone; scores any index of that backbone."""

    photos: LabelledPhotos
    embedder: Embedder
    feats: np.ndarray

    @classmethod
    def prepare(cls, photos: LabelledPhotos, embedder: Embedder, cache_dir: Path | None) -> Benchmark:
        feats, ok = embed_photos(photos.paths, embedder, cache_dir)
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
