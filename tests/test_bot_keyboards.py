"""The rating keyboard and album captions are pure functions: tested without Telegram."""

from __future__ import annotations

import pytest

from bot.album import caption
from bot.keyboards import RatingItem, RatingPress, items_from_keyboard, parse_rating, rating_data, rating_keyboard
from ffengine.catalog import Product

ITEMS = [RatingItem(1, 11, "https://shop.example/p/1"), RatingItem(2, 12, None), RatingItem(3, 13, "ftp://nope")]


def texts(markup) -> list[list[str]]:
    return [[b.text for b in row] for row in markup.inline_keyboard]


def test_one_row_per_product_with_like_dislike_and_link() -> None:
    markup = rating_keyboard(ITEMS)
    assert texts(markup) == [["1 👍", "1 👎", "1 🔗 View"], ["2 👍", "2 👎"], ["3 👍", "3 👎"]]
    first = markup.inline_keyboard[0]
    assert [first[0].callback_data, first[1].callback_data, first[2].url] == ["r:11:+1", "r:11:-1", "https://shop.example/p/1"]


def test_choice_is_marked_and_only_one_per_row() -> None:
    markup = rating_keyboard(ITEMS, {11: -1, 12: 1, 999: 1})
    assert texts(markup)[0][:2] == ["1 👍", "✅1 👎"]
    assert texts(markup)[1] == ["✅2 👍", "2 👎"]
    assert texts(markup)[2] == ["3 👍", "3 👎"]


def test_keyboard_round_trips_for_redrawing() -> None:
    assert items_from_keyboard(rating_keyboard(ITEMS, {11: 1})) == [
        RatingItem(1, 11, "https://shop.example/p/1"),
        RatingItem(2, 12, None),
        RatingItem(3, 13, None),  # a non-web link was never drawn
    ]
    assert items_from_keyboard(None) == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("r:17:+1", RatingPress(17, 1)),
        ("r:17:-1", RatingPress(17, -1)),
        ("r:17:+2", None),
        ("r:17:1", None),
        ("r:0:+1", None),
        ("r:-5:+1", None),
        ("r:017:+1", None),
        ("r:1234567890123456789:+1", None),  # longer than any database id
        ("r:17:+1 ", None),
        ("r:17:+1\n", None),
        ("x:17:+1", None),
        ("", None),
        (None, None),
    ],
)
def test_callback_data_is_parsed_strictly(data: str | None, expected: RatingPress | None) -> None:
    assert parse_rating(data) == expected


def test_callback_data_fits_telegram_limit() -> None:
    data = rating_data(10**17, -1)
    assert parse_rating(data) == RatingPress(10**17, -1)
    assert len(data.encode()) <= 64


def test_caption_has_title_price_and_link() -> None:
    product = Product("p1", "Blue shirt", "https://shop.example/p1", "/img/1.jpg", price=1299.0, currency="INR")
    assert caption(2, product) == "2. Blue shirt\n1,299 INR\nhttps://shop.example/p1"
    no_price = Product("p2", "x" * 500, "https://shop.example/p2", "/img/2.jpg", price=19.5)
    lines = caption(1, no_price).split("\n")
    assert lines[0].endswith("…") and len(lines[0]) < 210 and lines[1] == "19.50"
    assert caption(1, Product("p3", "Hat", "https://s/p3", "/i.jpg")) == "1. Hat\nhttps://s/p3"
