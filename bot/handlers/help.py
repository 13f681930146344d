"""/start, /help, and the short hint for anything the bot does not understand.

The hint is also what a non-admin gets for an admin command: to them those commands
do not exist, so the answer must be the same as for any unknown command.
"""

from __future__ import annotations

from telegram import Update
from telegram.ext import BaseHandler, CommandHandler, MessageHandler, filters

from bot import texts
from bot.context import FFContext


async def on_help(update: Update, context: FFContext) -> None:
    assert update.effective_message is not None
    user = update.effective_user
    if user is not None:
        await context.services.db.touch_user(user.id, user.language_code)
    await update.effective_message.reply_text(texts.HELP)


async def on_anything_else(update: Update, context: FFContext) -> None:
    assert update.effective_message is not None
    await update.effective_message.reply_text(texts.HINT)


def handlers() -> list[BaseHandler]:
    return [CommandHandler(["start", "help"], on_help)]


def fallback() -> BaseHandler:
    """Registered last: new messages nothing else took (text, unknown commands, voice, ...)."""
    return MessageHandler(filters.UpdateType.MESSAGE & filters.ChatType.PRIVATE, on_anything_else)
