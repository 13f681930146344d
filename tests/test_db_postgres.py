"""The same storage on PostgreSQL (asyncpg), where races really race.

Runs only when ``FF_TEST_POSTGRES_URL`` names a server on this machine, e.g.
``postgresql+asyncpg://ff@127.0.0.1:55432/postgres`` (a role that may CREATE DATABASE);
each test gets a fresh database that is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ffengine.db import Database, FeedbackRefused, TrainingBusy, upgrade_to_head
from ffengine.db.migrate import alembic_config, engine_revision, head_revision
from ffengine.db.models import Base
from tests.pg_cluster import fresh_database
from tests.test_db_concurrency import upgrade_together
from tests.test_db_products import upsert_after_a_stale_comparison

ADMIN_URL = os.environ.get("FF_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.skipif(
    not ADMIN_URL, reason="set FF_TEST_POSTGRES_URL=postgresql+asyncpg://user@127.0.0.1:PORT/postgres to run"
)
if ADMIN_URL and make_url(ADMIN_URL).host not in ("127.0.0.1", "localhost", "::1", None):
    raise RuntimeError("FF_TEST_POSTGRES_URL must point at this machine (loopback only)")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database(ADMIN_URL) as url:
        yield url


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = await Database.open(pg_url)
    yield database
    await database.close()


@pytest.fixture
async def probe(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """A separate connection pool: sees only what was committed."""
    engine = create_async_engine(pg_url)
    yield engine
    await engine.dispose()


async def scalar(engine: AsyncEngine, sql: str) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql))).scalar_one()


async def test_migrations_up_down_up_and_models_match(pg_url: str, probe: AsyncEngine) -> None:
    await asyncio.to_thread(upgrade_to_head, pg_url)
    assert await engine_revision(probe) == head_revision()

    def diff(conn) -> list:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": Base.metadata})
        return compare_metadata(ctx, Base.metadata)

    async with probe.connect() as conn:
        assert await conn.run_sync(diff) == []
    cfg = alembic_config(pg_url)
    await asyncio.to_thread(command.downgrade, cfg, "base")
    assert await scalar(probe, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 1  # alembic_version
    await asyncio.to_thread(command.upgrade, cfg, "head")
    async with probe.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_processes_starting_together_build_the_schema_once(pg_url: str, probe: AsyncEngine) -> None:
    await upgrade_together(pg_url)
    assert await scalar(probe, "SELECT count(*) FROM alembic_version") == 1
    opened = await asyncio.gather(*(Database.open(pg_url) for _ in range(3)))  # and in one process
    await asyncio.gather(*(d.close() for d in opened))


async def test_search_rate_export_forget(db: Database, probe: AsyncEngine) -> None:
    emb = np.random.default_rng(0).standard_normal(1280).astype(np.float32)
    version = await db.create_model_version("base", "IMAGENET1K_V2", "data/index", activate=True)
    record = await db.record_search(7, "AQAD", emb, version.id, 42.0, "ok", [("a", 0.1), ("b", 0.2)])
    assert (await db.rate(7, record.recommendation_ids[0], 1)).changed
    assert not (await db.rate(7, record.recommendation_ids[0], 1)).changed
    assert (await db.rate(7, record.recommendation_ids[0], -1)).previous == 1
    with pytest.raises(FeedbackRefused):
        await db.rate(8, record.recommendation_ids[0], 1)
    (exported,) = await db.export_feedback(rated_only=True)
    assert np.array_equal(exported.embedding, emb) and exported.created_at.tzinfo is not None
    assert [i.rating for i in exported.items] == [-1, None]
    stats = await db.stats()
    assert (stats.searches, stats.ratings, stats.dislikes, stats.active_model_version) == (1, 1, 1, "base")
    assert stats.like_rate["base"].ratings == 1
    assert (await db.user_summary(7)).searches_with_embedding == 1
    assert await db.forget_user(7) == 1 + 1 + 2 + 1
    for table in ("users", "searches", "recommendations", "feedback"):
        assert await scalar(probe, f"SELECT count(*) FROM {table}") == 0


async def test_item_presses_imply_likes_and_are_forgotten(db: Database, probe: AsyncEngine) -> None:
    """The implied-like query and the erasure of items and origins, on PostgreSQL's planner and constraints."""
    from ffengine.db import Origin
    from tests.test_db_presses import OUTFIT, SHOWN, catalogue

    emb = np.zeros(1280, np.float32)
    await catalogue(db)
    parent = await db.record_search(7, "AQAD", emb, None, 1.0, "ok", SHOWN, file_id="f", items=OUTFIT)
    assert (await db.pressed_item(7, parent.search_id, 1)).item.box == OUTFIT[1].box
    with pytest.raises(FeedbackRefused):
        await db.pressed_item(8, parent.search_id, 1)
    await db.record_search(7, None, emb, None, 1.0, "ok", [("j3", 0.1)], origin=Origin.item(parent.search_id, 1))
    more = await db.pressed_recommendation(7, parent.recommendation_ids[0])
    await db.record_search(7, None, emb, None, 1.0, "ok", [("t2", 0.1)], origin=Origin.more_like(more))
    (exported,) = await db.export_feedback(rated_only=True)
    assert [i.rating for i in exported.items] == [None, 1, None, 1, None] and exported.search_id == parent.search_id
    assert await db.forget_user(7) == 2 + 3 + 3 + 7 + 1
    for table in ("searches", "search_items", "search_origins", "recommendations"):
        assert await scalar(probe, f"SELECT count(*) FROM {table}") == 0


