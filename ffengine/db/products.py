"""The imported catalogue and the Telegram ``file_id`` of each product photo."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import JSON, Text, case, cast, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.records import UpsertResult
from ffengine.db.store import Store, check_finite, check_text, dialect_insert, to_json

UPSERT_CHUNK = 500
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


def product_row(product: ProductLike) -> dict[str, Any]:
    """The columns for one product, validated (a bad product names itself in the error)."""
    pid = check_text(product.id, "product id", m.PRODUCT_ID_MAX)
    where = f"product {pid!r}"
    price = product.price
    limit = m.PRODUCT_FIELD_MAX
    return {
        "id": pid,
        "title": check_text(product.title, f"{where}: title", limit["title"]),
        "url": product.url or None,
        "image": check_text(str(product.image), f"{where}: image", limit["image"]),
        "category": check_text(product.category or None, f"{where}: category", limit["category"], optional=True),
        "colour": check_text(product.colour or None, f"{where}: colour", limit["colour"], optional=True),
        "gender": check_text(product.gender or None, f"{where}: gender", limit["gender"], optional=True),
        "price": None if price is None else check_finite(price, f"{where}: price", minimum=0.0),
        "currency": check_text(product.currency or None, f"{where}: currency", limit["currency"], optional=True),
        "extra": to_json(dict(product.extra) if product.extra else None, f"{where}: extra"),
    }


def chunks(rows: Sequence[Any]) -> Iterable[Sequence[Any]]:
    return (rows[start : start + UPSERT_CHUNK] for start in range(0, len(rows), UPSERT_CHUNK))


async def differing(session: AsyncSession, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``batch`` that are not stored as they are (new or changed).

    One scan of the table, read in chunks that each yield to the event loop, not a lookup
    per chunk: PostgreSQL plans those badly while its statistics still say "empty" (a first import).
    """
    rows = {row["id"]: row for row in batch}
    found = await session.stream(select(m.Product.id, *(getattr(m.Product, f) for f in PRODUCT_FIELDS)))
    async for part in found.partitions(UPSERT_CHUNK):
        for pid, *stored in part:
            if pid in rows and stored == [rows[pid][f] for f in PRODUCT_FIELDS]:
                del rows[pid]
        await asyncio.sleep(0)
    return list(rows.values())


def comparable(column: Any) -> Any:
    """``column`` as it can be compared: PostgreSQL's ``json`` type has no ``=``, its text has."""
    return cast(column, Text) if isinstance(column.type, JSON) else column


async def write_upsert(session: AsyncSession, rows: list[dict[str, Any]]) -> tuple[int, int]:
    """``INSERT … ON CONFLICT (id) DO UPDATE`` per chunk; (inserted, updated).

    A row is rewritten only when a field differs (a concurrent importer may have written it
    as it is since :func:`differing` looked), which sets ``updated_at``; its ``photo_file_id``
    is kept unless the image changed (the uploaded photo is stale: upload again next time).
    """
    now = m.utcnow()
    table = m.Product.__table__.c
    insert = dialect_insert(session)(m.Product.__table__)
    new = insert.excluded
    upsert = insert.on_conflict_do_update(
        index_elements=[table.id],
        set_={
            **{f: new[f] for f in PRODUCT_FIELDS},
            "updated_at": new.updated_at,
            "photo_file_id": case((table.image == new.image, table.photo_file_id), else_=None),
        },
        where=or_(*(comparable(table[f]).is_distinct_from(comparable(new[f])) for f in PRODUCT_FIELDS)),
    ).returning(table.created_at)
    inserted = updated = 0
    for chunk in chunks(rows):  # each one INSERT … VALUES (…), (…) (SQLAlchemy's "insertmanyvalues")
        written = list(await session.scalars(upsert, [{**row, "created_at": now, "updated_at": now} for row in chunk]))
        inserted += sum(created == now for created in written)  # unchanged rows are not returned
        updated += sum(created != now for created in written)
        await asyncio.sleep(0)
    return inserted, updated


class ProductStore(Store):
    async def upsert_products(self, products: Iterable[ProductLike]) -> UpsertResult:
        """Insert new products and update changed ones (matched by id).

        Compared in a read transaction, then the new and changed rows are written in one short
        write transaction (none when nothing changed, as on most restarts), yielding to the
        event loop between chunks, so a big catalogue neither stalls the bot nor holds SQLite's
        write lock for long. A product whose image changed loses its Telegram ``file_id`` (the
        old photo is stale). Products missing from ``products`` are left alone: logged searches
        may still name them. A bad product raises ``ValueError`` naming it; nothing is written.
        """
        rows: dict[str, dict[str, Any]] = {}
        for n, product in enumerate(products, start=1):
            row = product_row(product)
            rows[row["id"]] = row  # the last occurrence of a duplicated id wins
            if n % UPSERT_CHUNK == 0:
                await asyncio.sleep(0)
        batch = list(rows.values())
        todo = await self._read(lambda session: differing(session, batch))
        inserted, updated = await self._write(lambda session: write_upsert(session, todo)) if todo else (0, 0)
        return UpsertResult(inserted, updated, len(batch) - inserted - updated)

    async def get_photo_file_ids(self, product_ids: Sequence[str]) -> dict[str, str]:
        """Known Telegram ``file_id``s for these products (products without one are absent)."""
        ids = list(dict.fromkeys(product_ids))

        async def read(session: AsyncSession) -> dict[str, str]:
            found: dict[str, str] = {}
            for chunk in chunks(ids):
                rows = await session.execute(
                    select(m.Product.id, m.Product.photo_file_id).where(m.Product.id.in_(chunk), m.Product.photo_file_id.is_not(None))
                )
                found.update({pid: file_id for pid, file_id in rows if file_id})
            return found

        return await self._read(read)

    async def forget_photo_file_ids(self, product_ids: Sequence[str]) -> int:
        """Forget the Telegram ``file_id``s of these products (their pictures changed under the same
        reference, which the upsert cannot see); how many were forgotten."""
        ids = list(dict.fromkeys(product_ids))

        async def write(session: AsyncSession) -> int:
            forgotten = 0
            for chunk in chunks(ids):
                result = await session.execute(
                    update(m.Product).where(m.Product.id.in_(chunk), m.Product.photo_file_id.is_not(None)).values(photo_file_id=None)
                )
                forgotten += result.rowcount  # type: ignore[attr-defined]
            return forgotten

        return await self._write(write) if ids else 0

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
