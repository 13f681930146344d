"""Async engine for any SQLAlchemy URL, with SQLite made safe for several writers.

SQLite gets WAL (readers never block the writer), foreign keys, a busy timeout, and
``BEGIN IMMEDIATE`` for write transactions: the write lock is taken (waiting up to the
busy timeout) when the transaction starts, so a transaction that read first can never
fail half-way with "database is locked". Whatever still fails for lock contention is
retried by :func:`is_transient` callers. The database file is read with ``read()``, not
memory-mapped (some SQLite builds map it by default): a mapped file cut short under a
running process kills it with SIGBUS instead of raising an error.

SQLite also has a failure no error reports: the file deleted (or replaced) while the
process runs. SQLite keeps writing to the unlinked file, every write succeeds, and all
of it is gone at the next start. So the engine remembers which file it opened and
refuses write transactions (and new connections) once the path names another file or none.

PostgreSQL connections are pinged when taken from the pool, so a server restart costs
the pool its stale connections, not the next request; :func:`is_unreachable` tells
"the server is gone" from a refused statement, and :func:`is_out_of_space` "it has no room
to write" (a full disk): both mean "cannot save now", not a bug.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ffengine.db.errors import StorageUnavailable
from ffengine.errors import ConfigError

BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "ff_write"  # execution option: this transaction will write
TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock (PostgreSQL)
#: SQLSTATE classes of a server that cannot be talked to: connection exception, operator intervention
#: (shutting down, starting up, crashed).
UNREACHABLE_SQLSTATES = ("08", "57P")
DISCONNECT_SQLSTATES = {"57P01", "57P02"}  # terminated by an administrator's shutdown, by a crash
OUT_OF_SPACE_SQLSTATES = {"53100"}  # disk_full (PostgreSQL)
SQLITE_FULL = "database or disk is full"  # SQLITE_FULL: the disk (or max_page_count) has no room
#: What the Python package of each async driver is installed by (``pip install 'focusedfashion[...]'``).
DRIVER_EXTRAS = {"asyncpg": "postgres"}


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
    """``create_async_engine`` plus the SQLite set-up; creates an SQLite file's folder.

    A driver that is not installed is a ``ConfigError`` naming what to install.
    """
    parsed = async_url(url)
    path = sqlite_file(parsed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_sqlite_access(path)
    elif parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
    try:
        engine = create_async_engine(parsed, **kwargs)
    except ImportError as err:  # the driver is not installed (or its install is broken)
        raise ConfigError(missing_driver(parsed, err.name or "")) from None
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine, SQLiteFile(path.absolute()) if path is not None else None)
    return engine


def missing_driver(url: URL, module: str) -> str:
    """One line saying which package to install for ``url``'s driver."""
    extra = DRIVER_EXTRAS.get(module)
    install = f"pip install 'focusedfashion[{extra}]'" if extra else f"pip install {module or 'the driver'}"
    return f"DATABASE_URL uses {url.drivername}, whose driver {module or 'module'} is not installed: {install}"


def companion_files(path: Path) -> tuple[Path, ...]:
    """The database file and the write-ahead log and shared-memory files SQLite keeps beside it."""
    return (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))


def check_sqlite_access(path: Path) -> None:
    """Refuse to start on SQLite files this process cannot write (a read-only ``-shm`` left by
    another user, say): SQLite would open them and then fail every write."""
    for file in companion_files(path):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            raise ConfigError(
                f"the database file {file} is not readable and writable by this process: "
                "give it to the user this runs as (chown, chmod u+rw) and start again"
            )


class SQLiteFile:
    """The file an engine opened, by (device, inode): the path may later name another file or none."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: tuple[int, int] | None = None

    def identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def remember(self) -> None:
        if self.opened is None:
            self.opened = self.identity()

    def check(self) -> None:
        """Raise ``StorageUnavailable`` when the file opened earlier is no longer at its path."""
        if self.opened is not None and self.identity() != self.opened:
            raise StorageUnavailable(
                f"the database file {self.path} was deleted or replaced while in use; writes are refused "
                "(they would be lost). Put the file back, or restart to start an empty database."
            )


def _configure_sqlite(engine: AsyncEngine, file: SQLiteFile | None) -> None:
    if file is not None:

        @event.listens_for(engine.sync_engine, "do_connect")
        def before_connect(*_args: Any) -> None:
            file.check()  # SQLite would create an empty file in place of a deleted one

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
            cursor.execute("PRAGMA mmap_size = 0")  # read with read(), never through a mapping
        finally:
            cursor.close()
        if file is not None:
            file.remember()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        if immediate and file is not None:
            file.check()
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


def is_disconnect(err: BaseException | None) -> bool:
    """The server ended the connection: it died under a statement (the pool has dropped it and its
    peers), or the server was shutting down as it was made. The next connection may well work."""
    if not isinstance(err, DBAPIError):
        return False
    return err.connection_invalidated or _sqlstate(err) in DISCONNECT_SQLSTATES


def is_out_of_space(err: BaseException) -> bool:
    """The database has no room to write: its disk is full (or SQLite's ``max_page_count`` reached)."""
    if not isinstance(err, DBAPIError):
        return False
    return SQLITE_FULL in str(err.orig).lower() or _sqlstate(err) in OUT_OF_SPACE_SQLSTATES


def is_unreachable(err: BaseException) -> bool:
    """The database cannot be talked to (server down or restarting, connection dropped, SQLite
    file gone), as opposed to a statement it refused."""
    if isinstance(err, OSError):  # connect refused, reset, timed out
        return True
    if isinstance(err, DBAPIError):
        if is_disconnect(err) or "unable to open database file" in str(err.orig).lower():
            return True
        state = _sqlstate(err)
    else:  # asyncpg raises its own errors while connecting (e.g. "the database system is starting up")
        state = getattr(err, "sqlstate", None)
    return isinstance(state, str) and state.startswith(UNREACHABLE_SQLSTATES)
