"""Retrain the search from shoppers' 👍/👎 — what ``/retrain`` and ``python -m train feedback`` run.

One run:

1. take the training lock (:mod:`train.lock`) and open a ``training_runs`` row (runs
   whose process died are closed as failed first);
2. read the logged searches of the active backbone (query features, what was shown,
   the ratings) and the active index (catalogue features, current projection); a shopper
   who chose an item of their photo ("Which item?") liked the products of that item's
   category the photo's answer showed, unless they rated them otherwise;
3. stop with a clear message if there is too little feedback;
4. learn a linear map on top of the current projection (:mod:`train.metric`) from the
   older searches; score the newest ones (held out) before/after — how often a liked
   product ranks above a disliked one — and, when labelled photos are available,
   category precision@5 on their validation split;
5. write the re-projected index to ``<data_dir>/models/<name>/index`` (atomic; no image
   is read again: the index keeps the catalogue's backbone features), register the
   version, and activate it only if it is not worse on either measure.

Any failure before the final activation leaves the active version and its index as
they were; the run is recorded as failed with the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ffengine.config import EngineSettings
from ffengine.db import Database, FeedbackSearch
from ffengine.embedder import Embedder
from ffengine.index import Index, write_index
from train.evaluation import Benchmark, LabelledPhotos, default_eval_queries
from train.metric import FeedbackData, MetricOptions, compose, feedback_data, learn_map, pairwise_accuracy
from train.runs import Progress, Run, TrainingResult, training_run
from train.versions import Current, claim_version, ensure_current, write_metrics

log = logging.getLogger(__name__)

KIND = "feedback"


@dataclass(frozen=True)
class FeedbackOptions:
    """What counts as enough feedback, how to learn from it, and what to evaluate on."""

    min_searches: int = 40  # rated searches of the active backbone
    min_pairs: int = 100  # (liked, disliked) pairs from the same search
    min_holdout_pairs: int = 20  # pairs in the newest searches, kept to judge the result
    holdout: float = 0.2  # newest share of rated searches held out
    metric: MetricOptions = field(default_factory=MetricOptions)
    eval_queries: Path | None = None  # labelled photos (labels.csv); None: FFENGINE_EVAL_QUERIES if set
    eval_categories: Path | None = None  # query_categories.csv; default: beside eval_queries
    eval_split: str = "validation"  # never "test": that one is for reports
    eval_limit: int | None = None  # score on a subsample of the split
    name: str | None = None  # version name; default feedback-<UTC time>

    def queries(self) -> Path | None:
        return self.eval_queries if self.eval_queries is not None else default_eval_queries()


#: What ``/retrain`` gets back (status promoted | rejected | insufficient).
RetrainResult = TrainingResult


async def retrain_from_feedback_async(
    db: Database,
    settings: EngineSettings,
    *,
    progress: Progress | None = None,
    options: FeedbackOptions | None = None,
    activate: bool = True,
) -> TrainingResult:
    """Retrain from the logged feedback (database calls on this loop, model work in worker threads).

    Raises :class:`train.errors.TrainingLocked` if a run is in progress, other
    :class:`~ffengine.errors.FFError` s when the run cannot be done (nothing changes then).
    """
    opts = options or FeedbackOptions()
    params = {"min_searches": opts.min_searches, "min_pairs": opts.min_pairs, "holdout": opts.holdout, "metric": asdict(opts.metric)}
    async with training_run(db, settings, KIND, params, progress) as run:
        return await run.finish(await _retrain(db, settings, opts, run, activate))


def retrain_from_feedback(
    database_url: str,
    settings: EngineSettings,
    *,
    progress: Progress | None = None,
    options: FeedbackOptions | None = None,
    activate: bool = True,
) -> TrainingResult:
    """Blocking variant for a worker thread or the CLI: opens its own database on a fresh event loop."""

    async def go() -> TrainingResult:
        db = await Database.open(database_url)
        try:
            return await retrain_from_feedback_async(db, settings, progress=progress, options=options, activate=activate)
        finally:
            await db.close()

    return asyncio.run(go())


async def _retrain(db: Database, settings: EngineSettings, opts: FeedbackOptions, run: Run, activate: bool) -> TrainingResult:
    started = time.perf_counter()
    current = await ensure_current(db, settings)
    await run.step(0.02, f"reading the index of {current.name}")
    index = await asyncio.to_thread(Index.load, current.index_dir)
    searches = await usable_searches(db, current)
    data = await asyncio.to_thread(feedback_data, searches, {p.id: i for i, p in enumerate(index.products)}, index.dim)
    train, held = data.split(opts.holdout)
    counts = count_feedback(data, train, held, searches)
    await run.step(
        0.05,
        f"{data.searches} rated searches: {data.likes} 👍 ({counts['chosen_item_likes']} implied by chosen items), "
        f"{data.dislikes} 👎, {len(data.triples)} pairs",
    )
    short = not_enough(counts, opts)
    if short:
        return TrainingResult("insufficient", None, counts, short)
    candidate, metrics = await learn_candidate(index, train, held, opts, run)
    metrics.update(counts)
    queries = opts.queries()
    if queries is not None:
        metrics.update(await score_precision(queries, opts, current, settings, index, candidate, run))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return await register_candidate(db, settings, opts, run, current, index, candidate, metrics, activate)


def count_feedback(data: FeedbackData, train: FeedbackData, held: FeedbackData, searches: list[FeedbackSearch]) -> dict[str, int]:
    """What the feedback holds: searches, 👍 / 👎, pairs in all and in each part, likes implied by chosen items."""
    return {
        "searches": data.searches,
        "likes": data.likes,
        "dislikes": data.dislikes,
        "pairs": len(data.triples),
        "train_searches": train.searches,
        "holdout_searches": held.searches,
        "holdout_pairs": len(held.triples),
        "chosen_item_likes": sum(item.implicit for search in searches for item in search.items),
    }


async def learn_candidate(index: Index, train: FeedbackData, held: FeedbackData, opts: FeedbackOptions, run: Run) -> tuple[Index, dict[str, Any]]:
    """The learnt map composed into the index's projection, and how held-out feedback ranks before and after."""
    await run.step(0.1, f"learning from {train.searches} searches ({len(train.triples)} pairs)")
    learn_started = time.perf_counter()
    a = await asyncio.to_thread(learn_map, index.projection, index.features, train, opts.metric, run.within(0.1, 0.6, "learning"))
    learn_seconds = time.perf_counter() - learn_started
    projection = compose(index.projection, a)
    candidate = await asyncio.to_thread(
        Index, index.features, index.products, fingerprint=index.fingerprint, projection=projection, backend=index.backend, options=index.options,
        priors=index.priors,  # the priors read backbone features, which feedback does not change: kept as they are
    )
    before, after = await asyncio.to_thread(
        lambda: (pairwise_accuracy(index.projection, index.features, held), pairwise_accuracy(projection, index.features, held))
    )
    await run.step(0.65, f"held-out feedback: liked above disliked {before:.3f} -> {after:.3f}")
    return candidate, {
        "holdout_pairwise_before": before,
        "holdout_pairwise_after": after,
        "map_change": float(np.linalg.norm(a - np.eye(len(a), dtype=np.float32)) / np.sqrt(len(a))),
        "learn_seconds": round(learn_seconds, 2),
    }


