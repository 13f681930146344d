"""A photo (or an image file) in, five products and a rating keyboard out, with buttons for
the other garments the engine saw in the photo (:mod:`bot.handlers.items` answers those).

Bad input never reaches the model: a user sending photos faster than a person would is told
to slow down (:class:`~bot.limits.UserRate`), size is checked before downloading, the picture is
decoded on threads of its own (:class:`~bot.limits.DecodePool`) by
:func:`ffengine.images.load_image` (which refuses bombs and broken files), and every refusal
is answered with a friendly line and logged as a search with its outcome kind. The model work itself goes through the shared
:class:`~bot.batcher.SearchBatcher`; a full queue or a user who already has a search
running get an immediate "busy" / "one at a time" instead of waiting in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from telegram import Bot, Update
from telegram.constants import ChatAction
from telegram.error import BadRequest, TelegramError
from telegram.ext import BaseHandler, MessageHandler, filters

from bot import texts
from bot.album import send_album
from bot.batcher import QueueFull
from bot.context import BotServices, FFContext
from bot.keyboards import ItemButton, RatingItem, offered_items, rating_keyboard, without_links
from bot.limits import DecodeBusy
from ffengine.db import Erased, Origin, SearchRecord
from ffengine.errors import ImageRejected
from ffengine.images import mib
from ffengine.recommend import Recommendation

log = logging.getLogger(__name__)
CHAT_ACTION_EVERY_S = 4.0  # Telegram shows an action for about 5 s

NEW_MESSAGE = filters.UpdateType.MESSAGE
PHOTO = NEW_MESSAGE & filters.PHOTO
IMAGE_FILE = NEW_MESSAGE & filters.Document.IMAGE
OTHER_FILE = NEW_MESSAGE & filters.Document.ALL & ~filters.Document.IMAGE
STICKER = NEW_MESSAGE & filters.Sticker.ALL


class Refused(Exception):
    """A search that cannot go on; ``outcome`` is logged, ``reply`` is shown to the user."""

    def __init__(self, outcome: str, reply: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.reply = reply


@dataclass(frozen=True)
class Upload:
    """The picture a message carries, as Telegram describes it."""

    file_id: str
    file_unique_id: str
    file_size: int | None


@contextlib.asynccontextmanager
async def showing_upload(bot: Bot, chat_id: int) -> AsyncIterator[None]:
    """Keep "sending photo..." visible in the chat while the body runs (best effort)."""

    async def repeat() -> None:
        while True:
            try:
                await bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)
            except TelegramError as exc:  # cosmetic: never fail a search for it
                log.debug("chat action to %s failed: %s", chat_id, exc)
            await asyncio.sleep(CHAT_ACTION_EVERY_S)

    task = asyncio.create_task(repeat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def download(bot: Bot, upload: Upload, limit: int) -> bytes:
    """The file's bytes, or :class:`Refused` when Telegram will not hand it over."""
    too_large = Refused("too_large", texts.TOO_LARGE.format(limit=mib(limit)))
    if upload.file_size is not None and upload.file_size > limit:
        raise too_large
    try:
        tg_file = await bot.get_file(upload.file_id)
        if tg_file.file_size is not None and tg_file.file_size > limit:
            raise too_large
        data = await tg_file.download_as_bytearray()
    except TelegramError as exc:  # BadRequest "file is too big", a vanished file, a network failure
        if isinstance(exc, BadRequest) and "too big" in exc.message.lower():
            raise too_large from None
        log.warning("getFile/download failed for %s: %s", upload.file_unique_id, exc.message)
        raise Refused("download_failed", texts.DOWNLOAD_FAILED) from None
    if len(data) > limit:
        raise too_large
    return bytes(data)


Offer = Callable[[SearchRecord], list[ItemButton]]


def no_offer(record: SearchRecord) -> list[ItemButton]:
    return []


@dataclass(frozen=True)
class Found:
    """A search's answer while it is being logged, and the items to offer under it (they may
    need the logged search's id)."""

    recs: list[Recommendation]
    logging_done: asyncio.Task[SearchRecord]
    offer: Offer = no_offer


