"""/privacy says what is kept; /forget erases the user's searches and ratings."""

from __future__ import annotations

from telegram import Update
from telegram.ext import BaseHandler, CommandHandler

from bot import texts
from bot.context import FFContext


async def on_privacy(update: Update, context: FFContext) -> None:
    assert update.effective_user is not None and update.effective_message is not None
    summary = await context.services.db.user_summary(update.effective_user.id)
    await update.effective_message.reply_text(texts.PRIVACY.format(searches=summary.searches, ratings=summary.ratings))


async def on_forget(update: Update, context: FFContext) -> None:
    assert update.effective_user is not None and update.effective_message is not None
    svc, user_id = context.services, update.effective_user.id
    if user_id in svc.in_flight:  # its log line would land after the erase
        await update.effective_message.reply_text(texts.FORGET_WAIT)
        return
    summary = await svc.db.user_summary(user_id)
    if not summary.known:
        await update.effective_message.reply_text(texts.NOTHING_TO_FORGET)
        return
    await svc.db.forget_user(user_id)
    await update.effective_message.reply_text(texts.FORGOTTEN.format(searches=summary.searches, ratings=summary.ratings))


def handlers() -> list[BaseHandler]:
    return [CommandHandler("privacy", on_privacy), CommandHandler("forget", on_forget)]
