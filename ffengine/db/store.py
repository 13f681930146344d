"""Transactions with a bounded retry, shared by every part of :class:`~ffengine.db.Database`.

Each public method is one transaction: ``_read`` for queries, ``_write`` for changes.
``_write`` retries the whole transaction when the database reports lock contention
(SQLite "database is locked" after the busy timeout, PostgreSQL serialization failure
or deadlock: asyncpg reports those as a plain ``DBAPIError``, not an ``OperationalError``)
and, where a method asks for it, when a unique constraint caught a race
(then the retry takes the "row exists" path; other integrity errors are bugs and raise
at once). So a write is never silently lost: it either commits or raises. A database that
cannot be reached (server down, connection dropped, SQLite file gone) or has no room to
write (a full disk) raises :class:`~ffengine.db.errors.StorageUnavailable`, whatever the
driver said.

Writes that touch one user's rows lock that user's row first (:func:`lock_user`), so that
two of them (an erase and a rating, say) queue on it instead of deadlocking on the rows
beneath it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from ffengine.db import models as m
from ffengine.db.engine import (
    WRITE_OPTION,
    is_disconnect,
    is_out_of_space,
    is_transient,
    is_unique_violation,
    is_unreachable,
)
from ffengine.db.errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
WRITE_ATTEMPTS = 6
BACKOFF_S = 0.05
BIGINT_MAX = 2**63 - 1  # the largest id a column (and the drivers) can hold
#: The largest value of each integer column type (narrowest first: they subclass ``Integer``).
INTEGER_MAX = ((sa.SmallInteger, 2**15 - 1), (sa.BigInteger, BIGINT_MAX), (sa.Integer, 2**31 - 1))


class Store:
    """Owns the engine and the two session factories (read, write)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reader = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        self._writer = async_sessionmaker(
            engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False, autoflush=False
        )

    async def _read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await self._transaction(self._reader, fn, idempotent=True)

    async def _write(
        self, fn: Callable[[AsyncSession], Awaitable[T]], *, retry_on_conflict: bool = False, idempotent: bool = False
    ) -> T:
        """Run ``fn`` in a write transaction, committed on return; retried on contention.

        ``fn`` must only touch the database (it may run more than once). ``idempotent``: running
        it twice does what running it once does, so it is also retried on a dropped connection
        (which may have committed it).
        """
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return await self._transaction(self._writer, fn, idempotent=idempotent)
            except IntegrityError as err:
                if attempt == WRITE_ATTEMPTS or not retry_on_conflict or not is_unique_violation(err):
                    raise
                log.info("concurrent insert won a unique constraint (attempt %d), retrying", attempt)
            except DBAPIError as err:
                if attempt == WRITE_ATTEMPTS or not is_transient(err):
                    raise
                log.warning("database busy (attempt %d of %d), retrying: %s", attempt, WRITE_ATTEMPTS, err.orig)
            await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    async def _transaction(
        self, sessions: async_sessionmaker[AsyncSession], fn: Callable[[AsyncSession], Awaitable[T]], *, idempotent: bool
    ) -> T:
        """One transaction; an idempotent one runs once more when its connection turned out dead.

        A server restart leaves every pooled connection dead; the pool pings each before use,
        but a connection can still die between the ping and the statement. After the first
        such failure the pool drops them all, so the second try gets a new one.
        """
        for attempt in (1, 2):
            try:
                with unreachable_as_unavailable():
                    async with sessions() as session, session.begin():
                        return await fn(session)
            except StorageUnavailable as err:
                if not (idempotent and attempt == 1 and is_disconnect(err.__cause__)):
                    raise
                log.warning("database connection lost (%s); retrying on a new one", err)
        raise AssertionError("unreachable")


async def lock_user(session: AsyncSession, user_id: int, *, erase: bool = False) -> None:
    """Lock the user's row before touching the rows beneath it, in every write that does, so that
    such writes queue on it in one order (PostgreSQL; SQLite writers are serialised anyway).
    ``erase``: exclusively (its rows are about to go); else shared with the user's other writes,
    which then see the erase's result (the row gone, or there) once it has committed."""
    query = sa.select(m.User.id).where(m.User.id == user_id)
    await session.execute(query.with_for_update() if erase else query.with_for_update(key_share=True))


def to_record(cls: type[T], row: Any, **given: Any) -> T:
    """A record (:mod:`ffengine.db.records`) of an ORM row: each field not ``given`` is the row's attribute of that name."""
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls) if f.name not in given}, **given)


def dialect_insert(session: AsyncSession) -> Callable[[Any], Any]:
    """The ``insert`` with ``on_conflict_do_*`` of the session's database (SQLite and PostgreSQL have it)."""
    return postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert


@contextmanager
def unreachable_as_unavailable() -> Iterator[None]:
    """Re-raise "the database cannot be reached" as :class:`StorageUnavailable` (the driver's own
    error, an ``OSError`` or a raw asyncpg one, is kept as its cause)."""
    try:
        yield
    except StorageUnavailable:
        raise
    except Exception as err:
        if is_unreachable(err):
            problem = "cannot be reached"
        elif is_out_of_space(err):
            problem = "has no room to write (disk full)"
        else:
            raise
        detail = str(getattr(err, "orig", None) or err).strip() or type(err).__name__
        raise StorageUnavailable(f"the database {problem}: {detail.splitlines()[0][:200]}") from err


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_id(value: Any, what: str) -> int:
    """An integer id (not a bool, not a str from callback data)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return value


def column_max(column: InstrumentedAttribute[int]) -> int:
    """The largest value an integer column holds (PostgreSQL refuses, and asyncpg cannot even send, more)."""
    return next(top for kind, top in INTEGER_MAX if isinstance(column.type, kind))


def check_user_id(user_id: Any) -> int:
    check_id(user_id, "user_id")
    if not 0 < user_id <= BIGINT_MAX:
        raise ValueError(f"user_id must be a positive 64-bit integer, got {user_id}")
    return user_id


def check_finite(value: Any, what: str, *, minimum: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {short(value)}") from None
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = f" and >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{what} must be finite{bound}, got {short(value)}")
    return number


def check_text(value: Any, what: str, max_len: int, *, optional: bool = False) -> str | None:
    """``value`` as text a column of ``max_len`` characters holds on every database (PostgreSQL refuses a
    NUL byte in text, SQLite stores it: refused here for both)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {short(value)}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL byte")
    return value


def to_json(value: Any, what: str) -> Any:
    """A JSON-safe copy (numpy numbers and arrays become Python ones); NaN and
    unserialisable objects are refused with a message naming ``what``."""
    if value is None:
        return None

    def convert(obj: Any) -> Any:
        if hasattr(obj, "tolist"):  # numpy scalar or array
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(value, default=convert, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON (no NaN/inf): {err}") from None