async def search_and_answer(update: Update, context: FFContext, upload: Upload, *, note: str | None = None) -> None:
    """The whole search for one picture; the user gets an answer whatever happens."""
    svc = context.services
    message, user = update.effective_message, update.effective_user
    assert message is not None and user is not None  # guaranteed by the filters
    if user.id in svc.in_flight:
        await message.reply_text(texts.ONE_AT_A_TIME)
        return
    if wait := svc.user_rate.wait_s(user.id):
        await message.reply_text(texts.SLOW_DOWN.format(seconds=math.ceil(wait)))
        return
    started = time.perf_counter()
    try:
        find = functools.partial(_find, svc, context.bot, user.id, upload, started, update.update_id)
        await answer_search(context, user.id, message.chat_id, find, note)
    except Refused as refused:
        await log_refusal(svc, user.id, upload.file_unique_id, started, refused.outcome, update_id=update.update_id)
        await message.reply_text(refused.reply)


async def answer_search(context: FFContext, user_id: int, chat_id: int, find: Callable[[], Awaitable[Found]], note: str | None) -> None:
    """``find`` while holding the user's one search slot (the caller saw it free), then the answer.

    The slot frees once the search is logged, not once the album is sent: the model work is
    over by then (a /forget waits for the whole update instead, :mod:`bot.turns`).
    :class:`Refused` is the caller's to answer.
    """
    svc = context.services
    svc.in_flight.add(user_id)
    async with showing_upload(context.bot, chat_id):
        try:
            found = await find()
        except BaseException:
            svc.in_flight.discard(user_id)
            raise
        found.logging_done.add_done_callback(lambda _: svc.in_flight.discard(user_id))
        await send_results(context, chat_id, found, note)


async def fetch_image(svc: BotServices, bot: Bot, upload: Upload) -> Image.Image:
    """Download and decode (on the decode threads, :class:`~bot.limits.DecodePool`) the picture, or :class:`Refused`."""
    data = await download(bot, upload, svc.settings.max_download_bytes)
    try:
        return await svc.decoder.decode(data, svc.settings.max_download_bytes)
    except DecodeBusy:
        raise Refused("busy", texts.BUSY) from None
    except ImageRejected as exc:
        raise Refused(exc.reason, texts.BAD_IMAGE.format(reason=exc)) from None


def log_search(
    svc: BotServices, user_id: int, file_unique_id: str | None, version_id: int, features: np.ndarray, recs: list[Recommendation], started: float, **extra: Any
) -> asyncio.Task[SearchRecord]:
    """Log an answered search (by model version ``version_id``) in a task of its own, so that the
    album is sent meanwhile; ``extra``: its ``file_id`` and ``items``, or its ``origin``."""
    results = [(r.product.id, r.distance) for r in recs]
    latency = (time.perf_counter() - started) * 1000
    outcome = "ok" if recs else "no_results"
    return asyncio.ensure_future(svc.db.record_search(user_id, file_unique_id, features, version_id, latency, outcome, results, **extra))


async def _find(svc: BotServices, bot: Bot, user_id: int, upload: Upload, started: float, update_id: int) -> Found:
    """Download, decode, embed and search (through the batcher); the search is logged by the returned task."""
    image = await fetch_image(svc, bot, upload)
    try:
        result = await svc.batcher.search(image)
    except QueueFull:
        raise Refused("busy", texts.BUSY) from None
    recs = result.recommendations
    logging_done = log_search(svc, user_id, upload.file_unique_id, result.model.version_id, result.features, recs, started, file_id=upload.file_id, items=result.items, update_id=update_id)
    categories, shown = [i.category for i in result.items], recs[0].product.category if recs else None
    return Found(recs, logging_done, lambda record: offered_items(record.search_id, categories, shown))


