"""Shared services, kept in ``bot_data`` and reached through a typed context (``context.services``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telegram.ext import Application, CallbackContext, ExtBot

from bot.batcher import SearchBatcher
from bot.config import BotSettings
from bot.models import ActiveModel, ModelSwitch
from ffengine.db import Database

if TYPE_CHECKING:
    from bot.retrain import Retrainer

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


@dataclass
class BotServices:
    """Everything handlers share: storage, the current model, the search queue, per-user state."""

    settings: BotSettings
    db: Database
    models: ModelSwitch
    batcher: SearchBatcher[ActiveModel]
    retrainer: Retrainer
    in_flight: set[int] = field(default_factory=set)  # users with a search running
    albums: RecentKeys = field(default_factory=RecentKeys)
    error_alerts: Throttle = field(default_factory=lambda: Throttle(60.0))

    def health(self) -> dict[str, Any]:
        return {
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
