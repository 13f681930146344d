"""The rating keyboard and album captions are pure functions: tested without Telegram."""

from __future__ import annotations

import pytest

from bot.album import caption
from bot.keyboards import (
    DEFAULT_EMOJI,
    ItemButton,
    ItemPress,
    RatingItem,
    RatingPress,
    category_emoji,
    item_data,
    item_label,
    items_from_keyboard,
    more_data,
    offered_from_keyboard,
    offered_items,
    parse_item,
    parse_more,
    parse_rating,
    rating_data,
    rating_keyboard,
)
from ffengine.catalog import Product

ITEMS = [RatingItem(1, 11, "https://shop.example/p/1"), RatingItem(2, 12, None), RatingItem(3, 13, "ftp://nope")]


def texts(markup) -> list[list[str]]:
    return [[b.text for b in row] for row in markup.inline_keyboard]


OFFERED = [ItemButton(70, 1, "👖 Jeans"), ItemButton(70, 3, "👜 Handbags")]


def test_one_row_per_product_with_like_dislike_link_and_more_like_this() -> None:
    markup = rating_keyboard(ITEMS)
    assert texts(markup) == [["1 👍", "1 👎", "1 🔗 View", "1 🔁"], ["2 👍", "2 👎", "2 🔁"], ["3 👍", "3 👎", "3 🔁"]]
    first = markup.inline_keyboard[0]
    assert [first[0].callback_data, first[1].callback_data, first[2].url, first[3].callback_data] == [
        "r:11:+1", "r:11:-1", "https://shop.example/p/1", "m:11"
    ]  # fmt: skip


def test_choice_is_marked_and_only_one_per_row() -> None:
    markup = rating_keyboard(ITEMS, {11: -1, 12: 1, 999: 1})
    assert texts(markup)[0][:2] == ["1 👍", "✅1 👎"]
    assert texts(markup)[1] == ["✅2 👍", "2 👎", "2 🔁"]
    assert texts(markup)[2] == ["3 👍", "3 👎", "3 🔁"]


def test_the_other_items_come_last_in_one_row_and_survive_a_redraw() -> None:
    markup = rating_keyboard(ITEMS, offered=OFFERED)
    assert texts(markup)[-1] == ["👖 Jeans", "👜 Handbags"]
    assert [b.callback_data for b in markup.inline_keyboard[-1]] == ["i:70:1", "i:70:3"]
    assert items_from_keyboard(markup) == [RatingItem(1, 11, "https://shop.example/p/1"), RatingItem(2, 12, None), RatingItem(3, 13, None)]
    assert offered_from_keyboard(markup) == OFFERED
    redrawn = rating_keyboard(items_from_keyboard(markup), {12: 1}, offered_from_keyboard(markup))
    assert texts(redrawn)[1][0] == "✅2 👍" and texts(redrawn)[-1] == texts(markup)[-1]
    assert offered_from_keyboard(None) == [] and offered_from_keyboard(rating_keyboard(ITEMS)) == []


def test_offered_items_leave_out_what_the_answer_shows() -> None:
    categories = ["Tshirts", "Jeans", "Casual Shoes", "Handbags"]
    assert offered_items(5, categories, "Tshirts") == [
        ItemButton(5, 1, "👖 Jeans"), ItemButton(5, 2, "👟 Casual Shoes"), ItemButton(5, 3, "👜 Handbags")
    ]  # fmt: skip
    assert [i.position for i in offered_items(5, categories, "Sunglasses")] == [0, 1, 2, 3]
    assert offered_items(5, ["Tshirts"], "Tshirts") == []
    assert len(offered_items(5, [f"C{i}" for i in range(20)], None)) == 8  # one keyboard row
    assert item_label("x" * 100).endswith("…") and len(item_label("x" * 100)) < 50


@pytest.mark.parametrize(
    ("category", "emoji"),
    [
        ("Jeans", "👖"), ("Track Pants", "👖"), ("Capris", "👖"), ("Caps", "🧢"), ("Tshirts", "👕"), ("Sweatshirts", "👕"),
        ("Shirts", "👔"), ("Casual Shoes", "👟"), ("Formal Shoes", "👞"), ("Heels", "👠"), ("Flip Flops", "🩴"),
        ("Handbags", "👜"), ("Laptop Bag", "👜"), ("Backpacks", "🎒"), ("Watches", "⌚"), ("Sunglasses", "🕶️"),
        ("Dresses", "👗"), ("Bracelet", "💍"), ("Bra", "🩲"), ("Belts", DEFAULT_EMOJI), ("", DEFAULT_EMOJI),
    ],
)  # fmt: skip
def test_each_category_gets_an_emoji_from_its_name(category: str, emoji: str) -> None:
    assert category_emoji(category) == emoji


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


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("i:17:0", ItemPress(17, 0)),
        ("i:17:3", ItemPress(17, 3)),
        ("i:17:42", ItemPress(17, 42)),
        ("i:17:100", None),
        ("i:17:03", None),
        ("i:17:-1", None),
        ("i:0:1", None),
        ("i:017:1", None),
        ("i:17", None),
        ("i:17:1:2", None),
        ("i:17:Jeans", None),  # never a category
        ("i:17:1 ", None),
        ("i:1234567890123456789:0", None),
        ("m:17:0", None),
        ("", None),
        (None, None),
    ],
)
def test_item_data_is_parsed_strictly(data: str | None, expected: ItemPress | None) -> None:
    assert parse_item(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [("m:17", 17), ("m:0", None), ("m:017", None), ("m:-3", None), ("m:17:+1", None), ("m:17\n", None), ("r:17:+1", None), ("m:", None), (None, None)],
)
def test_more_like_this_data_is_parsed_strictly(data: str | None, expected: int | None) -> None:
    assert parse_more(data) == expected


def test_callback_data_fits_telegram_limit() -> None:
    for data in (rating_data(10**17, -1), item_data(10**17, 99), more_data(10**17)):
        assert len(data.encode()) <= 64
    assert parse_rating(rating_data(10**17, -1)) == RatingPress(10**17, -1)
    assert parse_item(item_data(10**17, 99)) == ItemPress(10**17, 99) and parse_more(more_data(10**17)) == 10**17


def test_caption_has_title_price_and_link() -> None:
    product = Product("p1", "Blue shirt", "https://shop.example/p1", "/img/1.jpg", price=1299.0, currency="INR")
    assert caption(2, product) == "2. Blue shirt\n1,299 INR\nhttps://shop.example/p1"
    no_price = Product("p2", "x" * 500, "https://shop.example/p2", "/img/2.jpg", price=19.5)
    lines = caption(1, no_price).split("\n")
    assert lines[0].endswith("…") and len(lines[0]) < 210 and lines[1] == "19.50"
    assert caption(1, Product("p3", "Hat", "https://s/p3", "/i.jpg")) == "1. Hat\nhttps://s/p3"
