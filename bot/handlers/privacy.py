"""/privacy says what is kept; /forget erases the user's searches and ratings.

A /forget runs alone among its user's updates (:mod:`bot.turns`): it waits for those received
before it (a search still being answered and logged, a rating, a "more like this") so that
"erased" is true when it is said, and those received after it wait for it. If the earlier ones
are still running after :data:`EARLIER_WAIT_S`, nothing is erased and the user is asked to
send /forget again.
"""

from __future__ import annotations

from telegram import Update
from telegram.ext import BaseHandler, CommandHandler

from bot import texts
from bot.context import FFContext

#: How long a /forget waits for the user's earlier updates (a search waiting in a full queue, its album).
EARLIER_WAIT_S = 60.0


async def on_privacy(update: Update, context: FFContext) -> None:
    assert update.effective_user is not None and update.effective_message is not None
    summary = await context.services.db.user_summary(update.effective_user.id)
    await update.effective_message.reply_text(texts.PRIVACY.format(searches=summary.searches, ratings=summary.ratings))


async def on_forget(update: Update, context: FFContext) -> None:
    assert update.effective_user is not None and update.effective_message is not None
    svc, user_id = context.services, update.effective_user.id
    if not await svc.turns.wait(user_id, update.update_id, EARLIER_WAIT_S):  # their writes would land after the erase
        await update.effective_message.reply_text(texts.FORGET_WAIT)
        return
    summary = await svc.db.user_summary(user_id)
    # erased (and noted) even when nothing is kept yet: a search of an earlier update on another replica is refused
    await svc.db.forget_user(user_id, update_id=update.update_id)
    if not summary.known:
        await update.effective_message.reply_text(texts.NOTHING_TO_FORGET)
        return
    await update.effective_message.reply_text(texts.FORGOTTEN.format(searches=summary.searches, ratings=summary.ratings))


FORGET = CommandHandler("forget", on_forget)


def erases(update: Update) -> bool:
    """Whether ``update`` is a /forget: :mod:`bot.updates` runs it alone among its user's updates."""
    return bool(FORGET.check_update(update))


def handlers() -> list[BaseHandler]:
    return [CommandHandler("privacy", on_privacy), FORGET]
