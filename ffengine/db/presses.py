"""Items seen in a photo, and the buttons that start a search from an earlier one.

An item button carries a search id and an item's place, a "more like this" button a
recommendation id: both arrive from the network, so each press is looked up here *for the
presser*, refused (:class:`FeedbackRefused`) when the row is gone or someone else's, or when
no row can have its id (:func:`pressed_key`: a forged one, too big for its column), and
the search it starts is logged with its origin. Choosing an item is feedback too: products
of that item's category shown by the photo search count as liked (:func:`implied_likes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any, Protocol

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from ffengine.db import models as m
from ffengine.db.errors import FeedbackRefused
from ffengine.db.records import Origin, PressedItem, PressedRecommendation, StoredItem
from ffengine.db.store import Store, check_finite, check_id, check_text, check_user_id, column_max

MAX_ITEMS = 16  # far more than a keyboard row shows
BOX_MAX = column_max(m.SearchItem.box_left)


class ItemLike(Protocol):
    """What a photo search logs of each item (``ffengine.items.Item`` is one)."""

    @property
    def category(self) -> str: ...
    @property
    def probability(self) -> float: ...
    @property
    def box(self) -> tuple[int, int, int, int]: ...


def item_rows(items: Sequence[ItemLike]) -> list[dict[str, Any]]:
    """Checked column values of ``items``, in the order given (position 0 first)."""
    if len(items) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} items per search, got {len(items)}")
    return [item_row(position, item) for position, item in enumerate(items)]


def item_row(position: int, item: ItemLike) -> dict[str, Any]:
    box = tuple(item.box)
    if len(box) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) and 0 <= v <= BOX_MAX for v in box):
        raise ValueError(f"an item's box is 4 pixel coordinates >= 0, got {item.box!r}")
    left, top, right, bottom = (int(v) for v in box)  # numpy integers too
    if right <= left or bottom <= top:
        raise ValueError(f"an item's box must have an area, got {item.box!r}")
    probability = check_finite(item.probability, "item probability", minimum=0.0)
    if probability > 1:
        raise ValueError(f"item probability must be at most 1, got {probability}")
    return {
        "position": position,
        "category": check_text(item.category, "item category", m.CATEGORY_MAX),
        "probability": probability,
        "box_left": left,
        "box_top": top,
        "box_right": right,
        "box_bottom": bottom,
    }


def pressed_key(value: Any, column: InstrumentedAttribute[int], what: str) -> int:
    """An id (or an item's place) a button press carried, refused like a row that is gone when no
    row of ``column`` can have it: checked here, once, because PostgreSQL's driver cannot even
    send a value its column type cannot hold (it raises instead of finding nothing)."""
    check_id(value, what)
    if not 0 <= value <= column_max(column):
        raise FeedbackRefused(f"no {what} can be {value}", reason="not_found")
    return value


def check_origin(origin: Origin) -> None:
    check_id(origin.parent_search_id, "parent_search_id")
    source = origin.item_index if origin.kind == "item" else origin.source_recommendation_id
    if origin.kind not in ("item", "more_like") or source is None:
        raise ValueError(f"not a search origin: {origin!r}")
    check_id(source, "origin source")


async def owned_search(session: AsyncSession, user_id: int, search_id: int) -> m.Search:
    """The user's own search, or :class:`FeedbackRefused` (``not_found`` / ``not_yours``)."""
    search = await session.get(m.Search, search_id)
    if search is None:
        raise FeedbackRefused("this search no longer exists", reason="not_found")
    if search.user_id != user_id:
        raise FeedbackRefused("you can only use buttons of your own searches", reason="not_yours")
    return search


async def owned_recommendation(session: AsyncSession, user_id: int, recommendation_id: int) -> PressedRecommendation:
    """A recommendation shown to the user, or :class:`FeedbackRefused` (``not_found`` / ``not_yours``)."""
    found = (
        await session.execute(
            select(m.Recommendation.search_id, m.Recommendation.product_id, m.Search.user_id)
            .join(m.Search, m.Search.id == m.Recommendation.search_id)
            .where(m.Recommendation.id == recommendation_id)
        )
    ).one_or_none()
    if found is None:
        raise FeedbackRefused("this recommendation no longer exists", reason="not_found")
    search_id, product_id, owner = found
    if owner != user_id:
        raise FeedbackRefused("you can only use buttons of recommendations made for you", reason="not_yours")
    return PressedRecommendation(recommendation_id, search_id, product_id)


async def stored_items(session: AsyncSession, search_id: int) -> list[StoredItem]:
    rows = await session.scalars(select(m.SearchItem).where(m.SearchItem.search_id == search_id).order_by(m.SearchItem.position))
    return [
        StoredItem(r.position, r.category, r.probability, (r.box_left, r.box_top, r.box_right, r.box_bottom)) for r in rows
    ]


async def add_origin(session: AsyncSession, search_id: int, user_id: int, origin: Origin) -> None:
    """Log where ``search_id`` came from, once the press it came from is checked again (the
    parent may have been erased by /forget since the press was looked up)."""
    await owned_search(session, user_id, origin.parent_search_id)
    if origin.kind == "item":
        if await session.get(m.SearchItem, (origin.parent_search_id, origin.item_index)) is None:
            raise FeedbackRefused("this item no longer exists", reason="not_found")
    else:
        pressed = await owned_recommendation(session, user_id, origin.source_recommendation_id)  # type: ignore[arg-type]
        if pressed.search_id != origin.parent_search_id:
            raise FeedbackRefused("this recommendation answered another search", reason="not_found")
    session.add(
        m.SearchOrigin(
            search_id=search_id,
            kind=origin.kind,
            parent_search_id=origin.parent_search_id,
            item_index=origin.item_index,
            source_recommendation_id=origin.source_recommendation_id,
        )
    )


def implied_likes() -> Select[tuple[int]]:
    """Ids of recommendations liked by choice: the shopper pressed an item of the photo search
    that showed them, and the product's category is that item's. Correlates with an outer
    ``searches`` row when one is in scope; otherwise filter it on ``Recommendation.search_id``."""
    return (
        select(m.Recommendation.id)
        .join(
            m.SearchOrigin,
            (m.SearchOrigin.parent_search_id == m.Recommendation.search_id) & (m.SearchOrigin.kind == "item"),
        )
        .join(
            m.SearchItem,
            (m.SearchItem.search_id == m.SearchOrigin.parent_search_id) & (m.SearchItem.position == m.SearchOrigin.item_index),
        )
        .join(m.Product, (m.Product.id == m.Recommendation.product_id) & (m.Product.category == m.SearchItem.category))
    )


class PressLog(Store):
    async def pressed_item(self, user_id: int, search_id: int, position: int) -> PressedItem:
        """The item ``position`` of the user's own photo search ``search_id``.

        Refused (:class:`FeedbackRefused`) when the search or item does not exist, or the
        search is someone else's.
        """
        check_user_id(user_id)
        pressed_key(search_id, m.Search.id, "search_id")
        pressed_key(position, m.SearchItem.position, "item position")

        async def read(session: AsyncSession) -> PressedItem:
            search = await owned_search(session, user_id, search_id)
            items = await stored_items(session, search_id)
            item = next((i for i in items if i.position == position), None)
            if item is None:
                raise FeedbackRefused("this item no longer exists", reason="not_found")
            return PressedItem(search_id, item, items, search.file_id, search.file_unique_id, search.model_version_id)

        return await self._read(read)

    async def pressed_recommendation(self, user_id: int, recommendation_id: int) -> PressedRecommendation:
        """A recommendation shown to the user (for "more like this"); refused like :meth:`pressed_item`."""
        check_user_id(user_id)
        pressed_key(recommendation_id, m.Recommendation.id, "recommendation_id")

        async def read(session: AsyncSession) -> PressedRecommendation:
            return await owned_recommendation(session, user_id, recommendation_id)

        return await self._read(read)
