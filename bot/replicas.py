"""This replica among the others sharing the database: heartbeat, and following the live model.

Every ``BOT_SYNC_INTERVAL`` seconds a replica writes its heartbeat (the model version it
answers with) and compares its model with the database's active version, switching when they
differ. On PostgreSQL it also ``LISTEN`` s, so a switch is heard at once rather than at the
next tick; polling stays as the fallback (a dropped listening connection, SQLite). A version
that this replica cannot switch to (its files do not load, or the database refuses its products)
is told to the admins and logged once, with the reason, and not tried again until another version
is made active: the replica keeps answering with its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from bot.config import BotSettings
from bot.models import ModelSwitch, SwitchFailed
from ffengine.db import ACTIVE_VERSION_CHANNEL, Database, ReplicaRecord

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 600.0  # old update claims and heartbeats go this often
#: ``alert(what, where)``: tell the admins (``bot.handlers.errors.alert_admins``).
Alert = Callable[[str, str], Awaitable[None]]
FOLLOWING = "following the database's active model version"


class ReplicaSync:
    """The heartbeat-and-follow loop of one replica, and the PostgreSQL listener that wakes it."""

    def __init__(self, db: Database, models: ModelSwitch, settings: BotSettings, alert: Alert) -> None:
        self.db, self.models, self.settings, self.alert = db, models, settings, alert
        self.name = settings.replica_name
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pruned = float("-inf")

    async def start(self) -> None:
        """First heartbeat now (so /models lists this replica at once), then the loop in the background."""
        await self.beat()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run(), name="ff-replica-sync"))
        if self.db.is_postgres:
            self._tasks.append(loop.create_task(self._listen(), name="ff-replica-listen"))

    async def stop(self) -> None:
        """Stop the loop and take this replica off the list (its unfinished updates may be taken over)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.db.forget_replica(self.name)

    def poke(self, _payload: str = "") -> None:
        """Check the database now (a notification came, or the listener reconnected)."""
        self._wake.set()

    async def beat(self) -> None:
        """This replica's heartbeat: alive now, answering with the current model."""
        await self.db.heartbeat(self.name, self.models.current.version_id)

    async def alive(self, replica: str) -> bool:
        """Whether ``replica`` sent a heartbeat within ``BOT_SYNC_INTERVAL`` x 5 (a stopped one has none)."""
        seen = await self.db.replica_last_seen(replica)
        return seen is not None and datetime.now(UTC) - seen < timedelta(seconds=self.settings.replica_timeout_s)

    async def replicas(self) -> list[ReplicaRecord]:
        """The replicas alive now (this one included)."""
        return await self.db.list_replicas(timedelta(seconds=self.settings.replica_timeout_s))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.sync_interval_s)
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # the database may be down for a while: try again next tick
                log.warning("replica %s: heartbeat or model check failed", self.name, exc_info=True)

    async def tick(self) -> None:
        """Follow the active version, then say which one this replica serves."""
        await self._follow()
        await self.beat()
        now = asyncio.get_running_loop().time()
        if now - self._pruned >= PRUNE_EVERY_S:
            self._pruned = now
            await self.db.prune_replicas_and_updates()

    async def _follow(self) -> None:
        try:
            await self.models.follow(self.db)
        except Exception as exc:  # any failure to switch keeps the old model (a version that failed is not tried again)
            current = self.models.current.name
            shown = exc if isinstance(exc, SwitchFailed) else f"({exc})"  # the version's name, and why; or the database
            what = f"cannot load the active model version {shown}"
            log.error("replica %s %s; still answering with %s", self.name, what, current, exc_info=True)
            await self.alert(f"Replica {self.name} {what}; it keeps answering with {current}.", FOLLOWING)

    async def _listen(self) -> None:
        """Hold a ``LISTEN`` connection; reconnect (after an interval) whenever it is lost."""
        while True:
            try:
                async with self.db.listen(ACTIVE_VERSION_CHANNEL, self.poke) as lost:
                    self.poke()  # a change while it was not listening
                    await lost
                log.warning("replica %s: the LISTEN connection was lost; polling until it is back", self.name)
            except Exception as exc:  # the server is down or restarting
                log.warning("replica %s: cannot LISTEN for model switches (%s); polling meanwhile", self.name, exc)
            await asyncio.sleep(self.settings.sync_interval_s)
