"""``build_application(settings)`` and :func:`services`: the python-telegram-bot Application and what it serves with.

The Application is run as PTB documents for a program that owns its event loop (see
:mod:`bot.runner`): ``async with application`` around start and stop. :func:`services` is
entered inside it: it opens the database, closes a /retrain a killed bot left open (and says so
in its status message), prepares what a first run lacks, loads the active model, starts the
search batcher and this replica's heartbeat, and publishes the command menus; on the way out
(after PTB has waited for in-flight handlers) it stops a running /retrain, drains the batcher
and the handlers' background tasks and closes the database, so nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from telegram import BotCommand, BotCommandScopeChat, BotCommandScopeDefault
from telegram.error import TelegramError
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, ContextTypes

from bot import texts, updates
from bot.batcher import SearchBatcher
from bot.bootstrap import prepare
from bot.config import BotSettings
from bot.context import SERVICES, SETTINGS, BotServices, FFContext, Throttle
from bot.handlers import admin, errors, help, items, privacy, rating, search
from bot.limits import DecodePool, UserRate
from bot.models import ActiveModel, ModelLoader, ModelSwitch
from bot.replicas import ReplicaSync
from bot.retrain import Retrainer, report_interrupted
from ffengine.cli import package_version
from ffengine.config import shown_url
from ffengine.db import Database
from train.runs import recover_interrupted

log = logging.getLogger(__name__)


def build_application(settings: BotSettings) -> Application:
    """The bot, not yet running (see :mod:`bot.runner`); nothing touches the network or disk here.

    In webhook mode it has no ``Updater``: :class:`bot.webhook.WebhookServer` receives the updates.
    """
    builder = (
        ApplicationBuilder()
        .token(settings.token)
        .base_url(settings.api_base_url)
        .base_file_url(settings.file_base_url)
        .context_types(ContextTypes(context=FFContext))
        .concurrent_updates(settings.concurrent_updates)
        .rate_limiter(AIORateLimiter(overall_max_rate=settings.rate_limit, max_retries=settings.max_retries))
    )
    app = (builder.updater(None) if settings.mode == "webhook" else builder).build()
    app.bot_data[SETTINGS] = settings
    app.add_handlers(updates.handlers())
    app.add_handlers(admin.handlers(settings.admin_ids))
    app.add_handlers([*help.handlers(), *privacy.handlers(), *search.handlers(), *items.handlers(), *rating.handlers(), help.fallback()])
    app.add_error_handler(errors.on_error)
    return app


@contextlib.asynccontextmanager
async def services(app: Application) -> AsyncIterator[BotServices]:
    """What the handlers share, for the body of the ``async with`` (entered after ``app.initialize``)."""
    svc = await open_services(app)
    app.bot_data[SERVICES] = svc
    try:
        await svc.replicas.start()
        for line in startup_lines(svc.settings, svc.models.current):
            log.info("%s", line)
        await publish_commands(app, svc.settings.admin_ids)
        yield svc
    finally:
        await close_services(app.bot_data.pop(SERVICES))


async def open_services(app: Application) -> BotServices:
    """Database, active model and search batcher; the database is closed again if any step fails."""
    settings: BotSettings = app.bot_data[SETTINGS]
    db = await Database.open(settings.database_url)
    try:
        await report_interrupted(app, await recover_interrupted(db, settings.engine))
        loader = ModelLoader(settings.engine.device, settings.engine.runtime)
        await prepare(settings, db, loader)
        models = await ModelSwitch.open(db, loader)
        await db.upsert_products(models.current.index.products)
    except BaseException:
        await db.close()
        raise
    batcher = SearchBatcher(
        lambda: models.current,
        max_queue=settings.queue_size,
        max_batch=settings.batch_size,
        max_wait_s=settings.batch_wait_ms / 1000,
    )
    batcher.start()
    return BotServices(
        settings=settings,
        db=db,
        models=models,
        batcher=batcher,
        retrainer=Retrainer(app, db, models, settings),
        replicas=ReplicaSync(db, models, settings, lambda what, where: errors.alert_admins(app, what, where)),
        decoder=DecodePool(settings.decode_threads, max_waiting=settings.queue_size),
        user_rate=UserRate(settings.user_searches_per_minute, settings.user_search_burst),
        error_alerts=Throttle(settings.error_notify_interval_s),
    )


async def close_services(svc: BotServices) -> None:
    """Updates have stopped and in-flight handlers are done; the bot can still send (the /retrain report)."""
    await svc.retrainer.stop()
    await svc.replicas.stop()
    await svc.batcher.close()
    await svc.decoder.close()
    await svc.background.drain()  # their database writes, before the database closes
    await svc.db.close()
    log.info("stopped: searches drained, database closed")


def startup_lines(settings: BotSettings, model: ActiveModel) -> list[str]:
    """What a person checks first when the bot starts: which release, mode, database and data folder
    (paths resolved, the password hidden), then which model answers and from which files."""
    mode = settings.mode if settings.mode == "polling" else f"webhook {settings.webhook_url} (listening on {settings.webhook_listen}:{settings.webhook_port})"
    index_dir = Path(model.index.path).resolve() if model.index.path else "in memory"
    return [
        f"FocusedFashion {package_version()}, {mode}; database {shown_url(settings.database_url)}; data folder {settings.engine.data_dir.resolve()}; replica {settings.replica_name}",
        f"ready: model {model.name}, {len(model.index)} products (index {index_dir}; weights {model.embedder.source}, "
        f"{model.embedder.runtime} on {model.embedder.device}); admins {', '.join(map(str, sorted(settings.admin_ids))) or 'none'}",
    ]


def _commands(names: dict[str, str]) -> list[BotCommand]:
    return [BotCommand(name, description) for name, description in names.items()]


async def publish_commands(app: Application, admin_ids: frozenset[int]) -> None:
    """Everyone's menu lists the shopper commands; each admin's own chat also lists the admin ones."""
    await app.bot.set_my_commands(_commands(texts.USER_COMMANDS), scope=BotCommandScopeDefault())
    for admin_id in sorted(admin_ids):
        try:
            await app.bot.set_my_commands(
                _commands({**texts.USER_COMMANDS, **texts.ADMIN_COMMANDS}), scope=BotCommandScopeChat(admin_id)
            )
        except TelegramError as exc:  # the admin has not opened a chat with the bot yet
            log.warning("admin menu for %s not set (%s); it appears after they message the bot and it restarts", admin_id, exc)
