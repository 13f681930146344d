"""Admin commands: /stats, /models, /rollback, /reload, /retrain.

Registered with a ``filters.User`` of the configured admin ids, so for anyone else these
commands fall through to the generic hint, exactly like an unknown command.
"""

from __future__ import annotations

from telegram import Update
from telegram.ext import BaseHandler, CommandHandler, filters

from bot.context import BotServices, FFContext
from bot.formatting import format_replicas, format_stats, format_versions
from bot.retrain import ALREADY_RUNNING
from ffengine.errors import FFError


async def replicas_text(svc: BotServices, active: str | None) -> str:
    """Which replica answers, and which version each live replica serves (from their heartbeats)."""
    await svc.replicas.beat()  # this replica's own line is current
    return format_replicas(await svc.replicas.replicas(), svc.replicas.name, active)


async def on_stats(update: Update, context: FFContext) -> None:
    svc = context.services
    stats = await svc.db.stats()
    text = format_stats(stats, svc.health(), len(svc.models.current.index))
    await update.effective_message.reply_text(f"{text}\n\n{await replicas_text(svc, stats.active_model_version)}")  # type: ignore[union-attr]


async def on_models(update: Update, context: FFContext) -> None:
    svc = context.services
    versions = await svc.db.list_model_versions()
    active = next((v.name for v in versions if v.active), None)
    await update.effective_message.reply_text(f"{format_versions(versions)}\n\n{await replicas_text(svc, active)}")  # type: ignore[union-attr]


async def _switch(svc: BotServices, target: int | str | None) -> str:
    """/rollback activates a version for every replica (they follow the database); /reload re-reads
    the active one's files on the replica that answered."""
    try:
        model = await (svc.models.reload(svc.db) if target is None else svc.models.activate(svc.db, target))
    except FFError as exc:
        return f"❌ Nothing changed: {exc}"
    done = f"✅ Now answering with {model.name} ({len(model.index)} products)."
    if target is not None:
        return f"{done} The other replicas follow within seconds; /models shows them."
    return f"{done}\n\n{await replicas_text(svc, model.name)}"


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
        await message.reply_text(ALREADY_RUNNING)


def handlers(admin_ids: frozenset[int]) -> list[BaseHandler]:
    admins = filters.User(user_id=admin_ids)
    return [
        CommandHandler("stats", on_stats, filters=admins),
        CommandHandler("models", on_models, filters=admins),
        CommandHandler("rollback", on_rollback, filters=admins),
        CommandHandler("reload", on_reload, filters=admins),
        CommandHandler("retrain", on_retrain, filters=admins),
    ]
