"""👍 / 👎 presses: answered at once, stored once, shown with ✅.

Callback data comes from the network, so nothing in it is trusted: it must parse as
``r:<id>:<±1>`` and the database refuses a recommendation that is not the presser's own.
The keyboard is then redrawn from what the database holds, not from what was pressed
(its "more like this" and item buttons as they were).
A press the database cannot store now (down, restarting, its file gone) is still answered:
the shopper is asked to tap again, and the admins are told.
"""

from __future__ import annotations

import logging

from telegram import Message, Update
from telegram.error import BadRequest
from telegram.ext import BaseHandler, CallbackQueryHandler

from bot import texts
from bot.context import FFContext
from bot.handlers.buttons import look_up
from bot.keyboards import RATING_PREFIX, items_from_keyboard, offered_from_keyboard, parse_rating, rating_keyboard

log = logging.getLogger(__name__)


async def on_rating(update: Update, context: FFContext) -> None:
    db, query = context.services.db, update.callback_query
    assert query is not None
    result = await look_up(update, context, "ratings", parse_rating, lambda user, press: db.rate(user, press.recommendation_id, press.value))
    if result is None:
        return
    await query.answer(texts.RATED[result.value])
    message = query.message
    if not isinstance(message, Message):  # too old for Telegram to show us
        return
    items = items_from_keyboard(message.reply_markup)
    if not any(item.recommendation_id == result.recommendation_id for item in items):
        return  # pressed on a message this bot did not draw: nothing to redraw
    choices = await db.ratings_for_search(query.from_user.id, result.search_id)
    markup = rating_keyboard(items, choices, offered_from_keyboard(message.reply_markup))
    if message.reply_markup is not None and markup.to_dict() == message.reply_markup.to_dict():
        return
    try:
        await query.edit_message_reply_markup(markup)
    except BadRequest as exc:  # two quick presses: the other one already redrew it
        if "not modified" not in exc.message.lower():
            raise


async def on_unknown_button(update: Update, context: FFContext) -> None:
    """Buttons from older versions of the bot or forged data: say so, change nothing."""
    assert update.callback_query is not None
    await update.callback_query.answer(texts.EXPIRED, show_alert=True)


def handlers() -> list[BaseHandler]:
    return [
        CallbackQueryHandler(on_rating, pattern=f"^{RATING_PREFIX}"),
        CallbackQueryHandler(on_unknown_button),
    ]
