"""Admin commands: /stats, /models, /rollback, /reload, /retrain.

Registered with a ``filters.User`` of the configured admin ids, so for anyone else these
commands fall through to the generic hint, exactly like an unknown command.
"""

from __future__ import annotations

from telegram import Update
from telegram.ext import BaseHandler, CommandHandler, filters

from bot.context import BotServices, FFContext
from bot.formatting import format_stats, format_versions
from ffengine.errors import FFError


async def on_stats(update: Update, context: FFContext) -> None:
    svc = context.services
    stats = await svc.db.stats()
    await update.effective_message.reply_text(format_stats(stats, svc.health(), len(svc.models.current.index)))  # type: ignore[union-attr]


async def on_models(update: Update, context: FFContext) -> None:
    versions = await context.services.db.list_model_versions()
    await update.effective_message.reply_text(format_versions(versions))  # type: ignore[union-attr]


async def _switch(svc: BotServices, target: int | str | None) -> str:
    try:
        model = await (svc.models.reload(svc.db) if target is None else svc.models.activate(svc.db, target))
    except FFError as exc:
        return f"❌ Nothing changed: {exc}"
    return f"✅ Now answering with {model.name} ({len(model.index)} products)."


async def on_rollback(update: Update, context: FFContext) -> None:
    message = update.effective_message
    assert message is not None
    if len(context.args or []) != 1:
        await message.reply_text("Usage: /rollback NAME (/models lists the versions)")
        return
    name = context.args[0]  # type: ignore[index]
    is_id = name.isascii() and name.isdigit()  # not "²": str.isdigit accepts digits int() refuses
    await message.reply_text(await _switch(context.services, int(name) if is_id else name))


async def on_reload(update: Update, context: FFContext) -> None:
    await update.effective_message.reply_text(await _switch(context.services, None))  # type: ignore[union-attr]


async def on_retrain(update: Update, context: FFContext) -> None:
    message = update.effective_message
    assert message is not None
    if not await context.services.retrainer.start(message.chat_id):
        await message.reply_text("⏳ A retraining is already running; I'll report when it is done.")


def handlers(admin_ids: frozenset[int]) -> list[BaseHandler]:
    admins = filters.User(user_id=admin_ids)
    return [
        CommandHandler("stats", on_stats, filters=admins),
        CommandHandler("models", on_models, filters=admins),
        CommandHandler("rollback", on_rollback, filters=admins),
        CommandHandler("reload", on_reload, filters=admins),
        CommandHandler("retrain", on_retrain, filters=admins),
    ]
