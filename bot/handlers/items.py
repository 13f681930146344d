"""Item and "more like this" buttons: a new search from an earlier one, answered like a photo.

A press carries ids only (:mod:`bot.keyboards`); the database looks the search or the
recommendation up for the presser alone, and foreign, erased or forged presses get the
rating buttons' answers (:mod:`bot.handlers.buttons`). A press is stale when the current
model cannot answer it: its catalogue lacks the item's category (the photo was searched by
another model version) or the product; it is checked when pressed and again on the model
thread (the model may be switched in between). The model work (the photo downloaded again by its
stored ``file_id`` and decoded in a worker thread, then its item's crop searched; or the
product's own features searched) waits in the batcher's queue and runs on its model thread,
one search per user at a time like a photo. Each press is logged as a search with its
origin, so its results can be rated too, and choosing an item is feedback for retraining.
The origin is checked again as it is logged: a /forget (on another replica) may have erased
it meanwhile, and then the shopper is told the button expired.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram import Bot, Update
from telegram.error import TelegramError
from telegram.ext import BaseHandler, CallbackQueryHandler

from bot import texts
from bot.batcher import QueueFull
from bot.context import BotServices, FFContext
from bot.formatting import shorten
from bot.handlers.buttons import look_up, refuse
from bot.handlers.search import Found, Refused, Upload, answer_search, fetch_image, log_refusal, log_search
from bot.keyboards import ITEM_PREFIX, MORE_PREFIX, item_label, offered_items, parse_item, parse_more
from bot.models import ActiveModel, Stale
from ffengine.db import FeedbackRefused, Origin, PressedItem, PressedRecommendation

log = logging.getLogger(__name__)
ITEMS, MORE = "item presses", "more-like-this presses"
MAX_NOTE_TITLE = 80
T = TypeVar("T")


async def on_item(update: Update, context: FFContext) -> None:
    svc, query = context.services, update.callback_query
    assert query is not None
    pressed = await look_up(update, context, ITEMS, parse_item, lambda user, press: svc.db.pressed_item(user, press.search_id, press.position))
    if pressed is None:
        return
    if pressed.file_id is None or pressed.item.category not in svc.models.current.categories:
        await refuse(query, ITEMS, "stale")  # logged before photos kept one, or searched by another catalogue
        return
    note = texts.ITEM_RESULTS.format(item=item_label(pressed.item.category))
    origin = Origin.item(pressed.search_id, pressed.item.position)
    await refine(update, context, origin, lambda started: _find_item(svc, context.bot, query.from_user.id, pressed, origin, started), note)


async def on_more(update: Update, context: FFContext) -> None:
    svc, query = context.services, update.callback_query
    assert query is not None
    pressed = await look_up(update, context, MORE, parse_more, svc.db.pressed_recommendation)
    if pressed is None:
        return
    product = svc.models.current.product(pressed.product_id)
    if product is None:
        await refuse(query, MORE, "stale")
        return
    note = texts.MORE_RESULTS.format(title=shorten(product.title, MAX_NOTE_TITLE))
    origin = Origin.more_like(pressed)
    await refine(update, context, origin, lambda started: _find_more(svc, query.from_user.id, pressed, origin, started), note)


async def refine(update: Update, context: FFContext, origin: Origin, find: Callable[[float], Awaitable[Found]], note: str) -> None:
    """Answer the press with a search of its own, one at a time per user like photos; a search
    that cannot be done is logged with its origin and explained in the chat."""
    query, svc = update.callback_query, context.services
    assert query is not None
    user_id = query.from_user.id
    chat_id = update.effective_chat.id if update.effective_chat else user_id  # a private chat's id is its user's
    if user_id in svc.in_flight:
        await query.answer(texts.ONE_AT_A_TIME, show_alert=True)
        return
    started = time.perf_counter()

    async def acknowledged() -> Found:
        try:
            await query.answer(texts.SEARCHING)
        except TelegramError as exc:  # too old to answer: the search is still worth doing
            log.debug("could not acknowledge a press of user %s: %s", user_id, exc)
        return await find(started)

    try:
        await answer_search(context, user_id, chat_id, acknowledged, note)
    except Refused as refused:
        await log_refusal(svc, user_id, None, started, refused.outcome, origin=origin)
        await context.bot.send_message(chat_id, refused.reply)
    except FeedbackRefused as exc:  # erased since it was pressed; the press was answered, so say it here
        log.info("a search from a press of user %s was not logged: %s", user_id, exc)
        await context.bot.send_message(chat_id, texts.EXPIRED)


async def on_model_thread(svc: BotServices, fn: Callable[[ActiveModel], T]) -> tuple[ActiveModel, T]:
    """``fn`` on the batcher's model thread; a full queue is "busy", a product or category the
    model no longer has (it was switched since the press was checked) is an expired button."""
    try:
        return await svc.batcher.run(fn)
    except QueueFull:
        raise Refused("busy", texts.BUSY) from None
    except Stale:
        raise Refused("expired", texts.EXPIRED) from None


async def _find_item(svc: BotServices, bot: Bot, user_id: int, pressed: PressedItem, origin: Origin, started: float) -> Found:
    """The photo again (Telegram keeps it; we do not), the item's crop searched, logged with its origin."""
    assert pressed.file_id is not None  # checked when pressed
    upload = Upload(pressed.file_id, pressed.file_unique_id or "", None)
    image = await fetch_image(svc, bot, upload)
    model, (features, recs) = await on_model_thread(svc, lambda m: m.search_item(image, pressed.item, svc.batcher.k))
    logging_done = log_search(svc, user_id, pressed.file_unique_id, model.version_id, features, recs, started, origin=origin)
    categories = [i.category for i in pressed.items]
    return Found(recs, logging_done, lambda _: offered_items(pressed.search_id, categories, pressed.item.category))


async def _find_more(svc: BotServices, user_id: int, pressed: PressedRecommendation, origin: Origin, started: float) -> Found:
    """The product's own features searched, logged with the recommendation it came from."""
    model, (features, recs) = await on_model_thread(svc, lambda m: m.more_like(pressed.product_id, svc.batcher.k))
    return Found(recs, log_search(svc, user_id, None, model.version_id, features, recs, started, origin=origin))


def handlers() -> list[BaseHandler]:
    return [
        CallbackQueryHandler(on_item, pattern=f"^{ITEM_PREFIX}"),
        CallbackQueryHandler(on_more, pattern=f"^{MORE_PREFIX}"),
    ]
