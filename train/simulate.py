"""Prove that retraining from 👍/👎 helps: simulated shoppers, the real logging path, a held-out test.

Simulated shoppers send the ``train/`` photos of a labelled photo set through the real
path — :class:`~ffengine.recommend.Recommender`, ``Database.record_search``,
``Database.rate`` — and like a product exactly when its catalogue category matches the
photo's class (``query_categories.csv``). That taste is never shown to the trainer except
through the ratings. Then the same code as ``/retrain`` runs (choosing on the
``validation`` photos), and category precision@5 on the ``test`` photos — never used for
any choice — is measured for the model that served the feedback (before) and the model
the retraining produced (after), in the same run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ffengine.build import build_index
from ffengine.config import EngineSettings
from ffengine.db import Database
from ffengine.embedder import Embedder
from ffengine.evaluate import embed_photos
from ffengine.index import Index
from ffengine.recommend import Recommender
from train.errors import TrainingError
from train.evaluation import Benchmark, LabelledPhotos
from train.feedback import FeedbackOptions, Progress, retrain_from_feedback_async
from train.versions import register_base

@dataclass(frozen=True)
class SimulationOptions:
    """Sizes default to a few minutes on a 2-core CPU."""

    catalog_limit: int | None = 4000  # first N catalogue products (None: all)
    shoppers: int | None = 1500  # train photos sent by simulated shoppers (seeded subsample; None: all)
    users: int = 50  # simulated user ids the photos are spread over
    rate_share: float = 1.0  # chance that a shopper rates each result (1.0: rates all five)
    test_limit: int | None = None  # test photos scored (None: all)
    seed: int = 0
    feedback: FeedbackOptions = field(default_factory=FeedbackOptions)


@dataclass(frozen=True)
class SimulationResult:
    before: float  # category precision@5 on the test photos, model that served the feedback
    after: float  # the same for the model the retraining produced
    version: str | None
    promoted: bool
    reason: str
    per_class_before: dict[str, float]
    per_class_after: dict[str, float]
    feedback: dict[str, Any]  # searches, ratings, likes, dislikes, pairs
    test_photos: int
    catalog_products: int
    seconds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def simulate(
    catalog: Path,
    queries: Path,
    settings: EngineSettings,
    database_url: str,
    options: SimulationOptions | None = None,
    *,
    categories: Path | None = None,
    progress: Progress | None = None,
) -> SimulationResult:
    """Run the whole loop in ``settings.data_dir`` (index, models, cache) on an empty database at ``database_url``."""
    opts = options or SimulationOptions()
    say = progress or (lambda _f, _t: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_photos = LabelledPhotos.read(queries, "train", categories=categories, limit=opts.shoppers, seed=opts.seed)
    test_photos = LabelledPhotos.read(queries, "test", categories=categories, limit=opts.test_limit, seed=opts.seed)

    db = await Database.open(database_url)
    try:
        stats = await db.stats()
        if stats.searches or await db.list_model_versions():
            raise TrainingError(
                f"the simulation needs an empty database, but {db.url} already holds {stats.searches} searches "
                "or model versions; point --database-url (or DATABASE_URL) at a new one"
            )
        say(0.0, f"building the base index from {catalog}")
        embedder = await asyncio.to_thread(Embedder.load, settings.weights, settings.device, runtime=settings.runtime)
        index_dir = settings.index_dir
        report = await asyncio.to_thread(
            build_index, catalog, index_dir, embedder, cache_dir=settings.cache_dir, progress=False, limit=opts.catalog_limit
        )
        index = await asyncio.to_thread(Index.load, index_dir, embedder.fingerprint)
        timings["base_index"] = time.perf_counter() - t0
        base = await register_base(db, settings.weights, index_dir, "simulation base")
        t1 = time.perf_counter()
        say(0.1, f"{len(train_photos.paths)} simulated shoppers send photos")
        feedback = await shop(db, base.id, Recommender(embedder, index), train_photos, settings, opts)
        timings["shoppers"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        bench = await asyncio.to_thread(Benchmark.prepare, test_photos, embedder, settings.cache_dir)
        before = await asyncio.to_thread(bench.score, index)
        timings["test_embedding"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        fb_opts = replace(opts.feedback, eval_queries=queries, eval_categories=categories)
        result = await retrain_from_feedback_async(db, settings, progress=progress, options=fb_opts, activate=True)
        timings["retrain"] = time.perf_counter() - t3
        after = before
        if result.version is not None:
            produced = await db.get_model_version(result.version)
            assert produced is not None
            new_index = await asyncio.to_thread(Index.load, Path(produced.index_dir), embedder.fingerprint)
            after = await asyncio.to_thread(bench.score, new_index)
    finally:
        await db.close()
    timings["total"] = time.perf_counter() - t0
    return SimulationResult(
        before=before.mean,
        after=after.mean,
        version=result.version,
        promoted=result.promoted,
        reason=result.reason,
        per_class_before=before.per_class,
        per_class_after=after.per_class,
        feedback={**feedback, **{k: result.metrics[k] for k in ("pairs", "train_searches", "holdout_searches") if k in result.metrics}},
        test_photos=before.n,
        catalog_products=report.products,
        seconds={k: round(v, 2) for k, v in {**timings, "metric_training": result.metrics.get("learn_seconds", 0.0)}.items()},
    )


async def shop(
    db: Database, version_id: int, recommender: Recommender, photos: LabelledPhotos, settings: EngineSettings, opts: SimulationOptions
) -> dict[str, int]:
    """Each photo: recommend five, log the search, rate each result by the hidden taste (category match)."""
    feats, ok = await asyncio.to_thread(embed_photos, photos.paths, recommender.embedder, cache_dir=settings.cache_dir, skip_unreadable=True)
    rng = np.random.default_rng(opts.seed)
    rows = np.flatnonzero(ok)
    results = await asyncio.to_thread(recommender.recommend_features, feats[rows], 5)
    likes = dislikes = 0
    for n, (row, recs) in enumerate(zip(rows, results, strict=True)):
        user = 1 + n % opts.users
        wanted = photos.category_map[photos.labels[row]]
        record = await db.record_search(
            user, f"sim-{row}", feats[row], version_id, 0.0, "ok", [(r.product.id, r.distance) for r in recs]
        )
        for rec, rec_id in zip(recs, record.recommendation_ids, strict=True):
            if rng.random() >= opts.rate_share:
                continue
            liked = rec.product.category in wanted
            await db.rate(user, rec_id, 1 if liked else -1)
            likes += liked
            dislikes += not liked
    return {"searches": len(rows), "ratings": likes + dislikes, "likes": likes, "dislikes": dislikes}
