"""Send five products as an album, uploading each catalogue photo only once.

The first time a product is shown its photo is uploaded (or, for an http(s) image, sent
by URL for Telegram to fetch); Telegram answers with a ``file_id`` that is stored and
sent instead from then on. A stale ``file_id`` or an unreachable URL must not cost the
user their answer: the album is retried with fresh uploads, then as plain text.

A local photo is read only if its path still leads where it did when the catalogue was
read and checked (:func:`ffengine.catalog.local_image_path`): a link swapped in since must
not turn any file on the machine into a "product photo" sent to a shopper.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from telegram import Bot, InputMediaPhoto, Message
from telegram.error import BadRequest

from bot.formatting import shorten
from ffengine.catalog import Product, local_image_path
from ffengine.db import Database
from ffengine.errors import ImageRejected
from ffengine.images import read_image_bytes
from ffengine.recommend import Recommendation

log = logging.getLogger(__name__)
MAX_TITLE = 200
MAX_ALBUM = 10  # Telegram's media-group limit
MAX_CAPTION = 1024  # Telegram's limits, in characters
MAX_MESSAGE = 4096


def format_price(product: Product) -> str | None:
    if product.price is None:
        return None
    amount = f"{product.price:,.2f}".removesuffix(".00")
    return f"{amount} {product.currency}" if product.currency else amount


def caption(rank: int, product: Product, room: int = MAX_CAPTION) -> str:
    """``1. Title`` / price (if known) / page link; plain text within ``room`` characters
    (a link too long to fit is left out rather than costing the photos or the answer)."""
    text = f"{rank}. {shorten(product.title, MAX_TITLE)}"
    if price := format_price(product):
        text += f"\n{price}"
    if product.url and len(text) + 1 + len(product.url) <= room:
        text += f"\n{product.url}"
    return text


@dataclass(frozen=True)
class _Item:
    product: Product
    rank: int
    media: InputMediaPhoto
    cached: bool  # sent by stored file_id


async def _photo_source(product: Product, file_id: str | None) -> str | bytes | None:
    if file_id:
        return file_id
    if product.is_remote:
        return product.image
    try:
        return await asyncio.to_thread(lambda: read_image_bytes(local_image_path(product.image)))
    except (OSError, ImageRejected) as exc:
        log.warning("product %s: cannot read its photo %s (%s)", product.id, product.image, exc)
        return None


async def _items(recs: Sequence[Recommendation], file_ids: dict[str, str]) -> list[_Item]:
    items = []
    for rank, rec in enumerate(recs[:MAX_ALBUM], start=1):
        cached_id = file_ids.get(rec.product.id)
        source = await _photo_source(rec.product, cached_id)
        if source is not None:
            media = InputMediaPhoto(source, caption=caption(rank, rec.product), filename=f"{rank}.jpg")
            items.append(_Item(rec.product, rank, media, cached=cached_id is not None))
    return items


async def _send(bot: Bot, chat_id: int, items: list[_Item]) -> list[Message]:
    if len(items) == 1:  # an album needs at least two
        return [await bot.send_photo(chat_id, items[0].media.media, caption=items[0].media.caption)]
    return list(await bot.send_media_group(chat_id, [i.media for i in items]))


async def send_album(
    bot: Bot, db: Database, chat_id: int, recs: Sequence[Recommendation], background: Callable[[Coroutine[Any, Any, None]], object]
) -> bool:
    """Send the products' photos with captions; returns False if only a text list could be sent.

    New ``file_id`` s are stored by ``background`` (:meth:`bot.context.BackgroundTasks.spawn`,
    which shutdown drains): the shopper's answer does not wait for those database writes.
    """
    file_ids = await db.get_photo_file_ids([r.product.id for r in recs])
    for attempt in ("stored", "fresh"):
        items = await _items(recs, file_ids)
        if not items:
            break
        try:
            messages = await _send(bot, chat_id, items)
        except BadRequest as exc:
            log.warning("album to chat %s failed with %s photos (%s); retrying", chat_id, attempt, exc.message)
            if attempt == "stored" and file_ids:
                file_ids = {}  # a stored file_id may be stale (another bot token, deleted file)
                continue
            break
        background(_remember(db, items, messages))
        return True
    room = MAX_MESSAGE // max(len(recs), 1) - 2  # each entry's share, less the blank line between them
    await bot.send_message(chat_id, "\n\n".join(caption(rank, r.product, room) for rank, r in enumerate(recs, start=1)))
    return False


async def _remember(db: Database, items: list[_Item], messages: list[Message]) -> None:
    for item, message in zip(items, messages, strict=False):
        if not item.cached and message.photo:
            try:
                await db.set_photo_file_id(item.product.id, message.photo[-1].file_id)
            except Exception:  # only a cache: the photo is uploaded again next time
                log.exception("could not store the file_id of product %s", item.product.id)
