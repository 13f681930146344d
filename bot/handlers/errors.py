"""The Application's error handler: log with context, tell the admins (rate-limited), apologise.

Storage that cannot take a write now (down, restarting, its disk full) is no bug: the person
is told it could not be saved instead of "something went wrong", and no traceback is logged.
"""

from __future__ import annotations

import logging

from telegram import Update
from telegram.error import Forbidden, TelegramError
from telegram.ext import Application

from bot import texts
from bot.context import SERVICES, SETTINGS, FFContext
from bot.logs import RedactSecrets
from ffengine.db import StorageUnavailable

log = logging.getLogger(__name__)


def describe(update: object) -> str:
    """``update 17 (message) from user 5 in chat 5``: enough to find it in the log, nothing private."""
    if not isinstance(update, Update):
        return f"a {type(update).__name__}"
    kind = next((k for k in ("message", "edited_message", "callback_query", "channel_post") if getattr(update, k)), "update")
    parts = [f"update {update.update_id} ({kind})"]
    if update.effective_user:
        parts.append(f"from user {update.effective_user.id}")
    if update.effective_chat:
        parts.append(f"in chat {update.effective_chat.id}")
    return " ".join(parts)


async def on_error(update: object, context: FFContext) -> None:
    error = context.error
    where = describe(update)
    if isinstance(error, Forbidden):  # the user blocked the bot: nobody to apologise to, nothing to fix
        log.info("could not answer %s: %s", where, error.message)
        return
    storage_down = isinstance(error, StorageUnavailable)
    if storage_down:
        log.warning("storage unavailable while handling %s: %s", where, error)
    else:
        log.error("error while handling %s", where, exc_info=error)
    if isinstance(update, Update) and update.effective_chat is not None:
        try:
            reply = texts.STORAGE_DOWN if storage_down else texts.APOLOGY
            await context.bot.send_message(update.effective_chat.id, reply)
        except TelegramError as exc:
            log.warning("could not apologise to chat %s: %s", update.effective_chat.id, exc)
    await alert_admins(context.application, f"{type(error).__name__}: {error}", where)


async def alert_admins(app: Application, what: str, where: str) -> None:
    """At most one alert per interval; the next one says how many were held back."""
    settings = app.bot_data.get(SETTINGS)
    svc = app.bot_data.get(SERVICES)
    if settings is None or svc is None or not settings.admin_ids or not svc.error_alerts.allow():
        return
    held_back, svc.error_alerts.suppressed = svc.error_alerts.suppressed, 0
    scrub = RedactSecrets(settings.secrets()).scrub
    text = f"⚠️ {scrub(what)[:1500]}\nwhile handling {where}"
    if held_back:
        text += f"\n({held_back} more error(s) since the last alert; see the log)"
    for admin in settings.admin_ids:
        try:
            await app.bot.send_message(admin, text)
        except TelegramError as exc:
            log.warning("could not alert admin %s: %s", admin, exc)
