"""The model that answers searches, and switching it without a restart.

A model version (a row in ``model_versions``) is a weights spec plus an index directory.
:class:`ModelSwitch` loads a version completely (in a worker thread) before it becomes
current, so a broken version never replaces a working one and searches never see half a
model. The switch itself is one attribute assignment; a batch already running keeps the
model it started with, so its features, index and logged version always agree.

The live version is the database's (``model_versions.is_active``), not the process's: an admin's
/rollback on one replica activates it there, and every other replica :meth:`~ModelSwitch.follow` s.
A version that does not load is remembered and not retried until the active version changes
again or an admin sends /reload: the replica keeps answering with what it had.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from ffengine.catalog import Product
from ffengine.db import Database, ModelVersion, NotFound, StoredItem
from ffengine.embedder import Embedder
from ffengine.errors import FFError
from ffengine.index import Index
from ffengine.items import Item
from ffengine.recommend import PhotoAnswer, Recommendation, Recommender

log = logging.getLogger(__name__)


class Stale(Exception):
    """A button from an earlier search names a product or category this model's catalogue lacks."""


@dataclass(frozen=True)
class ActiveModel:
    """A loaded model version: backbone, index and the recommender joining them."""

    version_id: int
    name: str
    recommender: Recommender

    @property
    def embedder(self) -> Embedder:
        return self.recommender.embedder

    @property
    def index(self) -> Index:
        return self.recommender.index

    def answer_photos(self, images: Sequence[Image.Image], k: int) -> list[PhotoAnswer]:
        """Blocking (model thread): each picture's features, ``k`` recommendations and likely items."""
        return self.recommender.answer_photos(images, k=k)

    @cached_property
    def categories(self) -> frozenset[str]:
        """The store categories this model's catalogue has (an item of another catalogue may not)."""
        return frozenset(value for value in self.recommender.column("category").values if value)

    def product(self, product_id: str) -> Product | None:
        """This model's catalogue product ``product_id``, if it has one."""
        row = self.recommender.row_by_id.get(product_id)
        return None if row is None else self.index.products[row]

    def search_item(self, image: Image.Image, item: StoredItem, k: int) -> tuple[np.ndarray, list[Recommendation]]:
        """Blocking (model thread): the crop of a logged item -> its features and ``k`` products of its
        kind; :class:`Stale` when this catalogue has no such category (the photo was searched by another)."""
        if item.category not in self.categories:
            raise Stale(f"no category {item.category!r} in {self.name}")
        return self.recommender.recommend_item(image, Item(item.category, item.probability, item.box), k=k)

    def more_like(self, product_id: str, k: int) -> tuple[np.ndarray, list[Recommendation]]:
        """Blocking (model thread): the product's own features as the query; :class:`Stale` when it is gone."""
        if product_id not in self.recommender.row_by_id:
            raise Stale(f"no product {product_id!r} in {self.name}")
        return self.recommender.more_like(product_id, k=k)


def catalogue_changed(old: ActiveModel, new: ActiveModel) -> bool:
    """Whether the product table must be refreshed: not for a retrain over the same catalogue."""
    old_hash, new_hash = old.index.manifest.get("catalog_hash"), new.index.manifest.get("catalog_hash")
    return not new_hash or new_hash != old_hash


def changed_pictures(old: ActiveModel, new: ActiveModel) -> list[str]:
    """Blocking: the products both catalogues hold whose picture differs (by sha256), though its reference
    may not: their old Telegram photos must go. Every product, where either index kept no hashes."""
    before, after = old.index.image_sha256, new.index.image_sha256
    rows = old.recommender.row_by_id
    if before is None or after is None:
        return [pid for pid in new.recommender.row_by_id if pid in rows]
    return [pid for pid, row in new.recommender.row_by_id.items() if pid in rows and not np.array_equal(before[rows[pid]], after[row])]


async def refresh_products(db: Database, old: ActiveModel, new: ActiveModel) -> None:
    """The product table as ``new``'s catalogue has it, when the catalogues differ: rows upserted (an
    unchanged one is not rewritten) and the Telegram photos of changed pictures forgotten."""
    if catalogue_changed(old, new):
        await db.upsert_products(new.index.products)
        await db.forget_photo_file_ids(await asyncio.to_thread(changed_pictures, old, new))


