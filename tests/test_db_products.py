"""The imported catalogue and product photo file_ids, on a real SQLite file."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from ffengine.catalog import MAX_ID_LENGTH, Product, read_catalog
from ffengine.db import Database, UpsertResult
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
    assert await db.product_count() == 4
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
    assert await db.get_photo_file_id("a") is None
    assert await db.set_photo_file_id("a", "AgACAgIAAxkBAAIB")
    assert await db.set_photo_file_id("b", "AgACAgIAAxkBAAIC")
    assert await db.get_photo_file_id("a") == "AgACAgIAAxkBAAIB"
    assert await db.get_photo_file_ids(["a", "b", "zzz", "a"]) == {"a": "AgACAgIAAxkBAAIB", "b": "AgACAgIAAxkBAAIC"}

    await db.upsert_products([product("a", title="renamed"), product("b", image="/catalog/images/b-v2.jpg")])
    assert await db.get_photo_file_id("a") == "AgACAgIAAxkBAAIB"  # same photo: keep it
    assert await db.get_photo_file_id("b") is None  # new photo: upload again
    assert not await db.set_photo_file_id("never-imported", "AgAC")
    assert await db.get_photo_file_id("never-imported") is None


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
    assert await db.product_count() == 1500


async def test_bad_products_are_named_and_nothing_is_written(db: Database) -> None:
    with pytest.raises(ValueError, match=r"'bad'.*price"):
        await db.upsert_products([product("ok"), product("bad", price=float("nan"))])
    with pytest.raises(ValueError, match="product id"):
        await db.upsert_products([product("x" * (PRODUCT_ID_MAX + 1))])
    assert await db.product_count() == 0


async def test_real_catalogue_imports_and_reimports(db: Database, shared, db_path: Path) -> None:
    """The 10k Myntra catalogue as ffengine.catalog reads it (first 3,000 products)."""
    catalogue = read_catalog(shared("datasets", "catalog-10k", "products.csv"), limit=3000)
    products = catalogue.products
    assert len(products) == 3000
    assert await db.upsert_products(products) == UpsertResult(3000, 0, 0)
    assert await db.upsert_products(products) == UpsertResult(0, 0, 3000)
    assert await db.product_count() == 3000
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
