"""What every button press gets when it cannot be followed: the same answers for every kind.

Callback data comes from the network: a malformed one, a row that is gone (erased, or from
an older model) and someone else's search are all answered with an alert and change nothing.
A press the database cannot look up now is answered too, and the admins are told.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram import CallbackQuery, Update

from bot import texts
from bot.context import FFContext
from bot.handlers.errors import alert_admins, describe
from ffengine.db import FeedbackRefused, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
P = TypeVar("P")


async def refuse(query: CallbackQuery, what: str, reason: str) -> None:
    """An alert for a press that cannot be followed (``what``: the kind of press, plural, as in
    ``"ratings"``; ``reason``: ``not_yours`` or anything else)."""
    log.info("%s refused for user %s: %s", what, query.from_user.id, reason)
    await query.answer(texts.NOT_YOURS if reason == "not_yours" else texts.EXPIRED, show_alert=True)


async def checked(update: Update, context: FFContext, what: str, lookup: Awaitable[T]) -> T | None:
    """The database's answer to a press, or ``None`` once the presser has been told why not."""
    query = update.callback_query
    assert query is not None
    try:
        return await lookup
    except FeedbackRefused as exc:
        await refuse(query, what, exc.reason)
    except StorageUnavailable as exc:
        log.warning("%s of user %s not done: %s", what, query.from_user.id, exc)
        await query.answer(texts.NOT_SAVED, show_alert=True)
        await alert_admins(context.application, f"{what.capitalize()} are not being saved: {exc}", describe(update))
    return None


async def look_up(
    update: Update, context: FFContext, what: str, parse: Callable[[str | None], P | None], lookup: Callable[[int, P], Awaitable[T]]
) -> T | None:
    """Parse the press's callback data, then ask the database about it for the presser
    (``lookup(user_id, parsed)``): its answer, or ``None`` once the presser has been told why not."""
    query = update.callback_query
    assert query is not None
    press = parse(query.data)
    if press is None:
        await refuse(query, what, "malformed")
        return None
    return await checked(update, context, what, lookup(query.from_user.id, press))