async def score_precision(
    queries: Path, opts: FeedbackOptions, current: Current, settings: EngineSettings, index: Index, candidate: Index, run: Run
) -> dict[str, Any]:
    """Category precision@5 of the labelled photos' ``opts.eval_split`` with the current index and the candidate."""
    await run.step(0.7, f"scoring precision@5 on the {opts.eval_split} photos of {queries}")
    photos = LabelledPhotos.read(queries, opts.eval_split, categories=opts.eval_categories, limit=opts.eval_limit)
    bench = await asyncio.to_thread(_benchmark, photos, current.weights, settings)
    p_before, p_after = await asyncio.to_thread(lambda: (bench.score(index).mean, bench.score(candidate).mean))
    await run.step(0.85, f"category precision@5 ({opts.eval_split}): {p_before:.3f} -> {p_after:.3f}")
    return {"precision5_before": p_before, "precision5_after": p_after, "precision5_split": opts.eval_split, "precision5_photos": len(bench.feats)}


def what_got_worse(metrics: dict[str, Any], opts: FeedbackOptions) -> list[str]:
    """The measures on which the candidate is worse than the current version (none: it is promoted)."""
    worse = []
    before, after = metrics["holdout_pairwise_before"], metrics["holdout_pairwise_after"]
    if after < before:
        worse.append(f"held-out liked-above-disliked fell {before:.3f} -> {after:.3f}")
    if "precision5_after" in metrics and metrics["precision5_after"] < metrics["precision5_before"]:
        worse.append(f"precision@5 on {opts.eval_split} photos fell {metrics['precision5_before']:.3f} -> {metrics['precision5_after']:.3f}")
    return worse


