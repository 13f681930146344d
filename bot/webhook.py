"""Webhook mode: an aiohttp server that hands Telegram's POSTs to the Application.

As in PTB's ``customwebhookbot`` example, with public aiohttp APIs only. Telegram sends the
secret given to ``setWebhook`` in ``X-Telegram-Bot-Api-Secret-Token``; anything without it is
refused (403) before its body is read, so nobody but Telegram can inject updates. The header is
compared as the bytes that came (aiohttp keeps a byte that is not UTF-8 as a surrogate), so a
mangled one is refused like a wrong one. A body that
is not a Telegram update (not JSON, nested too deep to parse, the wrong shape) is refused with
400. ``GET /healthz`` reports the replica, its model version and queue depth for probes.

An update is answered once its handlers are done, not once it is queued: if this replica dies
while handling it, Telegram gets no answer and delivers it again (behind a load balancer, to
another replica, which takes it over: :mod:`bot.updates`). Handling goes through the
Application's update processor, so ``BOT_CONCURRENT_UPDATES`` still bounds it; stopping the
server waits for the updates it is handling.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from telegram import Update
from telegram.ext import Application

from bot.config import BotSettings

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: Updates are small JSON objects; anything bigger is not from Telegram.
MAX_UPDATE_BYTES = 1024 * 1024
#: Stopping waits this long for the updates being handled.
SHUTDOWN_TIMEOUT_S = 30.0


class WebhookServer:
    """Serves ``settings.webhook_path`` (updates) and ``/healthz`` on ``webhook_listen:webhook_port``."""

    Health = Callable[[], dict[str, Any]]

    def __init__(self, app: Application, settings: BotSettings, health: Health) -> None:
        self.app = app
        self.settings = settings
        self.health = health
        web_app = web.Application(client_max_size=MAX_UPDATE_BYTES)
        web_app.router.add_post(settings.webhook_path, self.on_update)
        web_app.router.add_get("/healthz", self.on_health)
        self._runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        self.port: int | None = None

    async def start(self) -> None:
        """Listen, then tell Telegram where to send updates (with the secret)."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.settings.webhook_listen, self.settings.webhook_port).start()
        except OSError:  # e.g. the port is taken: nothing may stay half-open
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]  # the real port when 0 was asked for
        log.info("webhook server listening on %s:%s%s", self.settings.webhook_listen, self.port, self.settings.webhook_path)
        await self.app.bot.set_webhook(
            url=self.settings.webhook_url,  # type: ignore[arg-type]
            secret_token=self.settings.webhook_secret,
            allowed_updates=Update.ALL_TYPES,
            max_connections=min(100, self.settings.concurrent_updates),
        )

    async def stop(self) -> None:
        """Stop listening and wait for the updates being handled. The webhook stays registered:
        Telegram queues updates until the next start (or another replica takes them)."""
        await self._runner.cleanup()

    async def on_update(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self.settings.webhook_secret.encode()):
            log.warning("webhook: refused a request without the right secret token from %s", request.remote)
            return web.json_response({"ok": False, "error": "forbidden"}, status=403)
        update = await self.read_update(request)
        if update is None:
            return web.json_response({"ok": False, "error": "not a Telegram update"}, status=400)
        await self.app.update_processor.process_update(update, self.app.process_update(update))
        return web.json_response({"ok": True})

    async def read_update(self, request: web.Request) -> Update | None:
        """The request's update, or ``None`` for anything that is not one."""
        try:
            data = await request.json()
        except (ValueError, RecursionError):  # bad JSON or UTF-8; nesting deeper than the parser's stack
            return None
        if not isinstance(data, dict) or not isinstance(data.get("update_id"), int):
            return None
        try:
            return Update.de_json(data, self.app.bot)
        except Exception:  # a malformed object of any shape must not reach the handlers
            return None

    async def on_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.health()})