async def test_products_on_postgres(pg_url: str, db: Database) -> None:
    from ffengine.catalog import Product

    items = [Product(id=f"p{i}", title=f"T{i}", url="https://shop.example/", image=f"/img/{i}.jpg") for i in range(700)]
    other = await Database.open(pg_url)
    try:  # two importers racing on the same new ids: one inserts, the other finds them unchanged
        results = await asyncio.gather(db.upsert_products(items), other.upsert_products(items))
    finally:
        await other.close()
    assert sorted((r.inserted, r.unchanged) for r in results) == [(0, 700), (700, 0)]
    assert await db.set_photo_file_id("p3", "AgAC")
    assert (await db.upsert_products(items)).unchanged == 700
    assert await db.get_photo_file_ids(["p3", "p4"]) == {"p3": "AgAC"}


async def test_the_upsert_statement_on_postgres(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await upsert_after_a_stale_comparison(db, monkeypatch)


async def test_concurrent_writers_and_double_presses(pg_url: str, db: Database, probe: AsyncEngine) -> None:
    other = await Database.open(pg_url)
    try:

        async def shopper(i: int) -> None:
            database = db if i % 2 else other
            user = 1000 + i % 10  # first-time user rows are raced for
            record = await database.record_search(
                user, None, np.full(1280, i, np.float32), None, 1.0, "ok", [("p", 0.5)]
            )
            presses = await asyncio.gather(*(database.rate(user, record.recommendation_ids[0], 1) for _ in range(4)))
            assert sum(p.changed for p in presses) == 1

        await asyncio.gather(*(shopper(i) for i in range(50)))
    finally:
        await other.close()
    assert await scalar(probe, "SELECT count(*) FROM users") == 10
    assert await scalar(probe, "SELECT count(*) FROM searches") == 50
    assert await scalar(probe, "SELECT count(*) FROM feedback") == 50


async def test_one_active_version_and_one_running_run(pg_url: str, db: Database, probe: AsyncEngine) -> None:
    for i in range(6):
        await db.create_model_version(f"v{i}", "IMAGENET1K_V2", f"idx{i}")
    other = await Database.open(pg_url)
    try:
        await asyncio.gather(*(d.activate_model_version(f"v{i}") for i, d in enumerate([db, other] * 3)))
        starts = await asyncio.gather(
            *(d.start_training_run("feedback", {}) for d in [db, other] * 3), return_exceptions=True
        )
    finally:
        await other.close()
    assert await scalar(probe, "SELECT count(*) FROM model_versions WHERE is_active") == 1
    assert sum(isinstance(s, int) for s in starts) == 1
    assert all(isinstance(s, int | TrainingBusy) for s in starts)
    with pytest.raises(IntegrityError):
        async with probe.begin() as conn:
            await conn.execute(text("UPDATE model_versions SET is_active = true"))


async def test_activation_notifies_listeners_once_committed(pg_url: str, db: Database) -> None:
    from ffengine.db import ACTIVE_VERSION_CHANNEL

    other = await Database.open(pg_url)  # another replica
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        async with other.listen(ACTIVE_VERSION_CHANNEL, heard.put_nowait) as lost:
            base = await db.create_model_version("base", "w", "i", activate=True)
            assert await asyncio.wait_for(heard.get(), 5) == str(base.id)
            small = await db.create_model_version("small", "w", "j")
            await db.activate_model_version("small")
            assert await asyncio.wait_for(heard.get(), 5) == str(small.id)
            with pytest.raises(Exception):  # noqa: B017 - an activation that does not commit notifies nobody
                await db.activate_model_version("nosuch")
            await asyncio.sleep(0.2)
            assert heard.empty() and not lost.done()
    finally:
        await other.close()


async def test_concurrent_claims_of_one_update_have_one_winner(pg_url: str, db: Database) -> None:
    other = await Database.open(pg_url)
    try:
        claims = await asyncio.gather(*(d.claim_update(99, f"bot-{i}") for i, d in enumerate([db, other] * 5)))
    finally:
        await other.close()
    assert sum(c.mine for c in claims) == 1 and len({c.replica for c in claims}) == 1
