"""The results keyboard: pure functions from data to buttons and back (no Telegram I/O).

One row per product (👍, 👎, its page, 🔁 more like it), then a row of the other garments
seen in the photo. Callback data is ``r:<recommendation_id>:<+1|-1>`` (rating),
``m:<recommendation_id>`` (more like this) or ``i:<search_id>:<item position>`` (an item):
ids only, never a category or a box. It arrives from the network, so the parsers accept
only those exact shapes, and the database then checks that the recommendation or search
belongs to the presser before anything is done.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot.formatting import shorten
from ffengine.catalog import is_linkable_url

RATING_PREFIX = "r:"
MORE_PREFIX = "m:"
ITEM_PREFIX = "i:"
_ID = "([1-9][0-9]{0,17})"  # a database id: no sign, no leading zero, shorter than 2**63
_RATING_RE = re.compile(f"r:{_ID}:([+-]1)")
_MORE_RE = re.compile(f"m:{_ID}")
_ITEM_RE = re.compile(f"i:{_ID}:(0|[1-9][0-9]?)")
LIKE, DISLIKE = 1, -1
CHOSEN = "✅"
MORE = "🔁"
MAX_OFFERED = 8  # Telegram's buttons per row
MAX_LABEL = 40  # a category name longer than this is cut (Telegram truncates long buttons anyway)
DEFAULT_EMOJI = "🏷️"
#: First match wins, so narrower words come before the wider ones that contain them (capri before cap).
_EMOJI_WORDS = (
    ("👕", ("tshirt", "t-shirt", "tee", "top", "tunic", "sweatshirt", "vest")),
    ("👔", ("shirt", "tie")),
    ("👖", ("jean", "trouser", "pant", "capri", "legging", "short", "churidar", "tights", "jogger")),
    ("👘", ("kurta", "kurti", "kimono")),
    ("🥻", ("saree", "sari")),
    ("👗", ("dress", "skirt", "gown")),
    ("🧥", ("jacket", "coat", "blazer", "sweater", "cardigan", "waistcoat", "shrug", "hoodie")),
    ("👠", ("heel", "pump", "stiletto")),
    ("👡", ("sandal",)),
    ("🩴", ("flip", "slipper")),
    ("👢", ("boot",)),
    ("🥿", ("flat", "loafer")),
    ("👞", ("formal shoe",)),
    ("👟", ("shoe", "sneaker", "trainer")),
    ("🎒", ("backpack", "rucksack")),
    ("👛", ("wallet", "purse")),
    ("👜", ("handbag", "bag", "clutch", "pouch", "tote")),
    ("⌚", ("watch",)),
    ("🕶️", ("sunglass", "eyewear", "glasses")),
    ("🧢", ("cap", "hat", "beanie")),
    ("🧦", ("sock", "stocking")),
    ("🧣", ("scarf", "scarves", "muffler", "stole", "dupatta")),
    ("🧤", ("glove",)),
    ("💍", ("ring", "earring", "necklace", "chain", "bracelet", "jewel", "cufflink", "pendant")),
    ("🩲", ("brief", "boxer", "trunk", "innerwear", "bra", "lingerie")),
    ("👙", ("swim", "bikini")),
)
_EMOJI = [(re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + ")"), emoji) for emoji, words in _EMOJI_WORDS]


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


@dataclass(frozen=True)
class ItemButton:
    """A garment seen in the photo, offered for a search of its own."""

    search_id: int  # the photo search that saw it
    position: int  # its place among that search's items
    label: str  # emoji and category, as drawn


@dataclass(frozen=True)
class ItemPress:
    search_id: int
    position: int


def category_emoji(category: str) -> str:
    """👖 for "Jeans", 👟 for "Casual Shoes"...: the first word of the table that starts a word of the name."""
    name = category.casefold()
    return next((emoji for pattern, emoji in _EMOJI if pattern.search(name)), DEFAULT_EMOJI)


def item_label(category: str) -> str:
    return f"{category_emoji(category)} {shorten(category, MAX_LABEL)}"


def offered_items(search_id: int, categories: Sequence[str], shown: str | None) -> list[ItemButton]:
    """Buttons for the items of photo search ``search_id`` (``categories`` in item order) but
    the one the answer already shows (category ``shown``)."""
    offered = [ItemButton(search_id, position, item_label(c)) for position, c in enumerate(categories) if c != shown]
    return offered[:MAX_OFFERED]


def rating_data(recommendation_id: int, value: int) -> str:
    return f"{RATING_PREFIX}{recommendation_id}:{value:+d}"


def parse_rating(data: str | None) -> RatingPress | None:
    """``"r:17:+1"`` -> ``RatingPress(17, 1)``; anything else -> ``None``."""
    match = _RATING_RE.fullmatch(data or "")
    if match is None:
        return None
    return RatingPress(int(match.group(1)), int(match.group(2)))


def more_data(recommendation_id: int) -> str:
    return f"{MORE_PREFIX}{recommendation_id}"


def parse_more(data: str | None) -> int | None:
    """``"m:17"`` -> ``17`` (the recommendation id); anything else -> ``None``."""
    match = _MORE_RE.fullmatch(data or "")
    return None if match is None else int(match.group(1))


def item_data(search_id: int, position: int) -> str:
    return f"{ITEM_PREFIX}{search_id}:{position}"


def parse_item(data: str | None) -> ItemPress | None:
    """``"i:17:2"`` -> ``ItemPress(17, 2)``; anything else -> ``None``."""
    match = _ITEM_RE.fullmatch(data or "")
    return None if match is None else ItemPress(int(match.group(1)), int(match.group(2)))


def rating_keyboard(
    items: Sequence[RatingItem], choices: Mapping[int, int] | None = None, offered: Sequence[ItemButton] = ()
) -> InlineKeyboardMarkup:
    """One row per product: ``n 👍``, ``n 👎`` (✅ marks the stored choice), a link to its page
    when it has one Telegram accepts (a refused link button would fail the whole keyboard)
    and ``n 🔁`` (more like it); then one row of the ``offered`` items."""
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
        row.append(InlineKeyboardButton(f"{item.rank} {MORE}", callback_data=more_data(item.recommendation_id)))
        rows.append(row)
    if offered:
        rows.append([InlineKeyboardButton(i.label, callback_data=item_data(i.search_id, i.position)) for i in offered])
    return InlineKeyboardMarkup(rows)


def without_links(items: Sequence[RatingItem]) -> list[RatingItem]:
    """The same rows with no link button (what is left when Telegram refuses a link)."""
    return [replace(item, url=None) for item in items]


def items_from_keyboard(markup: InlineKeyboardMarkup | None) -> list[RatingItem]:
    """Read back the product rows :func:`rating_keyboard` drew (to redraw them with new choices)."""
    items: list[RatingItem] = []
    for rank, row in enumerate(markup.inline_keyboard if markup else (), start=1):
        press = parse_rating(row[0].callback_data if row and isinstance(row[0].callback_data, str) else None)
        if press is None:
            continue
        url = next((b.url for b in row if b.url), None)
        items.append(RatingItem(rank, press.recommendation_id, url))
    return items


def offered_from_keyboard(markup: InlineKeyboardMarkup | None) -> list[ItemButton]:
    """Read back the item buttons :func:`rating_keyboard` drew (so that a redraw keeps them)."""
    offered = []
    for row in markup.inline_keyboard if markup else ():
        for button in row:
            press = parse_item(button.callback_data if isinstance(button.callback_data, str) else None)
            if press is not None:
                offered.append(ItemButton(press.search_id, press.position, button.text))
    return offered
