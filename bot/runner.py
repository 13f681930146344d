"""Run the Application as PTB documents for a program that owns its event loop.

``async with application`` (initialize ... shutdown), inside it our services
(:func:`bot.app.services`), then ``application.start()`` and the update source: PTB's
``Updater`` polling, or our webhook server as in PTB's ``customwebhookbot`` example. On the way
out the source stops first (the webhook server waits for the updates it is handling), then
``application.stop()`` (which waits for in-flight handlers), then the services drain and close.
One code path for ``python -m bot`` and for the tests, which run the real bot in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from telegram import Update
from telegram.ext import Application

from bot.app import services
from bot.config import BotSettings
from bot.webhook import WebhookServer


@contextlib.asynccontextmanager
async def running(app: Application, settings: BotSettings) -> AsyncIterator[WebhookServer | None]:
    """Run ``app`` for the body of the ``async with``; yields the webhook server in webhook mode."""
    async with app, services(app) as svc:
        await app.start()
        try:
            async with receiving(app, settings, svc.health) as webhook:
                yield webhook
        finally:
            await app.stop()


@contextlib.asynccontextmanager
async def receiving(app: Application, settings: BotSettings, health: WebhookServer.Health) -> AsyncIterator[WebhookServer | None]:
    """Updates flow in for the body: from our webhook server, or PTB's ``Updater`` polling."""
    if settings.mode == "webhook":
        webhook = WebhookServer(app, settings, health)
        await webhook.start()
        try:
            yield webhook
        finally:
            await webhook.stop()
        return
    assert app.updater is not None
    await app.updater.start_polling(allowed_updates=Update.ALL_TYPES)
    try:
        yield None
    finally:
        await app.updater.stop()


async def serve_until_signal(app: Application, settings: BotSettings) -> None:
    """``python -m bot``: run until SIGINT/SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    async with running(app, settings):
        await stop.wait()
