"""Many writers at once on one real SQLite file: nothing may be lost or doubled.

Each Database method runs in its own session, so N concurrent tasks are N concurrent
sessions; two Database objects on one file stand in for the bot and the trainer
(two processes, two connection pools).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from ffengine.db import Database, TrainingBusy
from ffengine.db import engine as db_engine
from ffengine.db import store as db_store

WRITERS = 50


UPGRADER = (
    "import sys; from ffengine.db import upgrade_to_head; "
    "print('ready', flush=True); sys.stdin.readline(); upgrade_to_head(sys.argv[1])"
)


async def upgrade_together(url: str, processes: int = 3) -> None:
    """Separate processes that upgrade ``url``, released at the same moment once all are ready."""
    pipe = asyncio.subprocess.PIPE
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", UPGRADER, url, stdin=pipe, stdout=pipe, stderr=pipe)
        for _ in range(processes)
    ]
    for proc in procs:  # all imported and waiting: release them together
        assert await asyncio.wait_for(proc.stdout.readline(), 120) == b"ready\n"  # type: ignore[union-attr]
    for proc in procs:
        proc.stdin.write(b"go\n")  # type: ignore[union-attr]
    for proc in procs:
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()[-2000:]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ff.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite+aiosqlite:///{db_path}"


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await Database.open(url)
    yield database
    await database.close()


def rows(db_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()


def hold_write_lock(db_path: Path, seconds: float | threading.Event, locked: threading.Event) -> None:
    """Another process's writer: take the write lock and keep it (for ``seconds`` or until set)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE users SET language = language")
        locked.set()
        if isinstance(seconds, threading.Event):
            seconds.wait(30)
        else:
            threading.Event().wait(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_fifty_concurrent_writers_lose_nothing(db: Database, url: str, db_path: Path) -> None:
    other = await Database.open(url)  # a second pool on the same file, like a second process
    try:

        async def shopper(i: int) -> tuple[int, list[int]]:
            database = db if i % 2 else other
            user = 1000 + i % 10  # ten users, five tasks each: user rows are raced for too
            await database.touch_user(user, "en")
            emb = np.full(1280, i, np.float32)
            record = await database.record_search(
                user, f"u{i}", emb, None, float(i), "ok", [(f"p{i}-{r}", r / 10) for r in range(5)]
            )
            for rank, rec in enumerate(record.recommendation_ids):
                await database.rate(user, rec, 1 if (i + rank) % 2 else -1)
            await database.rate(user, record.recommendation_ids[0], 1)  # a change of mind
            await database.rate(user, record.recommendation_ids[0], 1)  # and a double press
            return record.search_id, record.recommendation_ids

        results = await asyncio.gather(*(shopper(i) for i in range(WRITERS)))
    finally:
        await other.close()

    assert len({search_id for search_id, _ in results}) == WRITERS
    assert rows(db_path, "SELECT count(*) FROM users") == [(10,)]
    assert rows(db_path, "SELECT count(*) FROM searches") == [(WRITERS,)]
    assert rows(db_path, "SELECT count(*) FROM recommendations") == [(WRITERS * 5,)]
    assert rows(db_path, "SELECT count(*) FROM feedback") == [(WRITERS * 5,)]
    expected_likes = sum(1 for i in range(WRITERS) for rank in range(5) if rank == 0 or (i + rank) % 2)
    assert rows(db_path, "SELECT count(*) FROM feedback WHERE value = 1") == [(expected_likes,)]
    # every search kept its own embedding and its own five products
    for search_id, file_id, blob in rows(db_path, "SELECT id, file_unique_id, embedding FROM searches"):
        i = int(file_id[1:])
        assert np.array_equal(np.frombuffer(blob, "<f4"), np.full(1280, i, np.float32))
        products = rows(db_path, f"SELECT product_id FROM recommendations WHERE search_id = {search_id} ORDER BY rank")
        assert products == [(f"p{i}-{r}",) for r in range(5)]
    stats = await db.stats()
    assert (stats.searches, stats.ratings, stats.likes) == (WRITERS, WRITERS * 5, expected_likes)


async def test_concurrent_presses_of_one_button_record_one_rating(db: Database, db_path: Path) -> None:
    record = await db.record_search(7, None, None, None, 1.0, "ok", [("p", 0.0)])
    results = await asyncio.gather(*(db.rate(7, record.recommendation_ids[0], 1) for _ in range(20)))
    assert sum(r.changed for r in results) == 1
    assert rows(db_path, "SELECT user_id, value FROM feedback") == [(7, 1)]


async def test_a_write_waits_for_another_writer_and_succeeds(db: Database, db_path: Path) -> None:
    await db.touch_user(1, "en")
    locked = threading.Event()
    holder = asyncio.create_task(asyncio.to_thread(hold_write_lock, db_path, 0.5, locked))
    await asyncio.to_thread(locked.wait, 10)
    record = await db.record_search(1, "f", None, None, 3.0, "ok", [("p", 0.1)])  # waits on the busy timeout
    await holder
    assert rows(db_path, "SELECT id FROM searches") == [(record.search_id,)]


async def test_locked_past_the_busy_timeout_is_retried(url: str, db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(db_engine, "BUSY_TIMEOUT_MS", 50)  # make SQLite give up fast, so retries happen
    db = await Database.open(url)
    try:
        await db.touch_user(1, "en")
        locked = threading.Event()
        holder = asyncio.create_task(asyncio.to_thread(hold_write_lock, db_path, 0.4, locked))
        await asyncio.to_thread(locked.wait, 10)
        rating_search = await db.record_search(1, "f", None, None, 3.0, "ok", [("p", 0.1)])
        await holder
    finally:
        await db.close()
    assert rows(db_path, "SELECT id FROM searches") == [(rating_search.search_id,)]


async def test_retries_are_bounded_and_a_failed_write_leaves_nothing(url: str, db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(db_engine, "BUSY_TIMEOUT_MS", 20)
    monkeypatch.setattr(db_store, "WRITE_ATTEMPTS", 2)
    db = await Database.open(url)
    try:
        release, locked = threading.Event(), threading.Event()
        holder = asyncio.create_task(asyncio.to_thread(hold_write_lock, db_path, release, locked))
        await asyncio.to_thread(locked.wait, 10)
        try:
            with pytest.raises(OperationalError, match="locked"):
                await db.record_search(1, "f", None, None, 3.0, "ok", [("p", 0.1)])
        finally:
            release.set()
            await holder
        assert rows(db_path, "SELECT count(*) FROM searches") == [(0,)]
        await db.record_search(1, "f", None, None, 3.0, "ok", [("p", 0.1)])  # the caller's retry works
    finally:
        await db.close()
    assert rows(db_path, "SELECT count(*) FROM searches") == [(1,)]


async def test_only_one_of_two_concurrent_training_starts_wins(db: Database, url: str, db_path: Path) -> None:
    other = await Database.open(url)
    try:
        outcomes = await asyncio.gather(
            *(d.start_training_run("feedback", {"who": i}) for i, d in enumerate([db, other] * 3)),
            return_exceptions=True,
        )
    finally:
        await other.close()
    started = [o for o in outcomes if isinstance(o, int)]
    assert len(started) == 1
    assert all(isinstance(o, TrainingBusy) and o.run_id == started[0] for o in outcomes if o not in started)
    assert rows(db_path, "SELECT count(*) FROM training_runs WHERE status = 'running'") == [(1,)]


async def test_concurrent_activations_leave_exactly_one_active(db: Database, url: str, db_path: Path) -> None:
    names = [f"v{i}" for i in range(6)]
    for name in names:
        await db.create_model_version(name, "IMAGENET1K_V2", f"idx/{name}")
    other = await Database.open(url)
    try:
        await asyncio.gather(*(d.activate_model_version(n) for d, n in zip([db, other] * 3, names, strict=True)))
    finally:
        await other.close()
    assert len(rows(db_path, "SELECT name FROM model_versions WHERE is_active")) == 1


async def test_processes_starting_together_build_the_schema_once(url: str, db_path: Path) -> None:
    """Bot and trainer opening an empty database at the same moment (separate processes,
    then several Database objects in one process)."""
    await upgrade_together(url)
    opened = await asyncio.gather(*(Database.open(url) for _ in range(4)))
    try:
        await asyncio.gather(*(d.touch_user(i + 1, None) for i, d in enumerate(opened)))
    finally:
        await asyncio.gather(*(d.close() for d in opened))
    assert rows(db_path, "SELECT count(*) FROM alembic_version") == [(1,)]
    assert rows(db_path, "SELECT count(*) FROM users") == [(4,)]
