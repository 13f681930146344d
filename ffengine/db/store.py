"""Transactions with a bounded retry, shared by every part of :class:`~ffengine.db.Database`.

Each public method is one transaction: ``_read`` for queries, ``_write`` for changes.
``_write`` retries the whole transaction when the database reports lock contention
(SQLite "database is locked" after the busy timeout, PostgreSQL serialization failure
or deadlock) and, where a method asks for it, when a unique constraint caught a race
(then the retry takes the "row exists" path; other integrity errors are bugs and raise
at once). So a write is never silently lost: it either commits or raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ffengine.db.engine import WRITE_OPTION, is_transient, is_unique_violation

log = logging.getLogger(__name__)

T = TypeVar("T")
WRITE_ATTEMPTS = 6
BACKOFF_S = 0.05


class Store:
    """Owns the engine and the two session factories (read, write)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reader = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        self._writer = async_sessionmaker(
            engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False, autoflush=False
        )

    async def _read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async with self._reader() as session, session.begin():
            return await fn(session)

    async def _write(self, fn: Callable[[AsyncSession], Awaitable[T]], *, retry_on_conflict: bool = False) -> T:
        """Run ``fn`` in a write transaction, committed on return; retried on contention.

        ``fn`` must only touch the database (it may run more than once).
        """
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                async with self._writer() as session, session.begin():
                    return await fn(session)
            except OperationalError as err:
                if attempt == WRITE_ATTEMPTS or not is_transient(err):
                    raise
                log.warning("database busy (attempt %d of %d), retrying: %s", attempt, WRITE_ATTEMPTS, err.orig)
            except IntegrityError as err:
                if attempt == WRITE_ATTEMPTS or not retry_on_conflict or not is_unique_violation(err):
                    raise
                log.info("concurrent insert won a unique constraint (attempt %d), retrying", attempt)
            await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random()))
        raise AssertionError("unreachable")


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_id(value: Any, what: str) -> int:
    """An integer id (not a bool, not a str from callback data)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return value


def check_user_id(user_id: Any) -> int:
    check_id(user_id, "user_id")
    if not 0 < user_id < 2**63:
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
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {short(value)}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
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
