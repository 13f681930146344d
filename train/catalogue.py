"""A changed catalogue as a new model version: the active version's index updated, registered, activated.

The active version's index is never changed: :func:`ffengine.build.update_index` writes a new one beside it,
embedding only the pictures it does not hold, with the active weights and projection (a feedback-trained
search stays trained). Registered and activated like a trained version, it is what every replica follows
(the bot's :class:`~bot.models.ModelSwitch`), and ``rollback`` brings the previous catalogue back. It runs
under the training lock: a retrain that started from the old catalogue would otherwise promote it back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ffengine.build import update_index
from ffengine.config import EngineSettings
from ffengine.db import Database
from ffengine.embedder import Embedder
from train.runs import Progress, Run, TrainingResult, training_run
from train.versions import claim_version, ensure_current, write_metrics

KIND = "catalog"


async def update_catalogue_async(
    db: Database, settings: EngineSettings, catalog: Path, *, name: str | None = None, progress: Progress | None = None, activate: bool = True
) -> TrainingResult:
    """Index ``catalog`` (the whole catalogue as it is now) from the active version's index as a new version."""
    async with training_run(db, settings, KIND, {"catalog": str(catalog)}, progress) as run:
        return await run.finish(await _update(db, settings, catalog, name, run, activate))


async def _update(db: Database, settings: EngineSettings, catalog: Path, name: str | None, run: Run, activate: bool) -> TrainingResult:
    started = time.perf_counter()
    current = await ensure_current(db, settings)
    name, folder = await claim_version(db, settings, KIND, name)
    run.made.append(folder)
    await run.step(0.05, f"updating {current.name}'s index from {catalog}")
    embedder = await asyncio.to_thread(Embedder.load, current.weights, settings.device, runtime=settings.runtime)
    report = await asyncio.to_thread(update_index, catalog, current.index_dir, folder / "index", embedder, cache_dir=settings.cache_dir, progress=False)
    metrics = {
        "index_products": report.products, "embedded": report.embedded, "reused": report.reused, "index_skipped": len(report.skipped),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    await asyncio.to_thread(write_metrics, folder, {**metrics, "kind": KIND, "parent": current.name})
    reason = f"{name}: {report.products} products from {catalog.name} ({report.embedded} pictures embedded, {report.reused} reused from {current.name})"
    proposed = TrainingResult("promoted" if activate else "unevaluated", name, metrics, reason)
    result = await run.register(proposed, current, current.weights, folder / "index", activate)
    await run.step(1.0, result.reason)
    return result