async def register_candidate(
    db: Database, settings: EngineSettings, opts: FeedbackOptions, run: Run, current: Current, index: Index, candidate: Index,
    metrics: dict[str, Any], activate: bool,
) -> TrainingResult:
    """Write the candidate as a new version, promoted (and, with ``activate``, made active) unless it is worse."""
    worse = what_got_worse(metrics, opts)
    name, folder = await claim_version(db, settings, KIND, opts.name)
    run.made.append(folder)
    await run.step(0.9, f"writing the index of {name}")
    await asyncio.to_thread(_write_version, folder, candidate, index, metrics, current)
    status = "rejected" if worse else "promoted"
    reason = f"kept {current.name}: " + "; ".join(worse) if worse else f"{name} is not worse than {current.name} (" + describe_gain(metrics) + ")"
    proposed = TrainingResult(status, name, metrics, reason)
    result = await run.register(proposed, current, current.weights, folder / "index", activate)
    done = f"{name} is now active" if result.promoted and activate else f"{name} registered ({result.status})"
    await run.step(1.0, done)
    return result


def not_enough(counts: dict[str, int], opts: FeedbackOptions) -> str | None:
    """Why the feedback is too little to learn from, or ``None``."""
    if counts["searches"] < opts.min_searches or counts["pairs"] < opts.min_pairs or counts["holdout_pairs"] < opts.min_holdout_pairs:
        return (
            f"Not enough feedback yet: {counts['searches']} rated searches with {counts['pairs']} (👍, 👎) pairs "
            f"({counts['holdout_pairs']} of them among the newest, kept for checking). Retraining needs at least "
            f"{opts.min_searches} rated searches, {opts.min_pairs} pairs and {opts.min_holdout_pairs} held-out pairs "
            "(a pair is a 👍 and a 👎 on results of the same search); nothing was changed."
        )
    return None


def describe_gain(metrics: dict[str, Any]) -> str:
    parts = [f"held-out liked-above-disliked {metrics['holdout_pairwise_before']:.3f} -> {metrics['holdout_pairwise_after']:.3f}"]
    if "precision5_after" in metrics:
        parts.append(f"precision@5 {metrics['precision5_before']:.3f} -> {metrics['precision5_after']:.3f}")
    return ", ".join(parts)


async def usable_searches(db: Database, current: Current) -> list[FeedbackSearch]:
    """Rated searches answered by the current backbone (other backbones' features are not comparable)."""
    versions = {v.id: v.weights for v in await db.list_model_versions()}
    searches = await db.export_feedback(rated_only=True)
    same = [s for s in searches if versions.get(s.model_version_id, current.weights) == current.weights]  # type: ignore[arg-type]
    if len(same) < len(searches):
        log.info("feedback: %d of %d rated searches came from another backbone and are left out", len(searches) - len(same), len(searches))
    return same


def _benchmark(photos: LabelledPhotos, weights: str, settings: EngineSettings) -> Benchmark:
    embedder = Embedder.load(weights, settings.device, runtime=settings.runtime)
    return Benchmark.prepare(photos, embedder, settings.cache_dir)


def _write_version(folder: Path, candidate: Index, parent: Index, metrics: dict[str, Any], current: Current) -> None:
    write_index(
        folder / "index",
        candidate.features,
        candidate.products,
        fingerprint=candidate.fingerprint,
        catalog_hash=str(parent.manifest.get("catalog_hash", "")),
        backend=candidate.backend,
        projection=candidate.projection,
        priors=candidate.priors,
        preprocess=parent.manifest.get("preprocess"),
        weights=parent.manifest.get("weights"),
        **candidate.options,
    )
    write_metrics(folder, {**metrics, "kind": KIND, "parent": current.name, "weights": current.weights})
