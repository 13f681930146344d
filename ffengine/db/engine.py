"""Async engine for any SQLAlchemy URL, with SQLite made safe for several writers.

SQLite gets WAL (readers never block the writer), foreign keys, a busy timeout, and
``BEGIN IMMEDIATE`` for write transactions: the write lock is taken (waiting up to the
busy timeout) when the transaction starts, so a transaction that read first can never
fail half-way with "database is locked". Whatever still fails for lock contention is
retried by :func:`is_transient` callers. PostgreSQL needs none of this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ffengine.errors import ConfigError

BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "ff_write"  # execution option: this transaction will write
TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock (PostgreSQL)


def parse_url(url: str | URL) -> URL:
    """An SQLAlchemy URL, or a ``ConfigError`` naming ``DATABASE_URL``."""
    try:
        return make_url(url)
    except Exception as err:  # sqlalchemy raises ArgumentError / ValueError variants
        raise ConfigError(f"DATABASE_URL is not a valid SQLAlchemy URL: {err}") from None


def display_url(url: str | URL) -> str:
    """The URL with its password hidden: safe for logs."""
    return parse_url(url).render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The database file of an SQLite URL; ``None`` for memory databases and other backends."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg"}


def async_url(url: str | URL) -> URL:
    """The URL with an async driver: bare ``sqlite://`` / ``postgresql://`` get aiosqlite /
    asyncpg; a named sync driver is refused with a message saying what to write."""
    parsed = parse_url(url)
    parsed = parsed.set(drivername=ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername))
    try:
        dialect = parsed.get_dialect()
    except Exception as err:
        raise ConfigError(f"DATABASE_URL names an unknown database driver {parsed.drivername!r}: {err}") from None
    if not dialect.is_async:
        raise ConfigError(
            "DATABASE_URL must name an async driver (sqlite+aiosqlite://, postgresql+asyncpg://), "
            f"got {parsed.drivername!r}"
        )
    return parsed


def make_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """``create_async_engine`` plus the SQLite set-up; creates an SQLite file's folder."""
    parsed = async_url(url)
    path = sqlite_file(parsed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (see on_begin): sqlite3's legacy mode would
        # skip it for SELECT and DDL, breaking isolation and transactional migrations.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")  # stays "memory" for memory databases
            cursor.execute("PRAGMA synchronous = FULL")  # a committed rating survives power loss
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlstate(err: DBAPIError) -> str | None:
    return getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None)


def is_unique_violation(err: DBAPIError) -> bool:
    """A unique constraint (or primary key) refused a row: a concurrent insert won."""
    return "unique constraint failed" in str(err.orig).lower() or _sqlstate(err) == "23505"


def is_transient(err: DBAPIError) -> bool:
    """Lock contention worth retrying: SQLite busy/locked, PostgreSQL serialization/deadlock."""
    orig = err.orig
    message = str(orig).lower()
    if "database is locked" in message or "database is busy" in message or "database table is locked" in message:
        return True
    return _sqlstate(err) in TRANSIENT_SQLSTATES
