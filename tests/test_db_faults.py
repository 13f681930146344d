"""Storage when the world misbehaves: a PostgreSQL restart or outage, an SQLite file deleted,
replaced or left read-only under the app, a missing driver, an id no column can hold.

Each test reproduces what a probe did to the running app and checks that the failure is
reported (``StorageUnavailable``, a one-line ``ConfigError``) instead of lost or silent.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import Database, StorageUnavailable
from ffengine.errors import ConfigError
from tests.pg_cluster import Cluster, own_postgres

REPO = Path(__file__).resolve().parents[1]
SHOPPER = 7


async def shown_results(db: Database, n: int = 3) -> list[int]:
    """A logged search of ``SHOPPER`` with ``n`` recommendations; their ids."""
    record = await db.record_search(
        SHOPPER, None, np.zeros(1280, np.float32), None, 5.0, "ok", [(f"p{i}", 0.1 * i) for i in range(n)]
    )
    return record.recommendation_ids


# ---------------------------------------------------------------- PostgreSQL restart and outage


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with own_postgres() as server:
        yield server


async def test_the_first_rating_after_a_postgresql_restart_is_stored(cluster: Cluster) -> None:
    db = await Database.open(cluster.url)
    try:
        first, second = await shown_results(db, 2)
        await db.rate(SHOPPER, first, 1)  # the pool now holds a connection to the old server process
        cluster.restart()
        assert (await db.rate(SHOPPER, second, -1)).changed
        assert await db.ratings_for_search(SHOPPER, (await db.rate(SHOPPER, first, 1)).search_id) == {first: 1, second: -1}
    finally:
        await db.close()


async def test_while_postgresql_is_down_every_request_says_so_then_works_again(cluster: Cluster) -> None:
    db = await Database.open(cluster.url)
    try:
        [rec] = await shown_results(db, 1)
        cluster.stop()
        for _ in range(2):  # the dropped connection, then a refused new one
            with pytest.raises(StorageUnavailable, match="cannot be reached"):
                await db.rate(SHOPPER, rec, 1)
            with pytest.raises(StorageUnavailable):
                await db.stats()
        cluster.start()
        assert (await db.rate(SHOPPER, rec, 1)).changed
    finally:
        await db.close()


async def test_a_connection_killed_under_a_transaction_is_retried_only_when_that_is_safe(cluster: Cluster) -> None:
    """Between the pool's ping and the statement a connection can still die: reads (and ratings,
    which are idempotent) run again on a new connection, other writes report it."""
    from sqlalchemy import text

    db = await Database.open(cluster.url)
    tries: list[int] = []

    async def killed_once(session: AsyncSession) -> int:
        tries.append(1)
        if len(tries) == 1:
            await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return (await session.execute(text("SELECT 1"))).scalar_one()

    try:
        assert await db._read(killed_once) == 1 and len(tries) == 2
        tries.clear()
        with pytest.raises(StorageUnavailable, match="administrator command"):
            await db._write(killed_once)
        assert len(tries) == 1
    finally:
        await db.close()


# ---------------------------------------------------------------- SQLite file faults


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'ff.db'}")
    yield database
    await database.close()


async def test_a_deleted_sqlite_file_refuses_writes_instead_of_losing_them(sqlite_db: Database, tmp_path: Path) -> None:
    first, second = await shown_results(sqlite_db, 2)
    await sqlite_db.rate(SHOPPER, first, 1)
    (tmp_path / "ff.db").unlink()  # the -wal and -shm stay, as after a careless `rm ff.db`
    with pytest.raises(StorageUnavailable, match="deleted or replaced"):
        await sqlite_db.rate(SHOPPER, second, 1)
    with pytest.raises(StorageUnavailable, match="deleted or replaced"):
        await sqlite_db.touch_user(SHOPPER + 1, "en")
    assert not (tmp_path / "ff.db").exists()  # no empty database was created in its place


async def test_a_replaced_sqlite_file_refuses_writes(sqlite_db: Database, tmp_path: Path) -> None:
    [rec] = await shown_results(sqlite_db, 1)
    path = tmp_path / "ff.db"
    copy = tmp_path / "copy.db"
    with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    os.replace(copy, path)  # e.g. a backup restored over the live file
    with pytest.raises(StorageUnavailable, match="deleted or replaced"):
        await sqlite_db.rate(SHOPPER, rec, 1)


async def test_sqlite_connections_never_map_the_file(sqlite_db: Database) -> None:
    from sqlalchemy import text

    async with sqlite_db._engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA mmap_size"))).scalar() == 0


async def test_a_read_only_shm_file_stops_start_up_with_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ff.db'}"
    db = await Database.open(url)
    await db.touch_user(SHOPPER, "en")
    shm = tmp_path / "ff.db-shm"
    assert shm.exists()  # the open connections keep it
    await db.close()
    shm.touch()
    shm.chmod(0o444)
    real_access = os.access

    def access(path: object, mode: int, **kw: object) -> bool:  # tests run as root, whom no mode bit stops
        if Path(str(path)) == shm and mode & os.W_OK:
            return False
        return real_access(path, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(ConfigError, match=r"ff\.db-shm is not readable and writable"):
        await Database.open(url)


# ---------------------------------------------------------------- missing driver, ids out of range

NO_ASYNCPG = "import sys; sys.modules['asyncpg'] = None  # as if `pip install focusedfashion` without [postgres]\n"


def test_a_missing_postgresql_driver_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    code = NO_ASYNCPG + "from ffengine.cli import main; sys.exit(main(['db', 'upgrade']))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": "postgresql+asyncpg://ff@127.0.0.1:9/ff"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "pip install 'focusedfashion[postgres]'" in done.stderr and "asyncpg" in done.stderr


async def test_opening_postgresql_without_its_driver_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigError, match=r"focusedfashion\[postgres\]"):
        await Database.open("postgresql+asyncpg://ff@127.0.0.1:9/ff")


async def test_a_version_id_no_column_can_hold_is_simply_unknown(sqlite_db: Database) -> None:
    assert await sqlite_db.get_model_version(10**30) is None
    assert await sqlite_db.get_model_version(-(10**30)) is None
