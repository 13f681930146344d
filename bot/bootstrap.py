"""First run: make sure there is a database, an index and an active model version.

``Database.open`` brings the schema to head; an index is built from ``FFENGINE_CATALOG``
when ``FFENGINE_INDEX`` holds none; the pair (``FFENGINE_WEIGHTS``, index) is loaded, so a
broken one stops start-up before it is recorded, then registered as the base model version
and activated. Without ``FFENGINE_WEIGHTS`` the index's own weights file is used (the one it
records); an index holding products the database refuses (one an older importer wrote) stops it
too, since the bot stores every product it serves. Later runs find the active version and do
nothing; so does a replica that starts together with another one which registered it first.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from bot.config import BotSettings
from bot.models import ModelLoader
from ffengine.db import Database, ModelVersion, StorageError
from ffengine.errors import ConfigError
from ffengine.index import MANIFEST_FILE
from train.versions import BASE_VERSION, check_storable, register_base, weights_spec

log = logging.getLogger(__name__)


def has_index(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


async def ensure_index(settings: BotSettings, loader: ModelLoader) -> Path:
    """The base index directory, built from the catalogue if it is not there yet."""
    engine = settings.engine
    index_dir = engine.index_dir.resolve()
    if has_index(index_dir):
        return index_dir
    if engine.catalog is None:
        raise ConfigError(
            f"FFENGINE_INDEX ({index_dir}) holds no index and FFENGINE_CATALOG is not set: point FFENGINE_CATALOG "
            "at the store catalogue (CSV or JSON Lines) to build one on first start, or run `ffengine index build`."
        )
    from ffengine.build import build_index

    log.info("no index in %s: building it from %s (first run; this takes a while)", index_dir, engine.catalog)
    embedder = await asyncio.to_thread(loader.embedder, engine.weights)
    report = await asyncio.to_thread(
        build_index, engine.catalog, index_dir, embedder, cache_dir=engine.cache_dir, progress=False
    )
    log.info("index built: %d products, %d skipped, %.0f s", report.products, len(report.skipped), report.seconds)
    return index_dir


async def prepare(settings: BotSettings, db: Database, loader: ModelLoader) -> ModelVersion:
    """The active model version, registering the base one on first run."""
    active = await db.active_model_version()
    if active is not None:
        return active
    base = await db.get_model_version(BASE_VERSION)
    if base is not None:  # registered before, deactivated since: take it back
        return await db.activate_model_version(base.id)
    index_dir = await ensure_index(settings, loader)
    weights = weights_spec(settings.engine.with_index_weights(index_dir).weights)  # not relative to where the bot starts
    recommender = await asyncio.to_thread(loader.recommender, weights, index_dir)  # FFError: a broken index or weights
    await asyncio.to_thread(check_storable, BASE_VERSION, recommender.index.products)
    try:
        version = await register_base(db, weights, index_dir, "registered on first start from FFENGINE_WEIGHTS and FFENGINE_INDEX")
    except StorageError:  # another replica starting at the same time registered it first
        if (active := await db.active_model_version()) is None:
            raise
        return active
    log.info("registered model version %s (weights %s, index %s)", version.name, version.weights, version.index_dir)
    return version
