"""Items seen in a photo and the searches their buttons start, on a real SQLite file.

A press arrives from the network with ids only; the database answers it for its own user
only, logs the search it starts with its origin, and turns the choice of an item into
implied 👍 for the retraining.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ffengine.catalog import Product
from ffengine.db import Database, FeedbackRefused, Origin, StoredItem
from tests.test_db import ALICE, BOB, count, search, vector  # noqa: F401  (count is a fixture)


@dataclass(frozen=True)
class Item:
    """Shaped like ``ffengine.items.Item`` (what the engine hands the bot)."""

    category: str
    probability: float
    box: tuple[int, int, int, int]


OUTFIT = [Item("Tshirts", 0.7, (10, 0, 90, 60)), Item("Jeans", 0.5, (12, 55, 88, 150)), Item("Casual Shoes", 0.2, (20, 140, 80, 160))]
SHOWN = [("t1", 0.1), ("j1", 0.2), ("t2", 0.3), ("j2", 0.4), ("s1", 0.5)]
CATEGORY = {"t": "Tshirts", "j": "Jeans", "s": "Casual Shoes"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ff.db"


async def catalogue(db: Database) -> None:
    """The shown products, with the categories the implied likes are matched on."""
    ids = {p for p, _ in SHOWN} | {"j3", "j4"}
    await db.upsert_products(Product(i, i, None, f"/img/{i}.jpg", category=CATEGORY[i[0]]) for i in sorted(ids))


async def photo(db: Database, user: int = ALICE, seed: int = 0):
    return await search(db, user, seed, results=SHOWN, file_id=f"file-{seed}", items=OUTFIT)


async def item_search(db: Database, user: int, parent: int, position: int):
    return await search(db, user, 50, file_unique_id=None, results=[("j3", 0.1), ("j4", 0.2)], origin=Origin.item(parent, position))


async def test_a_photo_search_keeps_its_items_and_file_id_for_its_own_user(db: Database) -> None:
    record = await photo(db)
    numpy_box = Item("Jeans", np.float32(0.25), tuple(np.array([1, 2, 3, 4])))  # what array code hands over
    assert (await db.pressed_item(ALICE, (await search(db, ALICE, 9, items=[numpy_box])).search_id, 0)).item.box == (1, 2, 3, 4)
    pressed = await db.pressed_item(ALICE, record.search_id, 1)
    assert pressed.item == StoredItem(1, "Jeans", 0.5, (12, 55, 88, 150))
    assert [i.category for i in pressed.items] == ["Tshirts", "Jeans", "Casual Shoes"]
    assert (pressed.file_id, pressed.file_unique_id, pressed.search_id) == ("file-0", "AQAD0", record.search_id)
    with pytest.raises(FeedbackRefused) as foreign:
        await db.pressed_item(BOB, record.search_id, 1)
    assert foreign.value.reason == "not_yours"
    for search_id, position in ((record.search_id, 3), (record.search_id + 99, 0), (record.search_id, -1)):
        with pytest.raises(FeedbackRefused) as missing:
            await db.pressed_item(ALICE, search_id, position)
        assert missing.value.reason == "not_found"


@pytest.mark.parametrize(
    ("item", "error"),
    [
        (Item("Jeans", 1.5, (0, 0, 5, 5)), "at most 1"),
        (Item("Jeans", float("nan"), (0, 0, 5, 5)), "finite"),
        (Item("Jeans", 0.5, (5, 0, 5, 5)), "area"),
        (Item("Jeans", 0.5, (-1, 0, 5, 5)), "pixel coordinates"),
        (Item("Jeans", 0.5, (0, 0, 5)), "pixel coordinates"),  # type: ignore[arg-type]
        (Item("Jeans", 0.5, (0.5, 0, 5, 5)), "pixel coordinates"),  # type: ignore[arg-type]
        (Item("", 0.5, (0, 0, 5, 5)), "category"),
        (Item("x" * 129, 0.5, (0, 0, 5, 5)), "category"),
    ],
)
async def test_malformed_items_are_refused_before_anything_is_written(db: Database, item: Item, error: str, count) -> None:
    with pytest.raises(ValueError, match=error):
        await search(db, ALICE, items=[item])
    assert count("searches") == 0


async def test_an_item_search_is_logged_with_its_origin_and_only_from_the_users_own_search(db: Database, db_path: Path) -> None:
    parent = await photo(db)
    child = await item_search(db, ALICE, parent.search_id, 1)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT search_id, kind, parent_search_id, item_index, source_recommendation_id FROM search_origins").fetchall() == [
            (child.search_id, "item", parent.search_id, 1, None)
        ]
    for user, position, reason in ((BOB, 1, "not_yours"), (ALICE, 7, "not_found")):
        with pytest.raises(FeedbackRefused) as refused:
            await item_search(db, user, parent.search_id, position)
        assert refused.value.reason == reason
    assert (await db.user_summary(BOB)).searches == 0  # the refused search left nothing behind


async def test_more_like_this_is_answered_and_logged_for_the_owner_only(db: Database, db_path: Path) -> None:
    parent = await photo(db)
    pressed = await db.pressed_recommendation(ALICE, parent.recommendation_ids[3])
    assert (pressed.search_id, pressed.product_id) == (parent.search_id, "j2")
    child = await search(db, ALICE, 60, results=[("j3", 0.1)], origin=Origin.more_like(pressed))
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT search_id, kind, parent_search_id, item_index, source_recommendation_id FROM search_origins").fetchall() == [
            (child.search_id, "more_like", parent.search_id, None, parent.recommendation_ids[3])
        ]
    with pytest.raises(FeedbackRefused) as foreign:
        await db.pressed_recommendation(BOB, parent.recommendation_ids[0])
    assert foreign.value.reason == "not_yours"
    with pytest.raises(FeedbackRefused) as gone:
        await db.pressed_recommendation(ALICE, parent.recommendation_ids[-1] + 1000)
    assert gone.value.reason == "not_found"
    forged = Origin("more_like", child.search_id, source_recommendation_id=parent.recommendation_ids[0])  # not that search's
    with pytest.raises(FeedbackRefused, match="another search"):
        await search(db, ALICE, 61, origin=forged)
    with pytest.raises(ValueError, match="not a search origin"):
        await search(db, ALICE, 62, origin=Origin("item", parent.search_id))


async def test_choosing_an_item_likes_that_category_in_the_photo_search(db: Database) -> None:
    await catalogue(db)
    parent = await photo(db)
    untouched = await photo(db, seed=1)
    assert await db.export_feedback(rated_only=True) == []
    before = {s.search_id: s for s in await db.export_feedback()}
    assert [i.rating for i in before[parent.search_id].items] == [None] * 5

    await db.rate(ALICE, parent.recommendation_ids[3], -1)  # an explicit 👎 on a pair of jeans stays a 👎
    child = await item_search(db, ALICE, parent.search_id, 1)  # "I meant the jeans"
    exported = {s.search_id: s for s in await db.export_feedback()}
    items = exported[parent.search_id].items
    assert [(i.product_id, i.rating, i.implicit) for i in items] == [
        ("t1", None, False), ("j1", 1, True), ("t2", None, False), ("j2", -1, False), ("s1", None, False)
    ]  # fmt: skip
    assert all(i.rating is None for i in exported[untouched.search_id].items)
    assert [i.rating for i in exported[child.search_id].items] == [None, None]  # its own results: rated by pressing only
    await db.rate(ALICE, parent.recommendation_ids[3], 1)
    rated = await db.export_feedback(rated_only=True)
    assert [s.search_id for s in rated] == [parent.search_id]


async def test_an_implied_like_alone_makes_a_search_rated(db: Database) -> None:
    await catalogue(db)
    parent = await photo(db)
    await item_search(db, ALICE, parent.search_id, 2)  # shoes: one was shown
    [rated] = await db.export_feedback(rated_only=True)
    assert rated.search_id == parent.search_id and [i.rating for i in rated.items] == [None, None, None, None, 1]
    other = await photo(db, seed=2)
    await item_search(db, ALICE, other.search_id, 0)
    assert [s.search_id for s in await db.export_feedback(rated_only=True, limit=1)] == [parent.search_id]
    assert [s.search_id for s in await db.export_feedback(rated_only=True, since_id=parent.search_id)] == [other.search_id]


async def test_forget_erases_items_and_origins_too(db: Database, db_path: Path, count: Callable[..., int]) -> None:
    parent = await photo(db)
    await item_search(db, ALICE, parent.search_id, 0)
    await search(db, ALICE, 70, origin=Origin.more_like(await db.pressed_recommendation(ALICE, parent.recommendation_ids[0])))
    bob = await photo(db, BOB, 3)
    deleted = await db.forget_user(ALICE)
    assert deleted == 2 + 3 + 3 + (5 + 2 + 5) + 1  # origins, items, searches, recommendations, user
    assert count("search_items") == 3 and count("search_origins") == 0 and count("searches") == 1
    with sqlite3.connect(db_path) as conn:
        assert "file-0" not in "\n".join(conn.iterdump())
    assert (await db.pressed_item(BOB, bob.search_id, 0)).item.category == "Tshirts"

