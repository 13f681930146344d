"""``python -m train finetune``: learn from the catalogue (and labelled shoppers' photos) and end in a new model version.

Two steps, the first optional:

* the study's step (``train_from`` < 19): the last backbone blocks learn the catalogue's
  attributes (:func:`train.finetune.finetune`); the catalogue is then embedded again with the new
  weights (through the embedding cache, keyed by the new fingerprint);
* the garment-kind head (:mod:`train.kinds`), on frozen features of the product shots and of the
  ``train`` split of the labelled photos; it ships inside the version's weights file, and the
  version's index gets its kind prior (:mod:`ffengine.prior`).

The version is compared with the active one on the labelled photos' validation split (category
precision@5) and activated only if it is better; without labelled photos it is registered but
left for an admin to activate (``rollback NAME``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffengine.build import build_index
from ffengine.catalog import read_catalog
from ffengine.config import EngineSettings
from ffengine.db import Database
from ffengine.embedder import Embedder
from ffengine.index import Index
from train.evaluation import Benchmark, LabelledPhotos, default_eval_queries
from ffengine.build import embed_catalog
from ffengine.evaluate import embed_photos
from ffengine.weights import save_weights
from train.errors import TrainingError
from train.finetune import N_BLOCKS, FinetuneOptions, finetune
from train.kinds import fit_kind_head
from train.runs import Progress, Run, TrainingResult, training_run
from train.versions import claim_version, ensure_current, write_metrics

KIND = "finetune"
WEIGHTS_FILE = "weights.pth"


@dataclass(frozen=True)
class FinetuneRunOptions:
    training: FinetuneOptions = field(default_factory=FinetuneOptions)
    eval_queries: Path | None = None  # labelled photos; None: FFENGINE_EVAL_QUERIES if set
    eval_categories: Path | None = None
    eval_split: str = "validation"
    eval_limit: int | None = None
    name: str | None = None

    def queries(self) -> Path | None:
        return self.eval_queries if self.eval_queries is not None else default_eval_queries()


async def finetune_catalog_async(
    db: Database,
    settings: EngineSettings,
    catalog: Path,
    *,
    options: FinetuneRunOptions | None = None,
    progress: Progress | None = None,
    activate: bool = True,
) -> TrainingResult:
    """Fine-tune the active backbone on ``catalog``'s labels, build its index, register, maybe activate."""
    opts = options or FinetuneRunOptions()
    params = {"catalog": str(catalog), **asdict(opts.training)}
    async with training_run(db, settings, KIND, params, progress) as run:
        return await run.finish(await _finetune(db, settings, catalog, opts, run, activate))


def finetune_catalog(database_url: str, settings: EngineSettings, catalog: Path, **kwargs: Any) -> TrainingResult:
    """Blocking variant (CLI, worker threads): its own database on a fresh event loop."""

    async def go() -> TrainingResult:
        db = await Database.open(database_url)
        try:
            return await finetune_catalog_async(db, settings, catalog, **kwargs)
        finally:
            await db.close()

    return asyncio.run(go())


