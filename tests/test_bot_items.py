""""Which item?" and "More like this", end to end: the unmodified bot, the fake Bot API over
loopback HTTP, the real ImageNet weights and a store cut from catalog-10k (with its categories,
so the index has the category prior that finds the items in a photo).

The outfit photos are catalog-10k's own model shots that the index leaves out: a T-shirt row
whose picture also shows shorts, trousers or shoes. Skipped without ``../shared``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from bot import texts
from bot.keyboards import item_label
from bot.models import Stale
from ffengine.db import StoredItem
from tests.conftest import make_image, shared_path
from tests.fake_bot_api import FakeBotAPI
from tests.test_bot import TOKEN, EngineFiles, Running, buttons, last_answer, start_bot

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.shared, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
#: Products per category in the store: enough for the prior to tell the kinds apart, few enough to embed quickly.
STORE = {"Tshirts": 45, "Shirts": 30, "Tops": 25, "Jeans": 35, "Trousers": 25, "Shorts": 20, "Casual Shoes": 35,
         "Sports Shoes": 25, "Heels": 20, "Handbags": 30, "Watches": 20, "Sunglasses": 20}  # fmt: skip
TOPS = {"Tshirts", "Shirts", "Tops"}  # what a T-shirt shot is of; any other item is a second garment
CANDIDATES = 40  # held-out T-shirt photos looked at for an outfit
OWNER, INTRUDER, CHOOSER = 501, 502, 503


@dataclass(frozen=True)
class Store:
    files: EngineFiles
    category: dict[str, str]  # product id -> category
    outfits: list[Path]  # held-out T-shirt model shots, not in the index


def write_store(root: Path) -> tuple[Path, dict[str, str], list[Path]]:
    """A products.csv of the first rows of each :data:`STORE` category (absolute image paths)."""
    data = shared_path("datasets", "catalog-10k")
    taken: dict[str, int] = dict.fromkeys(STORE, 0)
    kept, outfits = [], []
    with (data / "products.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            cat, image = row["category"], data / row["image"]
            if cat in STORE and taken[cat] < STORE[cat] and image.is_file():
                taken[cat] += 1
                kept.append({**row, "image": str(image)})
            elif cat == "Tshirts" and image.is_file() and len(outfits) < CANDIDATES:
                outfits.append(image)
    catalog = root / "products.csv"
    with catalog.open("w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=list(kept[0]))
        out.writeheader()
        out.writerows(kept)
    return catalog, {r["id"]: r["category"] for r in kept}, outfits


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    from ffengine.build import build_index
    from ffengine.catalog import read_catalog
    from ffengine.embedder import Embedder

    weights = shared_path("models", "mobilenet_v2_imagenet.pth")
    root = tmp_path_factory.mktemp("outfit-store")
    catalog, category, outfits = write_store(root)
    read = read_catalog(catalog, image_roots=[shared_path("datasets", "catalog-10k", "images")])
    report = build_index(read, root / "index", Embedder.load(str(weights), "cpu"), progress=False)
    assert report.products == len(category) and report.priors, report.summary()
    files = EngineFiles(weights, catalog, root / "index", root / "index", root / "index")
    return Store(files, category, outfits)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop(store: Store, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, store.files, tmp_path_factory.mktemp("outfits")) as bot:
        yield bot


@dataclass(frozen=True)
class Outfit:
    jpeg: bytes
    shown: list[str]  # categories of the whole photo's five results
    offered: list[str]  # categories of the items offered under them
    garment: str  # an offered item that is no top: a second garment in the picture
    chosen: str  # an offered item the whole-photo answer also showed (choosing it says which results were wanted)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def outfit(shop: Running, store: Store) -> Outfit:
    """The first held-out model shot whose answer offers a second garment, and an item that it also showed."""
    from ffengine.images import load_image

    answers = await asyncio.to_thread(shop.svc.models.current.answer_photos, [load_image(p) for p in store.outfits], 5)
    for path, answer in zip(store.outfits, answers, strict=True):
        shown = [r.product.category for r in answer.recommendations]
        offered = [i.category for i in answer.items if i.category != shown[0]]
        garment = next((c for c in offered if c not in TOPS), None)
        chosen = next((c for c in offered if c in shown), None)
        if garment is not None and chosen is not None:
            return Outfit(path.read_bytes(), shown, offered, garment, chosen)
    pytest.fail(f"no outfit among {len(store.outfits)} T-shirt model shots: {[[i.category for i in a.items] for a in answers]}")


def item_row(keyboard: dict) -> list[dict]:
    return [b for b in buttons(keyboard)[-1] if b.get("callback_data", "").startswith("i:")]


async def press_and_wait(shop: Running, uid: int, message: dict, data: str) -> dict:
    """Press a button that starts a search and return the rating keyboard that answers it."""
    before = len(shop.keyboards(uid))
    shop.fake.user_presses_button(uid, message["message_id"], data)
    await shop.fake.wait_for(lambda f: len(shop.keyboards(uid)) > before, 120)
    return shop.keyboards(uid)[-1]


def categories_of(shop: Running, store: Store, search_id: int) -> list[str]:
    rows = shop.rows("SELECT product_id FROM recommendations WHERE search_id=? ORDER BY rank", search_id)
    return [store.category[p] for (p,) in rows]


async def test_an_outfit_photo_offers_its_other_items(shop: Running, outfit: Outfit) -> None:
    keyboard = await shop.search(OWNER, outfit.jpeg)
    looking_for = texts.LOOKING_FOR.format(items=" · ".join(item_label(c) for c in outfit.offered))
    assert keyboard["text"] == f"{texts.RESULTS}\n\n{looking_for}"
    rows = buttons(keyboard)
    assert len(rows) == 6 and all(row[-1]["text"] == f"{rank} 🔁" for rank, row in enumerate(rows[:5], 1))
    [(search_id, file_id)] = shop.rows("SELECT id, file_id FROM searches WHERE user_id=?", OWNER)
    assert file_id and [c.params["file_id"] for c in shop.fake.calls_of("getFile")][-1] == file_id  # Telegram's id, to download it again
    stored = shop.rows("SELECT position, category FROM search_items WHERE search_id=? ORDER BY position", search_id)
    offered = [(p, c) for p, c in stored if c != outfit.shown[0]]
    assert [b["text"] for b in item_row(keyboard)] == [item_label(c) for _, c in offered] == [item_label(c) for c in outfit.offered]
    assert [b["callback_data"] for b in item_row(keyboard)] == [f"i:{search_id}:{p}" for p, _ in offered]


async def test_pressing_an_item_answers_with_five_products_of_it(shop: Running, store: Store, outfit: Outfit) -> None:
    photo_keyboard = shop.keyboards(OWNER)[0]
    [button] = [b for b in item_row(photo_keyboard) if b["text"] == item_label(outfit.garment)]
    downloads = len(shop.fake.calls_of("getFile"))
    keyboard = await press_and_wait(shop, OWNER, photo_keyboard, button["callback_data"])
    assert len(shop.fake.calls_of("getFile")) == downloads + 1  # the photo again, by its stored file_id
    assert texts.ITEM_RESULTS.format(item=item_label(outfit.garment)) in shop.texts_to(OWNER)
    parent = int(button["callback_data"].split(":")[1])
    [(child, kind, position)] = shop.rows("SELECT search_id, kind, item_index FROM search_origins WHERE parent_search_id=?", parent)
    assert (kind, f"i:{parent}:{position}") == ("item", button["callback_data"])
    assert categories_of(shop, store, child) == [outfit.garment] * 5
    assert shop.rows("SELECT length(embedding), outcome FROM searches WHERE id=?", child) == [(1280 * 4, "ok")]
    [(crop,), (whole,)] = shop.rows("SELECT embedding FROM searches WHERE id IN (?, ?) ORDER BY id DESC", child, parent)
    assert crop != whole  # the item's crop was searched, not the photo again
    album = [m for m in shop.fake.messages_to(OWNER) if "photo" in m and m["message_id"] > photo_keyboard["message_id"]]
    assert len(album) == 5
    # the same rating keyboard, offering the photo's other items (the one it answered first too)
    seen = [c for (c,) in shop.rows("SELECT category FROM search_items WHERE search_id=? ORDER BY position", parent)]
    assert [b["text"] for b in item_row(keyboard)] == [item_label(c) for c in seen if c != outfit.garment]
    assert all(b["callback_data"].startswith(f"i:{parent}:") for b in item_row(keyboard))
    like = buttons(keyboard)[0][0]["callback_data"]
    await shop.press(OWNER, keyboard, like)
    assert shop.rows("SELECT value FROM feedback f JOIN recommendations r ON r.id=f.recommendation_id WHERE r.search_id=?", child) == [(1,)]


async def test_more_like_this_searches_with_the_products_own_features(shop: Running, store: Store) -> None:
    photo_keyboard = shop.keyboards(OWNER)[0]
    source = buttons(photo_keyboard)[1][-1]["callback_data"]
    rec_id = int(source.split(":")[1])
    [(product_id, parent)] = shop.rows("SELECT product_id, search_id FROM recommendations WHERE id=?", rec_id)
    keyboard = await press_and_wait(shop, OWNER, photo_keyboard, source)
    [(child,)] = shop.rows("SELECT search_id FROM search_origins WHERE kind='more_like' AND source_recommendation_id=? AND parent_search_id=?", rec_id, parent)
    shown = [p for (p,) in shop.rows("SELECT product_id FROM recommendations WHERE search_id=? ORDER BY rank", child)]
    assert len(shown) == 5 and product_id not in shown
    title = next(p.title for p in shop.svc.models.current.index.products if p.id == product_id)
    assert any(t.startswith("🔁 More like “") and title[:40] in t for t in shop.texts_to(OWNER))
    assert len(buttons(keyboard)) == 5  # no items: it did not come from a photo


async def test_foreign_forged_and_stale_presses_get_the_rating_buttons_answers(shop: Running, store: Store, tmp_path: Path) -> None:
    from ffengine.index import Index, write_index

    photo_keyboard = shop.keyboards(OWNER)[0]
    item, more = item_row(photo_keyboard)[0]["callback_data"], buttons(photo_keyboard)[0][-1]["callback_data"]
    searches = shop.rows("SELECT count(*) FROM searches")
    for data in (item, more):  # someone else presses the owner's buttons (a shared chat)
        await shop.press(INTRUDER, photo_keyboard, data, chat_id=OWNER)
        assert (last_answer(shop.fake)["text"], last_answer(shop.fake)["show_alert"]) == (texts.NOT_YOURS, True)
    search_id = item.split(":")[1]
    forged = [f"i:{search_id}:9", "i:999999:0", f"i:{search_id}:01", f"i:{search_id}:Jeans", "m:999999", "m:0", f"m:{search_id}:1"]
    shop.fake.add_user(OWNER)
    for n, data in enumerate(forged):
        shop.fake.inject_update({"callback_query": {"id": f"forged-item-{n}", "from": {"id": OWNER, "is_bot": False, "first_name": "O"},
                                                    "chat_instance": "1", "data": data}})  # fmt: skip
    await shop.fake.wait_for(lambda f: all(any(c.params.get("callback_query_id") == f"forged-item-{n}" for c in f.calls_of("answerCallbackQuery")) for n in range(len(forged))))
    answers = {c.params["callback_query_id"]: c.params for c in shop.fake.calls_of("answerCallbackQuery")}
    assert all((answers[f"forged-item-{n}"]["text"], answers[f"forged-item-{n}"]["show_alert"]) == (texts.EXPIRED, True) for n in range(len(forged)))
    assert shop.rows("SELECT count(*) FROM searches") == searches  # nothing searched, nothing logged

    # another model version whose catalogue has neither the item's category nor the products shown
    current = Index.load(store.files.index)
    gone_category = shop.rows("SELECT category FROM search_items WHERE search_id=? AND position=?", int(search_id), int(item.split(":")[2]))[0][0]
    gone = {p for (p,) in shop.rows("SELECT product_id FROM recommendations WHERE search_id=?", int(search_id))}
    keep = [i for i, p in enumerate(current.products) if p.category != gone_category and p.id not in gone]
    write_index(tmp_path / "stale", current.features[keep], [current.products[i] for i in keep], fingerprint=current.fingerprint, catalog_hash="stale")
    await shop.svc.db.create_model_version("stale", str(store.files.weights), str(tmp_path / "stale"))
    await shop.svc.models.activate(shop.svc.db, "stale")
    try:
        for data in (item, more):
            await shop.press(OWNER, photo_keyboard, data)
            assert (last_answer(shop.fake)["text"], last_answer(shop.fake)["show_alert"]) == (texts.EXPIRED, True)
    finally:
        await shop.svc.models.activate(shop.svc.db, "base")
    assert shop.rows("SELECT count(*) FROM searches") == searches

    # the model may change between the check and the model thread: the model itself refuses then
    model = shop.svc.models.current
    with pytest.raises(Stale):
        model.more_like("no-such-product", 5)
    with pytest.raises(Stale):
        model.search_item(Image.new("RGB", (8, 8)), StoredItem(0, "Tiaras", 0.5, (0, 0, 8, 8)), 5)


async def test_a_press_while_a_search_runs_is_one_too_many(shop: Running) -> None:
    photo_keyboard = shop.keyboards(OWNER)[0]
    gate = threading.Event()
    blocker = shop.svc.batcher._executor.submit(gate.wait, 30)  # occupy the single model thread
    try:
        shop.fake.user_sends_photo(OWNER, make_image(5))
        await shop.fake.wait_for(lambda f: OWNER in shop.svc.in_flight)
        await shop.press(OWNER, photo_keyboard, buttons(photo_keyboard)[2][-1]["callback_data"])
        assert (last_answer(shop.fake)["text"], last_answer(shop.fake)["show_alert"]) == (texts.ONE_AT_A_TIME, True)
    finally:
        gate.set()
        blocker.result(timeout=5)
    await shop.fake.wait_for(lambda f: OWNER not in shop.svc.in_flight, 60)


async def test_the_choice_is_logged_and_used_by_train_feedback(shop: Running, store: Store, outfit: Outfit) -> None:
    keyboard = await shop.search(CHOOSER, outfit.jpeg)
    [button] = [b for b in item_row(keyboard) if b["text"] == item_label(outfit.chosen)]
    await press_and_wait(shop, CHOOSER, keyboard, button["callback_data"])
    parent = int(button["callback_data"].split(":")[1])
    [exported] = [s for s in await shop.svc.db.export_feedback(rated_only=True) if s.search_id == parent]
    implied = [i.product_id for i in exported.items if i.implicit]
    assert implied and {store.category[p] for p in implied} == {outfit.chosen}
    assert [i.rating for i in exported.items] == [1 if c == outfit.chosen else None for c in outfit.shown]

    env = {k: v for k, v in os.environ.items() if not k.startswith("FFENGINE_") and k != "DATABASE_URL"}
    env.update(
        DATABASE_URL=shop.settings.database_url, FFENGINE_WEIGHTS=str(store.files.weights), FFENGINE_INDEX=str(store.files.index),
        FFENGINE_DATA_DIR=str(shop.data_dir), FFENGINE_DEVICE="cpu", PYTHONPATH=str(REPO),
    )  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "train", "feedback", "--json"], cwd=shop.data_dir, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    likes = sum(1 for s in await shop.svc.db.export_feedback(rated_only=True) for i in s.items if i.rating == 1)
    assert result["status"] == "insufficient" and result["metrics"]["likes"] == likes >= len(implied)
    assert result["metrics"]["chosen_item_likes"] >= len(implied) and "implied by chosen items" in proc.stderr + proc.stdout

    shop.fake.user_sends_command(CHOOSER, "forget")
    await shop.fake.wait_for(lambda f: any(t.startswith("🧹") for t in shop.texts_to(CHOOSER)))
    assert shop.rows("SELECT count(*) FROM search_items WHERE search_id=?", parent) == [(0,)]
    assert shop.rows("SELECT count(*) FROM search_origins WHERE parent_search_id=?", parent) == [(0,)]
