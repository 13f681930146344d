"""``python -m train finetune``: fine-tune on a catalogue and end in a new model version.

Fine-tuning changes the backbone, so the catalogue is embedded again with the new
weights (through the embedding cache, keyed by the new fingerprint) into the version's
own index. The version is compared with the active one on labelled shopper photos
(category precision@5, validation split) and activated only if it is not worse; without
labelled photos it is registered but left for an admin to activate (``rollback NAME``).
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
from train.finetune import FinetuneOptions, finetune
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
    current = await ensure_current(db, settings)
    name, folder = await claim_version(db, settings, KIND, opts.name)
    run.made.append(folder)
    await run.step(0.01, f"reading {catalog}")
    read = await asyncio.to_thread(read_catalog, catalog)
    base = await asyncio.to_thread(Embedder.load, current.weights, settings.device, runtime=settings.runtime)
    await run.step(0.03, f"fine-tuning {current.name}'s backbone on {len(read.products)} products")
    result = await asyncio.to_thread(
        finetune, read.products, base, folder / WEIGHTS_FILE, opts.training, progress=run.within(0.03, 0.7, "fine-tune"), meta={"version": name}
    )
    await run.step(0.7, f"held-out micro-F1 {result.micro_f1:.3f}; embedding the catalogue with the new weights")
    weights = str((folder / WEIGHTS_FILE).resolve())
    tuned = await asyncio.to_thread(Embedder.load, weights, settings.device, runtime=settings.runtime)
    report = await asyncio.to_thread(build_index, read, folder / "index", tuned, cache_dir=settings.cache_dir, progress=False)
    metrics: dict[str, Any] = {
        **{k: v for k, v in result.to_json().items() if k not in ("weights", "history")},
        "index_products": report.products,
        "index_skipped": len(report.skipped),
    }
    status, reason = "unevaluated", (
        f"{name} registered but not activated: no labelled photos to compare it on "
        f"(set FFENGINE_EVAL_QUERIES or --queries); activate it with `python -m train rollback {name}`"
    )
    queries = opts.queries()
    if queries is not None:
        await run.step(0.85, f"scoring precision@5 on the {opts.eval_split} photos")
        photos = LabelledPhotos.read(queries, opts.eval_split, categories=opts.eval_categories, limit=opts.eval_limit)
        before, after = await asyncio.to_thread(compare, photos, base, current.index_dir, tuned, folder / "index", settings)
        metrics.update({"precision5_before": before, "precision5_after": after, "precision5_split": opts.eval_split})
        if after >= before:
            status, reason = "promoted", f"{name} is not worse than {current.name}: precision@5 ({opts.eval_split}) {before:.3f} -> {after:.3f}"
        else:
            status, reason = "rejected", f"kept {current.name}: precision@5 ({opts.eval_split}) would fall {before:.3f} -> {after:.3f}"
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    await asyncio.to_thread(write_metrics, folder, {**metrics, "kind": KIND, "parent": current.name})
    version = await db.create_model_version(
        name, weights, str((folder / "index").resolve()), parent_id=current.id, metrics=metrics, notes=f"{status}: {reason}"
    )
    run.made.clear()
    if status == "promoted" and activate:
        await db.activate_model_version(version.id)
    await run.step(1.0, reason)
    return TrainingResult(status, name, metrics, reason)


def compare(photos: LabelledPhotos, base: Embedder, base_index: Path, tuned: Embedder, tuned_index: Path, settings: EngineSettings) -> tuple[float, float]:
    """Precision@5 of (active backbone + its index) and (fine-tuned backbone + its index) on the same photos."""
    old = Benchmark.prepare(photos, base, settings.cache_dir).score(Index.load(base_index, base.fingerprint)).mean
    new = Benchmark.prepare(photos, tuned, settings.cache_dir).score(Index.load(tuned_index, tuned.fingerprint)).mean
    return old, new

