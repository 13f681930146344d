"""The imported catalogue and the Telegram ``file_id`` of each product photo."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.engine import is_unique_violation
from ffengine.db.records import UpsertResult
from ffengine.db.store import Store, check_finite, check_text, to_json

log = logging.getLogger(__name__)

UPSERT_CHUNK = 500
PLAN_ATTEMPTS = 3
PRODUCT_FIELDS = ("title", "url", "image", "category", "colour", "gender", "price", "currency", "extra")


class ProductLike(Protocol):
    """What :meth:`ProductStore.upsert_products` reads (``ffengine.catalog.Product`` fits)."""

    id: str
    title: str
    url: str | None
    image: Any
    category: str | None
    colour: str | None
    gender: str | None
    price: float | None
    currency: str | None
    extra: Any


@dataclass
class UpsertPlan:
    """What an import changes, worked out in a read transaction."""

    new: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)  # same image: file_id kept
    new_image: list[dict[str, Any]] = field(default_factory=list)  # image changed: file_id dropped
    unchanged: int = 0


def product_row(product: ProductLike) -> dict[str, Any]:
    """The columns for one product, validated (a bad product names itself in the error)."""
    pid = check_text(product.id, "product id", m.PRODUCT_ID_MAX)
    where = f"product {pid!r}"
    price = product.price
    return {
        "id": pid,
        "title": check_text(product.title, f"{where}: title", 100_000),
        "url": product.url or None,
        "image": check_text(str(product.image), f"{where}: image", 100_000),
        "category": check_text(product.category or None, f"{where}: category", 128, optional=True),
        "colour": check_text(product.colour or None, f"{where}: colour", 64, optional=True),
        "gender": check_text(product.gender or None, f"{where}: gender", 64, optional=True),
        "price": None if price is None else check_finite(price, f"{where}: price", minimum=0.0),
        "currency": check_text(product.currency or None, f"{where}: currency", 8, optional=True),
        "extra": to_json(dict(product.extra) if product.extra else None, f"{where}: extra"),
    }


async def plan_upsert(session: AsyncSession, batch: list[dict[str, Any]]) -> UpsertPlan:
    plan = UpsertPlan()
    now = m.utcnow()
    # Ids first (one index scan): a first import then never looks rows up one chunk at a
    # time, which PostgreSQL plans badly while the table's statistics still say "empty".
    known = set(await session.scalars(select(m.Product.id)))
    columns = [getattr(m.Product, f) for f in PRODUCT_FIELDS]
    for start in range(0, len(batch), UPSERT_CHUNK):
        chunk = batch[start : start + UPSERT_CHUNK]
        ids = [r["id"] for r in chunk if r["id"] in known]
        old: dict[str, dict[str, Any]] = {}
        if ids:
            found = await session.execute(select(m.Product.id, *columns).where(m.Product.id.in_(ids)))
            old = {pid: dict(zip(PRODUCT_FIELDS, values, strict=True)) for pid, *values in found}
        for row in chunk:
            before = old.get(row["id"])
            if before is None:
                plan.new.append({**row, "created_at": now, "updated_at": now})
            elif all(before[f] == row[f] for f in PRODUCT_FIELDS):
                plan.unchanged += 1
            elif before["image"] == row["image"]:
                plan.changed.append({**row, "updated_at": now})
            else:  # a new photo: the uploaded one is stale, upload again next time
                plan.new_image.append({**row, "photo_file_id": None, "updated_at": now})
        await asyncio.sleep(0)
    return plan


async def apply_upsert(session: AsyncSession, plan: UpsertPlan) -> None:
    for rows, statement in (
        (plan.new, insert(m.Product)),
        (plan.changed, update(m.Product)),
        (plan.new_image, update(m.Product)),
    ):
        for start in range(0, len(rows), UPSERT_CHUNK):  # updates are bulk UPDATEs by primary key
            await session.execute(statement, rows[start : start + UPSERT_CHUNK])
            await asyncio.sleep(0)


class ProductStore(Store):
    async def upsert_products(self, products: Iterable[ProductLike]) -> UpsertResult:
        """Insert new products and update changed ones (matched by id).

        Compared in a read transaction, then written in one short write transaction (none
        when nothing changed, as on most restarts), yielding to the event loop between
        chunks, so a big catalogue neither stalls the bot nor holds SQLite's write lock for
        long. A product whose image changed loses its Telegram ``file_id`` (the old photo
        is stale). Products missing from ``products`` are left alone: logged searches may
        still name them. A bad product raises ``ValueError`` naming it; nothing is written.
        """
        rows: dict[str, dict[str, Any]] = {}
        for n, product in enumerate(products, start=1):
            row = product_row(product)
            rows[row["id"]] = row  # the last occurrence of a duplicated id wins
            if n % UPSERT_CHUNK == 0:
                await asyncio.sleep(0)
        batch = list(rows.values())
        for attempt in range(1, PLAN_ATTEMPTS + 1):
            plan = await self._read(lambda session: plan_upsert(session, batch))
            if plan.new or plan.changed or plan.new_image:
                try:
                    await self._write(partial(apply_upsert, plan=plan))
                except IntegrityError as err:  # another importer inserted some of these ids: compare again
                    if attempt == PLAN_ATTEMPTS or not is_unique_violation(err):
                        raise
                    log.info("another import added some of these products; comparing again")
                    continue
            return UpsertResult(len(plan.new), len(plan.changed) + len(plan.new_image), plan.unchanged)
        raise AssertionError("unreachable")

    async def product_count(self) -> int:
        async def read(session: AsyncSession) -> int:
            return await session.scalar(select(func.count()).select_from(m.Product)) or 0

        return await self._read(read)

    async def get_photo_file_ids(self, product_ids: Sequence[str]) -> dict[str, str]:
        """Known Telegram ``file_id``s for these products (products without one are absent)."""
        ids = list(dict.fromkeys(product_ids))

        async def read(session: AsyncSession) -> dict[str, str]:
            found: dict[str, str] = {}
            for start in range(0, len(ids), UPSERT_CHUNK):
                rows = await session.execute(
                    select(m.Product.id, m.Product.photo_file_id).where(
                        m.Product.id.in_(ids[start : start + UPSERT_CHUNK]), m.Product.photo_file_id.is_not(None)
                    )
                )
                found.update({pid: file_id for pid, file_id in rows if file_id})
            return found

        return await self._read(read)

    async def get_photo_file_id(self, product_id: str) -> str | None:
        return (await self.get_photo_file_ids([product_id])).get(product_id)

    async def set_photo_file_id(self, product_id: str, file_id: str) -> bool:
        """Remember the photo's Telegram ``file_id`` so it is never uploaded twice.

        Returns False (nothing stored) when the product was never imported.
        """
        check_text(file_id, "file_id", 256)

        async def write(session: AsyncSession) -> bool:
            result = await session.execute(
                update(m.Product).where(m.Product.id == product_id).values(photo_file_id=file_id)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

        return await self._write(write)
