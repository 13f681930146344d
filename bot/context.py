"""Shared services, kept in ``bot_data`` and reached through a typed context (``context.services``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telegram.ext import Application, CallbackContext, ExtBot

from bot.batcher import SearchBatcher
from bot.config import BotSettings
from bot.limits import DecodePool, UserRate
from bot.models import ActiveModel, ModelSwitch
from bot.replicas import ReplicaSync
from bot.turns import UserTurns
from ffengine.db import Database

if TYPE_CHECKING:
    from bot.retrain import Retrainer

log = logging.getLogger(__name__)
SERVICES = "services"
SETTINGS = "settings"


class RecentKeys:
    """A bounded "seen recently" set (media-group ids): ``first(key)`` is True once per key."""

    def __init__(self, limit: int = 2048) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def first(self, key: str) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return True


class Throttle:
    """At most one event per ``interval`` seconds; counts what it held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = float("-inf")
        self.suppressed = 0

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last >= self.interval:
            self._last = now
            return True
        self.suppressed += 1
        return False


class BackgroundTasks:
    """Work a handler starts but does not wait for (storing an album's photo ``file_id`` s).

    Not ``Application.create_task``: PTB only tracks tasks created while the application is
    running, and a search still being answered during ``Application.stop`` (which waits for it)
    would get an untracked task and a ``PTBUserWarning``, its database write racing the
    database closing. These tasks are tracked whenever they start and drained at shutdown,
    before the database closes.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for every task (and any they start); cancel what is still running after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while running := {task for task in self._tasks if not task.done()}:
            _, pending = await asyncio.wait(running, timeout=max(0.0, deadline - loop.time()))
            if pending:
                log.warning("shutdown: cancelling %d background task(s) still running after %.0f s", len(pending), timeout)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return


@dataclass
class BotServices:
    """Everything handlers share: storage, the current model, the search queue, per-user state."""

    settings: BotSettings
    db: Database
    models: ModelSwitch
    batcher: SearchBatcher[ActiveModel]
    retrainer: Retrainer
    replicas: ReplicaSync
    decoder: DecodePool
    user_rate: UserRate
    in_flight: set[int] = field(default_factory=set)  # users with a search running
    handling: set[int] = field(default_factory=set)  # update ids this process claimed (bot.updates)
    turns: UserTurns = field(default_factory=UserTurns)  # each user's updates, in the order received (bot.turns)
    albums: RecentKeys = field(default_factory=RecentKeys)
    background: BackgroundTasks = field(default_factory=BackgroundTasks)
    error_alerts: Throttle = field(default_factory=lambda: Throttle(60.0))

    def health(self) -> dict[str, Any]:
        return {
            "replica": self.replicas.name,
            "model_version": self.models.current.name,
            "queue_depth": self.batcher.depth,
            "searches_in_flight": len(self.in_flight),
            "retraining": self.retrainer.running,
        }


class FFContext(CallbackContext[ExtBot, dict, dict, dict]):
    """``CallbackContext`` with typed access to :class:`BotServices`."""

    @property
    def services(self) -> BotServices:
        return services(self.application)


def services(app: Application) -> BotServices:
    return app.bot_data[SERVICES]
