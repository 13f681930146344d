"""The imported catalogue and product photo file_ids, on a real SQLite file."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from ffengine.catalog import MAX_ID_LENGTH, Product, read_catalog
from ffengine.db import Database, UpsertResult
from ffengine.db import models as m
from ffengine.db.models import PRODUCT_ID_MAX


def product(pid: str, **changes: object) -> Product:
    base = Product(
        id=pid,
        title=f"Blue shirt {pid}",
        url=f"https://shop.example/{pid}",
        image=f"/catalog/images/{pid}.jpg",
        price=19.99,
        currency="EUR",
        category="Shirts",
        colour="Blue",
        gender="Men",
        extra={"season": "Summer"},
    )
    return dataclasses.replace(base, **changes)


def test_product_ids_fit_the_column() -> None:
    assert MAX_ID_LENGTH <= PRODUCT_ID_MAX


async def test_upsert_inserts_updates_and_leaves_unchanged(db: Database, db_path: Path) -> None:
    first = await db.upsert_products([product("a"), product("b"), product("c")])
    assert first == UpsertResult(inserted=3, updated=0, unchanged=0)
    again = await db.upsert_products([product("a"), product("b", price=9.5, extra={"season": "Winter"}), product("d")])
    assert again == UpsertResult(inserted=1, updated=1, unchanged=1)
    with sqlite3.connect(db_path) as conn:
        price, extra = conn.execute("SELECT price, extra FROM products WHERE id = 'b'").fetchone()
        created, updated = conn.execute("SELECT created_at, updated_at FROM products WHERE id = 'b'").fetchone()
    assert price == 9.5 and "Winter" in extra and updated > created
    assert (await db.stats()).products == 4


async def test_duplicate_ids_in_one_import_keep_the_last(db: Database, db_path: Path) -> None:
    result = await db.upsert_products([product("a", title="old"), product("a", title="new")])
    assert result.inserted == 1
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT title FROM products").fetchall() == [("new",)]


async def test_photo_file_id_is_remembered_and_dropped_when_the_image_changes(db: Database) -> None:
    await db.upsert_products([product("a"), product("b")])
    assert await db.get_photo_file_ids(["a"]) == {}
    assert await db.set_photo_file_id("a", "AgACAgIAAxkBAAIB")
    assert await db.set_photo_file_id("b", "AgACAgIAAxkBAAIC")
    assert await db.get_photo_file_ids(["a", "b", "zzz", "a"]) == {"a": "AgACAgIAAxkBAAIB", "b": "AgACAgIAAxkBAAIC"}

    await db.upsert_products([product("a", title="renamed"), product("b", image="/catalog/images/b-v2.jpg")])
    # same photo: keep it; new photo: upload again
    assert await db.get_photo_file_ids(["a", "b"]) == {"a": "AgACAgIAAxkBAAIB"}
    assert not await db.set_photo_file_id("never-imported", "AgAC")
    assert await db.get_photo_file_ids(["never-imported"]) == {}


async def upsert_after_a_stale_comparison(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write decides, not the comparison before it (another importer may have written since):
    an unchanged row is not rewritten, a changed one gets a new ``updated_at`` and keeps its photo's
    ``file_id`` unless its image changed. Shared with the PostgreSQL tests."""
    from ffengine.db import products

    async def saw_nothing(_session: object, batch: list) -> list:
        return batch

    async def stored() -> dict[str, tuple]:
        async with db._engine.connect() as conn:
            rows = await conn.execute(select(m.Product.id, m.Product.updated_at, m.Product.photo_file_id, m.Product.title))
            return {pid: tuple(values) for pid, *values in rows}

    await db.upsert_products([product("a"), product("b")])
    assert await db.set_photo_file_id("a", "AgAC-a") and await db.set_photo_file_id("b", "AgAC-b")
    before = await stored()
    monkeypatch.setattr(products, "differing", saw_nothing)
    result = await db.upsert_products([product("a"), product("b", title="new"), product("c")])
    assert result == UpsertResult(inserted=1, updated=1, unchanged=1)
    after = await stored()
    assert after["a"] == before["a"]  # not rewritten
    assert after["b"][1:] == ("AgAC-b", "new") and after["b"][0] > before["b"][0]
    assert after["c"][1:] == (None, "Blue shirt c")
    changed = [product("a"), product("b", title="new", image="/v2.jpg"), product("c", extra={"season": "Winter"})]
    assert await db.upsert_products(changed) == UpsertResult(inserted=0, updated=2, unchanged=1)
    assert await db.get_photo_file_ids(["a", "b", "c"]) == {"a": "AgAC-a"}  # b's photo is stale now


async def test_the_upsert_statement_decides_what_is_new_changed_or_unchanged(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await upsert_after_a_stale_comparison(db, monkeypatch)


async def test_an_unchanged_reimport_does_not_write(db_path: Path, monkeypatch) -> None:
    """A restart with the same catalogue must not take SQLite's write lock at all."""
    from ffengine.db import engine as db_engine
    from ffengine.db import store as db_store

    monkeypatch.setattr(db_engine, "BUSY_TIMEOUT_MS", 10)
    monkeypatch.setattr(db_store, "WRITE_ATTEMPTS", 1)
    db = await Database.open(f"sqlite+aiosqlite:///{db_path}")
    items = [product(f"p{i}") for i in range(1200)]
    try:
        await db.upsert_products(items)
        writer = sqlite3.connect(db_path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock throughout
        try:
            assert await db.upsert_products(items) == UpsertResult(0, 0, 1200)
            with pytest.raises(OperationalError, match="locked"):  # (a real change would have to wait)
                await db.upsert_products([product("p1", title="changed")])
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    finally:
        await db.close()


async def test_concurrent_imports_of_the_same_catalogue(db: Database, db_path: Path) -> None:
    other = await Database.open(f"sqlite+aiosqlite:///{db_path}")
    items = [product(f"p{i}") for i in range(1500)]
    try:
        results = await asyncio.gather(db.upsert_products(items), other.upsert_products(items))
    finally:
        await other.close()
    assert sum(r.inserted for r in results) == 1500
    assert sum(r.unchanged for r in results) == 1500
    assert (await db.stats()).products == 1500


async def test_bad_products_are_named_and_nothing_is_written(db: Database) -> None:
    with pytest.raises(ValueError, match=r"'bad'.*price"):
        await db.upsert_products([product("ok"), product("bad", price=float("nan"))])
    with pytest.raises(ValueError, match="product id"):
        await db.upsert_products([product("x" * (PRODUCT_ID_MAX + 1))])
    assert (await db.stats()).products == 0


async def test_real_catalogue_imports_and_reimports(db: Database, shared, db_path: Path) -> None:
    """The 10k Myntra catalogue as ffengine.catalog reads it (first 3,000 products)."""
    catalogue = read_catalog(shared("datasets", "catalog-10k", "products.csv"), limit=3000)
    products = catalogue.products
    assert len(products) == 3000
    assert await db.upsert_products(products) == UpsertResult(3000, 0, 0)
    assert await db.upsert_products(products) == UpsertResult(0, 0, 3000)
    assert (await db.stats()).products == 3000
    retitled = [dataclasses.replace(p, title=p.title + " (new season)") for p in products[:200]]
    assert await db.upsert_products(retitled + products[200:]) == UpsertResult(0, 200, 2800)
    one = products[1234]
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT title, category, colour, gender, image FROM products WHERE id = ?", (one.id,)
        ).fetchone()
    assert row == (one.title, one.category, one.colour, one.gender, one.image)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM products WHERE title LIKE '% (new season)'").fetchone() == (200,)