async def send_results(context: FFContext, chat_id: int, found: Found, note: str | None) -> None:
    """The album of products (sent while the search is being logged), then the rating keyboard
    (Telegram cannot attach one to an album; its buttons need the logged recommendation ids)."""
    recs = found.recs
    try:
        if note:
            await context.bot.send_message(chat_id, note)
        if recs:
            await send_album(context.bot, context.services.db, chat_id, recs, context.services.background.spawn)
    finally:
        record = await logged(found)  # never left behind, even when sending failed
    if record is None:
        return
    if not recs:
        await context.bot.send_message(chat_id, texts.NO_RESULTS)
        return
    items = [RatingItem(rank, rec_id, r.product.url) for rank, (rec_id, r) in enumerate(zip(record.recommendation_ids, recs, strict=True), 1)]
    await send_rating_keyboard(context.bot, chat_id, items, found.offer(record))


async def logged(found: Found) -> SearchRecord | None:
    """The logged search, or ``None`` when a /forget (on another replica) erased its user since its
    photo arrived: then it is not kept, and there are no rows for rating buttons."""
    try:
        return await found.logging_done
    except Erased as exc:
        log.info("%s", exc)
        return None


async def send_rating_keyboard(bot: Bot, chat_id: int, items: list[RatingItem], offered: Sequence[ItemButton] = ()) -> None:
    """The rating keyboard (and the ``offered`` items); sent again without link buttons if Telegram refuses it.

    Links are checked before they are drawn (:func:`ffengine.catalog.is_linkable_url`), but
    Telegram's rules for link buttons are its own: one refused link must not cost the
    shopper the rating buttons.
    """
    text = f"{texts.RESULTS}\n\n{texts.LOOKING_FOR.format(items=' · '.join(i.label for i in offered))}" if offered else texts.RESULTS
    try:
        await bot.send_message(chat_id, text, reply_markup=rating_keyboard(items, offered=offered))
    except BadRequest as exc:
        if all(item.url is None for item in items):
            raise
        log.warning("rating keyboard refused in chat %s (%s); sending it without links", chat_id, exc.message)
        await bot.send_message(chat_id, text, reply_markup=rating_keyboard(without_links(items), offered=offered))


async def log_refusal(
    svc: BotServices, user_id: int, file_unique_id: str | None, started: float, outcome: str, origin: Origin | None = None, update_id: int | None = None
) -> None:
    """Log a search that was refused (``outcome`` says why); not when its user was erased since it arrived."""
    latency = (time.perf_counter() - started) * 1000
    try:
        await svc.db.record_search(user_id, file_unique_id, None, None, latency, outcome, [], origin=origin, update_id=update_id)
    except Erased as exc:
        log.info("%s", exc)


async def on_photo(update: Update, context: FFContext) -> None:
    message = update.effective_message
    assert message is not None
    note = None
    if message.media_group_id:
        if not context.services.albums.first(message.media_group_id):
            return  # the album's first photo answers for all of it
        note = texts.ALBUM
    photo = message.photo[-1]  # the largest size
    await search_and_answer(update, context, Upload(photo.file_id, photo.file_unique_id, photo.file_size), note=note)


async def on_image_file(update: Update, context: FFContext) -> None:
    doc = update.effective_message.document  # type: ignore[union-attr]
    assert doc is not None
    await search_and_answer(update, context, Upload(doc.file_id, doc.file_unique_id, doc.file_size))


async def _refuse(update: Update, context: FFContext, file_unique_id: str | None, outcome: str, reply: str) -> None:
    user = update.effective_user
    assert user is not None and update.effective_message is not None
    await log_refusal(context.services, user.id, file_unique_id, time.perf_counter(), outcome)
    await update.effective_message.reply_text(reply)


async def on_other_file(update: Update, context: FFContext) -> None:
    doc = update.effective_message.document  # type: ignore[union-attr]
    await _refuse(update, context, doc.file_unique_id if doc else None, "not_image", texts.NOT_IMAGE_FILE)


async def on_sticker(update: Update, context: FFContext) -> None:
    sticker = update.effective_message.sticker  # type: ignore[union-attr]
    await _refuse(update, context, sticker.file_unique_id if sticker else None, "sticker", texts.STICKER)


def handlers() -> list[BaseHandler]:
    return [
        MessageHandler(PHOTO, on_photo),
        MessageHandler(IMAGE_FILE, on_image_file),
        MessageHandler(OTHER_FILE, on_other_file),
        MessageHandler(STICKER, on_sticker),
    ]
