"""What several processes on one PostgreSQL coordinate through: a lock and a notification channel.

Both live on a dedicated connection in autocommit mode (never a transaction left open for
minutes): a session-level advisory lock is held as long as that connection lives, so a
process that dies (crash, ``kill -9``) frees it with its connection; ``LISTEN`` hears the
notifications :data:`ACTIVE_VERSION_CHANNEL` carries while the connection lives. SQLite has
neither: callers fall back to a file lock and to polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ffengine.db.store import Store, unreachable_as_unavailable

log = logging.getLogger(__name__)

#: ``NOTIFY`` channel: the active model version changed (payload: its id).
ACTIVE_VERSION_CHANNEL = "ff_active_model_version"


class Coordination(Store):
    @property
    def is_postgres(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    @contextlib.asynccontextmanager
    async def _dedicated(self) -> AsyncIterator[AsyncConnection]:
        """A connection of its own in autocommit mode, for as long as the block runs."""
        with unreachable_as_unavailable():
            async with self._engine.connect() as conn:
                yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[bool]:
        """PostgreSQL only: try the session-level advisory lock ``key`` and hold it for the block;
        yields whether it was taken (never waits)."""
        if not self.is_postgres:
            raise NotImplementedError("advisory locks need PostgreSQL")
        async with self._dedicated() as conn:
            taken = bool(await conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
            try:
                yield taken
            finally:
                if taken:
                    await _unlock(conn, key)

    @contextlib.asynccontextmanager
    async def listen(self, channel: str, on_notify: Callable[[str], None]) -> AsyncIterator[asyncio.Future[None]]:
        """PostgreSQL only: ``LISTEN`` on ``channel`` (asyncpg's ``add_listener``) for the block, calling
        ``on_notify(payload)`` on this loop. Yields a future that completes when the connection is lost."""
        if not self.is_postgres:
            raise NotImplementedError("LISTEN needs PostgreSQL")
        async with self._dedicated() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            raw.add_termination_listener(lambda _conn: lost.done() or lost.set_result(None))

            def listener(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                on_notify(payload)

            await raw.add_listener(channel, listener)
            try:
                yield lost
            finally:
                if not raw.is_closed():
                    with contextlib.suppress(Exception):
                        await raw.remove_listener(channel, listener)


async def _unlock(conn: AsyncConnection, key: int) -> None:
    """Release the lock, or drop the connection (which releases it) when that fails."""
    try:
        await conn.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    except Exception:  # the connection is gone or broken: so is the lock
        log.warning("could not release advisory lock %s; dropping its connection", key, exc_info=True)
        with contextlib.suppress(Exception):
            await conn.invalidate()