class ModelLoader:
    """Builds :class:`ActiveModel` s, sharing one backbone between versions with the same weights
    (a feedback retrain only changes the index's projection, not the network)."""

    def __init__(self, device: str, runtime: str = "auto") -> None:
        self.device = device
        self.runtime = runtime
        self._embedders: dict[str, Embedder] = {}
        self._lock = threading.Lock()

    def embedder(self, weights: str) -> Embedder:
        with self._lock:
            found = self._embedders.get(weights)
        if found is None:
            found = Embedder.load(weights, self.device, runtime=self.runtime)
            with self._lock:
                found = self._embedders.setdefault(weights, found)
        return found

    def recommender(self, weights: str, index_dir: Path) -> Recommender:
        """Blocking: load weights and index (``FFError`` with a readable message on failure)."""
        embedder = self.embedder(weights)
        return Recommender(embedder, Index.load(index_dir, expect_fingerprint=embedder.fingerprint))

    def load(self, version: ModelVersion) -> ActiveModel:
        """Blocking: load ``version``'s weights and index (``FFError`` with a readable message on failure)."""
        return ActiveModel(version.id, version.name, self.recommender(version.weights, Path(version.index_dir)))

    def keep_only(self, weights: Sequence[str]) -> None:
        """Forget backbones no longer in use (after a switch) so memory does not grow per version."""
        with self._lock:
            for key in [k for k in self._embedders if k not in weights]:
                del self._embedders[key]


class SwitchFailed(FFError):
    """Switching to ``version`` failed here: its files do not load, or the database refuses its products."""

    def __init__(self, version: ModelVersion, cause: BaseException) -> None:
        super().__init__(f"{version.name} ({cause})")
        self.version = version


class ModelSwitch:
    """Holds the current model; ``activate`` loads first, then records and swaps."""

    def __init__(self, loader: ModelLoader, current: ActiveModel) -> None:
        self.loader = loader
        self._current = current
        self._lock = asyncio.Lock()
        self.unloadable: int | None = None  # the active version's id, when switching to it failed here

    @classmethod
    async def open(cls, db: Database, loader: ModelLoader) -> ModelSwitch:
        """Load the database's active version (start-up; there must be one)."""
        version = await db.active_model_version()
        if version is None:
            raise RuntimeError("no active model version; bot.bootstrap.prepare registers one first")
        return cls(loader, await asyncio.to_thread(loader.load, version))

    @property
    def current(self) -> ActiveModel:
        return self._current

    async def activate(self, db: Database, version_id_or_name: int | str, *, over_parent: bool = False) -> ActiveModel:
        """Switch to a stored version: load it (off the loop), mark it active, then answer with it.

        Raises ``NotFound`` for an unknown version, ``FFError`` when its files do not load, and, with
        ``over_parent``, ``Superseded`` when the version it was made from is no longer the active one once
        it has loaded (a rollback meanwhile stands); in each case the current model stays.
        """
        async with self._lock:
            version = await db.get_model_version(version_id_or_name)
            if version is None:
                raise NotFound(f"no model version {version_id_or_name!r}; /models lists them")
            model = await asyncio.to_thread(self.loader.load, version)
            await refresh_products(db, self._current, model)
            await db.activate_model_version(version.id, replacing=version.parent_id if over_parent else None)
            self._swap(model, version)
            return model

    async def follow(self, db: Database) -> ActiveModel | None:
        """Switch to the database's active version when another process changed it; ``None`` if there
        is nothing to do. Raises :class:`SwitchFailed` (once per version) when it does not load or the
        database refuses its products: the current model stays."""
        async with self._lock:
            version = await db.active_model_version()
            if version is None or version.id in (self._current.version_id, self.unloadable):
                return None
            try:
                model = await asyncio.to_thread(self.loader.load, version)
                await refresh_products(db, self._current, model)  # every replica: the same rows, written once
            except Exception as exc:
                self.unloadable = version.id
                raise SwitchFailed(version, exc) from exc
            self._swap(model, version)
            return model

    def _swap(self, model: ActiveModel, version: ModelVersion) -> None:
        previous, self._current, self.unloadable = self._current, model, None
        self.loader.keep_only([version.weights])
        log.info("model switched: %s -> %s (%d products)", previous.name, model.name, len(model.index))

    async def reload(self, db: Database) -> ActiveModel:
        """Re-read the active version's index (and weights) from disk."""
        version = await db.active_model_version()
        if version is None:
            raise RuntimeError("no active model version")
        self.loader.keep_only([])
        return await self.activate(db, version.id)