async def _finetune(db: Database, settings: EngineSettings, catalog: Path, opts: FinetuneRunOptions, run: Run, activate: bool) -> TrainingResult:
    started = time.perf_counter()
    queries = opts.queries()
    if queries is None and opts.training.train_from >= N_BLOCKS:
        raise TrainingError("nothing to learn: the garment-kind head needs labelled shoppers' photos (--queries or FFENGINE_EVAL_QUERIES); "
                            "or fine-tune backbone blocks with --train-from N (N < 19)")
    current = await ensure_current(db, settings)
    name, folder = await claim_version(db, settings, KIND, opts.name)
    run.made.append(folder)
    await run.step(0.01, f"reading {catalog}")
    read = await asyncio.to_thread(read_catalog, catalog)
    base = await asyncio.to_thread(Embedder.load, current.weights, settings.device, runtime=settings.runtime)
    weights = folder / WEIGHTS_FILE
    backbone, metrics = base, {}
    if opts.training.train_from < N_BLOCKS:
        await run.step(0.03, f"fine-tuning {current.name}'s backbone on {len(read.products)} products")
        result = await asyncio.to_thread(
            finetune, read.products, base, weights, opts.training, progress=run.within(0.03, 0.6, "fine-tune"), meta={"version": name}
        )
        metrics.update({k: v for k, v in result.to_json().items() if k not in ("weights", "history")})
        backbone = await asyncio.to_thread(Embedder.load, str(weights), settings.device, runtime=settings.runtime)
    if queries is not None:
        await run.step(0.6, "training the garment-kind head on shoppers' photos and product shots")
        head, counts = await asyncio.to_thread(kind_head_for, read, backbone, queries, opts, settings)
        state = {f"features.{k}": v.detach().clone() for k, v in backbone.model.state_dict().items()}
        await asyncio.to_thread(save_weights, state, weights, backbone.preprocess, kind_head=head, version=name, base=current.name, **counts)
        metrics.update({"kind_classes": len(head.classes), **counts})
    await run.step(0.7, "building the version's index")
    tuned = await asyncio.to_thread(Embedder.load, str(weights.resolve()), settings.device, runtime=settings.runtime)
    report = await asyncio.to_thread(build_index, read, folder / "index", tuned, cache_dir=settings.cache_dir, progress=False)
    metrics.update({"index_products": report.products, "index_skipped": len(report.skipped)})
    status, reason = "unevaluated", (
        f"{name} registered but not activated: no labelled photos to compare it on "
        f"(set FFENGINE_EVAL_QUERIES or --queries); activate it with `python -m train rollback {name}`"
    )
    if queries is not None:
        await run.step(0.85, f"scoring precision@5 on the {opts.eval_split} photos")
        photos = LabelledPhotos.read(queries, opts.eval_split, categories=opts.eval_categories, limit=opts.eval_limit)
        before, after = await asyncio.to_thread(compare, photos, base, current.index_dir, tuned, folder / "index", settings)
        metrics.update({"precision5_before": before, "precision5_after": after, "precision5_split": opts.eval_split})
        if after > before:
            status, reason = "promoted", f"{name} beats {current.name}: precision@5 ({opts.eval_split}) {before:.3f} -> {after:.3f}"
        else:
            status, reason = "rejected", f"kept {current.name}: precision@5 ({opts.eval_split}) {before:.3f} -> {after:.3f} is no gain"
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    await asyncio.to_thread(write_metrics, folder, {**metrics, "kind": KIND, "parent": current.name})
    proposed = TrainingResult(status, name, metrics, reason)
    result = await run.register(proposed, current, str(weights.resolve()), folder / "index", activate)
    await run.step(1.0, result.reason)
    return result


def kind_head_for(read: Any, backbone: Embedder, queries: Path, opts: FinetuneRunOptions, settings: EngineSettings) -> tuple[Any, dict[str, int]]:
    """The garment-kind head on ``backbone``'s features of the catalogue and of the labelled ``train`` photos."""
    photos = LabelledPhotos.read(queries, "train", categories=opts.eval_categories)
    catalogue = embed_catalog(read, backbone, cache_dir=settings.cache_dir, progress=False)
    shots = embed_photos(photos.paths, backbone, cache_dir=settings.cache_dir)
    head = fit_kind_head(catalogue.features, [p.category for p in catalogue.products], photos.category_map, shots, photos.labels)
    return head, {"kind_products": len(catalogue.products), "kind_photos": len(photos.paths)}


def compare(photos: LabelledPhotos, base: Embedder, base_index: Path, tuned: Embedder, tuned_index: Path, settings: EngineSettings) -> tuple[float, float]:
    """Precision@5 of (active backbone + its index) and (fine-tuned backbone + its index) on the same photos."""
    old = Benchmark.prepare(photos, base, settings.cache_dir).score(Index.load(base_index, base.fingerprint)).mean
    new = Benchmark.prepare(photos, tuned, settings.cache_dir).score(Index.load(tuned_index, tuned.fingerprint)).mean
    return old, new

