"""Start and stop the Application in the order PTB's ``run_polling`` uses, in polling or webhook mode.

One code path for ``python -m bot`` and for the tests (which run the real bot in-process):
initialize -> post_init -> receive updates -> start ... stop receiving -> stop (waits for
in-flight handlers) -> post_stop -> shutdown -> post_shutdown (drains the model queue,
closes the database). ``post_shutdown`` runs even when start-up failed half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from telegram import Update
from telegram.ext import Application

from bot.config import BotSettings
from bot.context import services
from bot.webhook import WebhookServer


@contextlib.asynccontextmanager
async def running(app: Application, settings: BotSettings) -> AsyncIterator[WebhookServer | None]:
    """Run ``app`` for the body of the ``async with``; yields the webhook server in webhook mode."""
    try:
        await app.initialize()
        if app.post_init:
            await app.post_init(app)
        webhook: WebhookServer | None = None
        if settings.mode == "webhook":
            webhook = WebhookServer(app, settings, services(app).health)
            await webhook.start()
        else:
            await app.updater.start_polling(allowed_updates=Update.ALL_TYPES)  # type: ignore[union-attr]
        await app.start()
        try:
            yield webhook
        finally:
            if webhook is not None:
                await webhook.stop()
            elif app.updater and app.updater.running:
                await app.updater.stop()
            await app.stop()
            if app.post_stop:
                await app.post_stop(app)
    finally:
        with contextlib.suppress(RuntimeError):  # not initialised when initialize() itself failed
            await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


async def serve_until_signal(app: Application, settings: BotSettings) -> None:
    """``python -m bot``: run until SIGINT/SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    async with running(app, settings):
        await stop.wait()
