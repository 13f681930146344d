"""The rating keyboard: pure functions from data to buttons and back (no Telegram I/O).

Callback data is ``r:<recommendation_id>:<+1|-1>``. It arrives from the network, so
:func:`parse_rating` accepts only that exact shape, and the database then checks that
the recommendation belongs to the presser's own search before anything is stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from ffengine.catalog import is_linkable_url

RATING_PREFIX = "r:"
_RATING_RE = re.compile(r"r:([1-9][0-9]{0,17}):([+-]1)")
LIKE, DISLIKE = 1, -1
CHOSEN = "✅"


@dataclass(frozen=True)
class RatingItem:
    """One keyboard row: the product's place in the answer, its stored recommendation, its page."""

    rank: int
    recommendation_id: int
    url: str | None


@dataclass(frozen=True)
class RatingPress:
    recommendation_id: int
    value: int


def rating_data(recommendation_id: int, value: int) -> str:
    return f"{RATING_PREFIX}{recommendation_id}:{value:+d}"


def parse_rating(data: str | None) -> RatingPress | None:
    """``"r:17:+1"`` -> ``RatingPress(17, 1)``; anything else -> ``None``."""
    match = _RATING_RE.fullmatch(data or "")
    if match is None:
        return None
    return RatingPress(int(match.group(1)), int(match.group(2)))


def rating_keyboard(items: Sequence[RatingItem], choices: Mapping[int, int] | None = None) -> InlineKeyboardMarkup:
    """One row per product: ``n 👍``, ``n 👎`` (✅ marks the stored choice) and a link to its page
    when it has one Telegram accepts (a refused link button would fail the whole keyboard)."""
    choices = choices or {}
    rows = []
    for item in items:
        chosen = choices.get(item.recommendation_id, 0)
        row = [
            InlineKeyboardButton(f"{CHOSEN if chosen == LIKE else ''}{item.rank} 👍", callback_data=rating_data(item.recommendation_id, LIKE)),
            InlineKeyboardButton(f"{CHOSEN if chosen == DISLIKE else ''}{item.rank} 👎", callback_data=rating_data(item.recommendation_id, DISLIKE)),
        ]
        if is_linkable_url(item.url):
            row.append(InlineKeyboardButton(f"{item.rank} 🔗 View", url=item.url))
        rows.append(row)
    return InlineKeyboardMarkup(rows)


def without_links(items: Sequence[RatingItem]) -> list[RatingItem]:
    """The same rows with no link button (what is left when Telegram refuses a link)."""
    return [replace(item, url=None) for item in items]


def items_from_keyboard(markup: InlineKeyboardMarkup | None) -> list[RatingItem]:
    """Read back the rows :func:`rating_keyboard` drew (to redraw them with new choices)."""
    items: list[RatingItem] = []
    for rank, row in enumerate(markup.inline_keyboard if markup else (), start=1):
        press = parse_rating(row[0].callback_data if row and isinstance(row[0].callback_data, str) else None)
        if press is None:
            continue
        url = next((b.url for b in row if b.url), None)
        items.append(RatingItem(rank, press.recommendation_id, url))
    return items
