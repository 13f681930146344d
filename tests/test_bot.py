"""The unmodified bot, run in-process with polling against the fake Bot API over loopback HTTP.

The engine under it is real: a weights file written with ``save_weights`` (seeded random
MobileNetV2, loaded through the normal weights path), an index built by ``build_index``
from generated product photos, and a real SQLite file. Most shopper tests share one bot
(module scope: each test uses its own user ids); tests that need other settings start
their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import logging
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot import texts
from bot.app import build_application
from bot.config import BotSettings
from bot.context import BotServices, services
from bot.retrain import STARTED as RETRAIN_STARTED
from train.runs import TrainingResult
from bot.runner import running
from tests.conftest import make_image
from tests.fake_bot_api import FakeBotAPI

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN = 4242
N_PRODUCTS = 16
TOKEN = "123456789:AAHtestTokenForTheBotTests-abcdefgh"
REMOTE = "https://img.shop.example/photos"


@dataclass(frozen=True)
class EngineFiles:
    weights: Path
    catalog: Path
    index: Path
    small_index: Path  # the first 8 products only: a second "model version" to switch to
    remote_index: Path  # the same 8 products with their photos on the web (http URLs)


def write_catalog(root: Path, n: int) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    catalog = root / "products.csv"
    with catalog.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "title", "url", "image", "price", "currency", "category"])
        for i in range(n):
            (images / f"{i}.jpg").write_bytes(make_image(100 + i, size=(120, 160)))
            price = f"{499 + 100 * i}" if i % 2 == 0 else ""
            out.writerow([f"p{i}", f"Product {i}", f"https://shop.example/p/{i}", f"images/{i}.jpg", price, "INR" if price else "", "Shirts"])
    return catalog


@pytest.fixture(scope="session")
def engine_files(tmp_path_factory: pytest.TempPathFactory) -> EngineFiles:
    """A seeded random-init weights file (+ sidecar) and an index built from it by the real builder."""
    import torch
    from torchvision.models import mobilenet_v2

    from ffengine.build import build_index
    from ffengine.embedder import Embedder
    from ffengine.index import Index, write_index
    from ffengine.weights import Preprocess, save_weights

    root = tmp_path_factory.mktemp("bot-engine")
    torch.manual_seed(1234)
    weights = save_weights(mobilenet_v2(weights=None).state_dict(), root / "weights.pth", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))
    catalog = write_catalog(root / "shop", N_PRODUCTS)
    embedder = Embedder.load(str(weights), "cpu")
    report = build_index(catalog, root / "index", embedder, progress=False)
    assert report.products == N_PRODUCTS and not report.skipped
    small = build_index(catalog, root / "small-index", embedder, progress=False, limit=8)
    assert small.products == 8
    local = Index.load(root / "small-index")
    remote = [dataclasses.replace(p, image=f"{REMOTE}/{p.id}.jpg") for p in local.products]
    write_index(root / "remote-index", local.features, remote, fingerprint=local.fingerprint, catalog_hash="remote-photos")
    return EngineFiles(weights, catalog, root / "index", root / "small-index", root / "remote-index")


def bot_env(fake: FakeBotAPI, files: EngineFiles, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TELEGRAM_BOT_TOKEN": fake.token,
        "TELEGRAM_API_URL": fake.root,
        "ADMIN_IDS": str(ADMIN),
        "DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'ff.db'}",
        "FFENGINE_WEIGHTS": str(files.weights),
        "FFENGINE_INDEX": str(files.index),
        "FFENGINE_DEVICE": "cpu",
        "FFENGINE_DATA_DIR": str(data_dir),
        **extra,
    }


@dataclass
class Running:
    fake: FakeBotAPI
    settings: BotSettings
    app: Any
    data_dir: Path

    @property
    def svc(self) -> BotServices:
        return services(self.app)

    def rows(self, sql: str, *args: object) -> list[tuple]:
        """Read the bot's real SQLite file directly (WAL: safe while the bot writes)."""
        with contextlib.closing(sqlite3.connect(self.data_dir / "ff.db")) as con:
            return con.execute(sql, args).fetchall()

    def texts_to(self, uid: int) -> list[str]:
        return [m["text"] for m in self.fake.messages_to(uid) if "text" in m]

    def keyboards(self, uid: int) -> list[dict]:
        return [m for m in self.fake.messages_to(uid) if m.get("reply_markup") and m.get("text", "").startswith(texts.RESULTS)]

    async def wait_text(self, uid: int, text: str, count: int = 1, timeout: float = 30) -> None:
        await self.fake.wait_for(lambda f: self.texts_to(uid).count(text) >= count, timeout)

    async def search(self, uid: int, jpeg: bytes, **kw: Any) -> dict:
        """Send a photo and wait for the rating keyboard that answers it."""
        before = len(self.keyboards(uid))
        self.fake.user_sends_photo(uid, jpeg, **kw)
        await self.fake.wait_for(lambda f: len(self.keyboards(uid)) > before, 60)
        return self.keyboards(uid)[-1]

    async def press(self, uid: int, message: dict, data: str, *, chat_id: int | None = None) -> None:
        """Press a button and wait until the bot has answered the press."""
        before = len(self.fake.calls_of("answerCallbackQuery"))
        self.fake.user_presses_button(uid, message["message_id"], data, chat_id=chat_id)
        await self.fake.wait_for(lambda f: len(f.calls_of("answerCallbackQuery")) > before)


def buttons(message: dict) -> list[list[dict]]:
    return message["reply_markup"]["inline_keyboard"]


def last_answer(fake: FakeBotAPI) -> dict:
    return fake.calls_of("answerCallbackQuery")[-1].params


@contextlib.asynccontextmanager
async def start_bot(fake: FakeBotAPI, files: EngineFiles, data_dir: Path, **extra: str) -> AsyncIterator[Running]:
    settings = BotSettings.from_env(bot_env(fake, files, data_dir, **extra))
    app = build_application(settings)
    async with running(app, settings):
        yield Running(fake, settings, app, data_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop(engine_files: EngineFiles, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path_factory.mktemp("shop")) as bot:
        yield bot


# ---------------------------------------------------------------- shoppers


async def test_start_help_and_command_menus(shop: Running) -> None:
    shop.fake.user_sends_command(1, "start")
    shop.fake.user_sends_command(2, "help")
    await shop.wait_text(1, texts.HELP)
    await shop.wait_text(2, texts.HELP)
    everyone = [c["command"] for c in shop.fake.commands()]
    admin = [c["command"] for c in shop.fake.commands({"type": "chat", "chat_id": ADMIN})]
    assert everyone == ["start", "help", "privacy", "forget"]
    assert set(admin) == {*everyone, "stats", "models", "retrain", "rollback", "reload"}


async def test_photo_gets_album_of_five_then_rating_keyboard(shop: Running) -> None:
    uid = 10
    keyboard = await shop.search(uid, make_image(7, size=(300, 400)))
    assert shop.fake.calls_of("sendChatAction", chat_id=uid)[0].params["action"] == "upload_photo"
    album = [m for m in shop.fake.messages_to(uid) if "photo" in m]
    assert len(album) == 5 and len({m["media_group_id"] for m in album}) == 1
    assert album[-1]["message_id"] < keyboard["message_id"]  # the album comes first
    rows = buttons(keyboard)
    assert len(rows) == 5
    for rank, (row, photo) in enumerate(zip(rows, album, strict=True), start=1):
        assert [b["text"] for b in row] == [f"{rank} 👍", f"{rank} 👎", f"{rank} 🔗 View", f"{rank} 🔁"]
        assert row[3]["callback_data"] == "m:" + row[0]["callback_data"].split(":")[1]
        assert row[0]["callback_data"].startswith("r:") and row[0]["callback_data"].endswith(":+1")
        title, *rest = photo["caption"].split("\n")
        assert title.startswith(f"{rank}. Product ") and rest[-1] == row[2]["url"]
        number = title.split()[-1]
        assert row[2]["url"] == f"https://shop.example/p/{number}"
        assert (f"{499 + 100 * int(number):,} INR" in rest) == (int(number) % 2 == 0)  # price only when known
    # logged: one successful search with its five recommendations, in the order shown
    [(search_id, outcome, emb_len, version)] = shop.rows("SELECT id, outcome, length(embedding), model_version_id FROM searches WHERE user_id=?", uid)
    assert (outcome, emb_len) == ("ok", 1280 * 4) and version is not None
    rec_ids = [r[0] for r in shop.rows("SELECT id FROM recommendations WHERE search_id=? ORDER BY rank", search_id)]
    assert [row[0]["callback_data"] for row in rows] == [f"r:{rid}:+1" for rid in rec_ids]


async def wait_file_ids_stored(shop: Running, uid: int) -> list[str]:
    """The products shown to ``uid``, once their photos' file_ids are stored (a background write)."""
    shown = [r[0] for r in shop.rows("SELECT product_id FROM recommendations r JOIN searches s ON s.id=r.search_id WHERE s.user_id=?", uid)]
    marks = ",".join("?" * len(shown))
    await shop.fake.wait_for(lambda f: shop.rows(f"SELECT count(*) FROM products WHERE photo_file_id IS NOT NULL AND id IN ({marks})", *shown) == [(len(shown),)])
    return shown


async def test_product_photos_are_uploaded_once_then_sent_by_file_id(shop: Running, engine_files: EngineFiles) -> None:
    jpeg = make_image(31, size=(200, 260))
    await shop.search(20, jpeg)
    first = shop.fake.calls_of("sendMediaGroup", chat_id=20)[-1]
    await wait_file_ids_stored(shop, 20)
    await shop.search(21, jpeg)  # the same picture: the same five products
    second = shop.fake.calls_of("sendMediaGroup", chat_id=21)[-1]
    stored = dict(shop.rows("SELECT id, photo_file_id FROM products WHERE photo_file_id IS NOT NULL"))
    assert [m.kind for m in second.media] == ["file_id"] * 5
    assert {m.ref for m in second.media} <= set(stored.values())
    catalogue_photos = {p.read_bytes() for p in (engine_files.catalog.parent / "images").iterdir()}
    uploads = [m for m in first.media if m.kind == "upload"]
    assert all(m.data in catalogue_photos for m in uploads)
    assert all(m.kind in ("upload", "file_id") for m in first.media)


async def test_an_image_sent_as_a_file_is_searched(shop: Running) -> None:
    uid = 25
    png = make_image(5, size=(180, 240), fmt="PNG")
    shop.fake.user_sends_document(uid, png, file_name="shirt.png", mime_type="image/png")
    await shop.fake.wait_for(lambda f: len(shop.keyboards(uid)) == 1)
    assert len([m for m in shop.fake.messages_to(uid) if "photo" in m]) == 5


async def test_like_is_stored_once_and_shown_with_a_check_mark(shop: Running) -> None:
    uid = 30
    keyboard = await shop.search(uid, make_image(8))
    like, dislike = buttons(keyboard)[1][0]["callback_data"], buttons(keyboard)[1][1]["callback_data"]
    rec_id = int(like.split(":")[1])
    await shop.press(uid, keyboard, like)
    await shop.press(uid, keyboard, like)  # again: keeps it, no duplicate
    assert shop.rows("SELECT value FROM feedback WHERE recommendation_id=?", rec_id) == [(1,)]
    shown = shop.fake.message(uid, keyboard["message_id"])
    assert [b["text"] for b in buttons(shown)[1][:2]] == ["✅2 👍", "2 👎"]
    assert last_answer(shop.fake).get("show_alert") in (None, False)
    await shop.press(uid, shown, dislike)  # changing the mind replaces the rating
    assert shop.rows("SELECT value FROM feedback WHERE recommendation_id=?", rec_id) == [(-1,)]
    await shop.fake.wait_for(lambda f: buttons(f.message(uid, keyboard["message_id"]))[1][1]["text"] == "✅2 👎")
    assert [b["text"] for b in buttons(shop.fake.message(uid, keyboard["message_id"]))[1][:2]] == ["2 👍", "✅2 👎"]
    assert len(shop.fake.calls_of("answerCallbackQuery")) >= 3


async def test_foreign_and_forged_presses_are_refused_and_change_nothing(shop: Running) -> None:
    owner, intruder = 40, 41
    keyboard = await shop.search(owner, make_image(9))
    like = buttons(keyboard)[0][0]["callback_data"]
    before = shop.rows("SELECT count(*) FROM feedback")
    # another user presses the owner's button (e.g. in a shared chat)
    await shop.press(intruder, keyboard, like, chat_id=owner)
    assert last_answer(shop.fake)["show_alert"] is True and last_answer(shop.fake)["text"] == texts.NOT_YOURS
    # forged callback data: unknown id, bad value, foreign prefix, someone else's id from the intruder's own chat
    shop.fake.add_user(intruder)
    forged = ["r:999999:+1", like.replace("+1", "+5"), "admin:rollback", like]
    for n, data in enumerate(forged):
        shop.fake.inject_update({"callback_query": {"id": f"forged-{n}", "from": {"id": intruder, "is_bot": False, "first_name": "X"},
                                                    "chat_instance": "1", "data": data}})  # fmt: skip
    await shop.fake.wait_for(lambda f: all(any(c.params.get("callback_query_id") == f"forged-{n}" for c in f.calls_of("answerCallbackQuery")) for n in range(4)))
    answers = {c.params["callback_query_id"]: c.params for c in shop.fake.calls_of("answerCallbackQuery")}
    assert [answers[f"forged-{n}"]["text"] for n in range(4)] == [texts.EXPIRED, texts.EXPIRED, texts.EXPIRED, texts.NOT_YOURS]
    assert all(answers[f"forged-{n}"]["show_alert"] is True for n in range(4))
    assert shop.rows("SELECT count(*) FROM feedback") == before
    assert buttons(shop.fake.message(owner, keyboard["message_id"])) == buttons(keyboard)  # not redrawn


async def test_non_images_and_unknown_commands_get_the_hint(shop: Running) -> None:
    uid = 50
    shop.fake.user_sends_text(uid, "hello, can you find me a dress?")
    shop.fake.user_sends_command(uid, "frobnicate")
    await shop.wait_text(uid, texts.HINT, 2)
    shop.fake.user_sends_document(uid, b"%PDF-1.4 not a picture", file_name="invoice.pdf", mime_type="application/pdf")
    await shop.wait_text(uid, texts.NOT_IMAGE_FILE)
    shop.fake.user_sends_sticker(uid)
    await shop.wait_text(uid, texts.STICKER)
    assert shop.rows("SELECT outcome FROM searches WHERE user_id=? ORDER BY id", uid) == [("not_image",), ("sticker",)]


def bomb_png() -> bytes:
    """A tiny file that decodes to 400 megapixels."""
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, format="PNG")
    return buf.getvalue()


async def test_bad_pictures_get_friendly_replies_and_are_logged(shop: Running) -> None:
    too_large = texts.TOO_LARGE.format(limit=20)
    cases: list[tuple[int, Callable[[], None], str]] = [
        (60, lambda: shop.fake.user_sends_photo(60, make_image(1), file_size=25 * 1024 * 1024), too_large),
        (61, lambda: shop.fake.user_sends_photo(61, make_image(2)[:300]), "Sorry, I couldn't use that picture: The image is damaged"),
        (62, lambda: shop.fake.user_sends_photo(62, b"definitely not a jpeg"), "Sorry, I couldn't use that picture: This file is not an image"),
        (63, lambda: shop.fake.user_sends_document(63, bomb_png(), file_name="bomb.png", mime_type="image/png"), "Sorry, I couldn't use that picture: The image is too big"),
    ]
    for _, send, _ in cases:
        send()
    for uid, _, expected in cases:
        await shop.fake.wait_for(lambda f, uid=uid, expected=expected: any(t.startswith(expected) for t in shop.texts_to(uid)))
        assert not shop.keyboards(uid)
    outcomes = {uid: shop.rows("SELECT outcome, embedding IS NULL FROM searches WHERE user_id=?", uid) for uid, _, _ in cases}
    assert outcomes == {60: [("too_large", 1)], 61: [("truncated", 1)], 62: [("not_image", 1)], 63: [("too_many_pixels", 1)]}
    huge = shop.fake.message(60, 1)["photo"][-1]["file_id"]
    assert not [c for c in shop.fake.calls_of("getFile") if c.params.get("file_id") == huge]  # never even asked for


async def test_get_file_failures_are_answered(shop: Running) -> None:
    shop.fake.fail_next("getFile", status=400, description="Bad Request: file is too big")
    await asyncio.sleep(0)
    shop.fake.user_sends_photo(64, make_image(3))
    await shop.wait_text(64, texts.TOO_LARGE.format(limit=20))
    shop.fake.fail_next("getFile", status=400, description="Bad Request: invalid file_id")
    shop.fake.user_sends_photo(65, make_image(4))
    await shop.wait_text(65, texts.DOWNLOAD_FAILED)
    assert shop.rows("SELECT outcome FROM searches WHERE user_id IN (64, 65) ORDER BY user_id") == [("too_large",), ("download_failed",)]


async def test_an_album_is_answered_once_for_its_first_photo(shop: Running) -> None:
    uid = 70
    for n in range(6):
        shop.fake.user_sends_photo(uid, make_image(40 + n), media_group_id="album-1")
    await shop.wait_text(uid, texts.ALBUM)
    await shop.fake.wait_for(lambda f: len(shop.keyboards(uid)) == 1)
    await asyncio.sleep(0.5)  # the other five stay unanswered
    assert shop.texts_to(uid).count(texts.ALBUM) == 1 and len(shop.keyboards(uid)) == 1
    assert shop.rows("SELECT count(*) FROM searches WHERE user_id=?", uid) == [(1,)]
    # and the bot still answers the next photo
    await shop.search(uid, make_image(99))


async def test_one_search_at_a_time_per_user(shop: Running) -> None:
    uid = 80
    gate = threading.Event()
    blocker = shop.svc.batcher._executor.submit(gate.wait, 30)  # occupy the single model thread
    try:
        shop.fake.user_sends_photo(uid, make_image(11))
        await shop.fake.wait_for(lambda f: uid in shop.svc.in_flight and shop.svc.batcher.depth >= 1)
        shop.fake.user_sends_photo(uid, make_image(12))
        await shop.wait_text(uid, texts.ONE_AT_A_TIME)
    finally:
        gate.set()
        blocker.result(timeout=5)
    await shop.fake.wait_for(lambda f: len(shop.keyboards(uid)) == 1)
    await asyncio.sleep(0.3)
    assert len(shop.keyboards(uid)) == 1  # the second photo was refused, not queued


async def test_privacy_and_forget(shop: Running) -> None:
    uid = 90
    keyboard = await shop.search(uid, make_image(13))
    await shop.press(uid, keyboard, buttons(keyboard)[0][0]["callback_data"])
    shop.fake.user_sends_command(uid, "privacy")
    await shop.wait_text(uid, texts.PRIVACY.format(searches=1, ratings=1))
    shop.fake.user_sends_command(uid, "forget")
    await shop.wait_text(uid, texts.FORGOTTEN.format(searches=1, ratings=1))
    assert shop.rows("SELECT count(*) FROM searches WHERE user_id=?", uid) == [(0,)]
    assert shop.rows("SELECT count(*) FROM feedback WHERE user_id=?", uid) == [(0,)]
    assert shop.rows("SELECT count(*) FROM users WHERE id=?", uid) == [(0,)]
    # the old buttons now lead nowhere
    await shop.press(uid, keyboard, buttons(keyboard)[1][0]["callback_data"])
    assert last_answer(shop.fake)["text"] == texts.EXPIRED
    assert shop.rows("SELECT count(*) FROM feedback WHERE user_id=?", uid) == [(0,)]
    shop.fake.user_sends_command(uid, "forget")
    await shop.wait_text(uid, texts.NOTHING_TO_FORGET)


async def test_retry_after_is_respected(shop: Running) -> None:
    uid = 95
    shop.fake.fail_next("sendMediaGroup", status=429, retry_after=1)
    await shop.search(uid, make_image(14))
    group_calls = shop.fake.calls_of("sendMediaGroup", chat_id=uid)
    assert [c.status for c in group_calls] == [429, 200]
    assert group_calls[1].time - group_calls[0].time >= 0.9
    assert len([m for m in shop.fake.messages_to(uid) if "photo" in m]) == 5


async def test_thirty_users_at_once_all_answered_and_every_rating_stored(shop: Running) -> None:
    users = list(range(1000, 1030))
    batches_before = shop.svc.batcher.batches
    gate = threading.Event()
    blocker = shop.svc.batcher._executor.submit(gate.wait, 60)  # hold the model so that all 30 wait together
    try:
        for uid in users:
            shop.fake.user_sends_photo(uid, make_image(uid, size=(160, 200)))
        await shop.fake.wait_for(lambda f: shop.svc.batcher.depth == len(users), timeout=60)
    finally:
        gate.set()
        blocker.result(timeout=5)
    await shop.fake.wait_for(lambda f: all(len(shop.keyboards(uid)) == 1 for uid in users), timeout=120)
    # what waited together was embedded together: 1 + ceil(29 / 16) batches
    assert shop.svc.batcher.batches - batches_before == 3
    for n, uid in enumerate(users):
        keyboard = shop.keyboards(uid)[0]
        shop.fake.user_presses_button(uid, keyboard["message_id"], buttons(keyboard)[n % 5][n % 2]["callback_data"])
    expected = {uid: (1 if n % 2 == 0 else -1) for n, uid in enumerate(users)}
    await shop.fake.wait_for(
        lambda f: len(shop.rows("SELECT 1 FROM feedback WHERE user_id BETWEEN 1000 AND 1029")) == 30, timeout=60
    )
    stored = dict(shop.rows("SELECT user_id, value FROM feedback WHERE user_id BETWEEN 1000 AND 1029"))
    assert stored == expected


# ---------------------------------------------------------------- admins


ADMIN_COMMANDS = ["stats", "models", "retrain", "reload", "rollback base"]


async def test_admin_commands_do_not_exist_for_others(shop: Running) -> None:
    uid = 110
    shop.fake.user_sends_command(uid, "frobnicate")
    for command in ADMIN_COMMANDS:
        name, _, args = command.partition(" ")
        shop.fake.user_sends_command(uid, name, args)
    await shop.wait_text(uid, texts.HINT, 1 + len(ADMIN_COMMANDS))
    await asyncio.sleep(0.3)
    assert shop.texts_to(uid) == [texts.HINT] * (1 + len(ADMIN_COMMANDS))  # exactly like an unknown command
    assert not shop.svc.retrainer.running


async def test_admin_stats_and_models(shop: Running) -> None:
    shop.fake.user_sends_command(ADMIN, "stats")
    await shop.fake.wait_for(lambda f: any(t.startswith("📊 Stats") for t in shop.texts_to(ADMIN)))
    stats = next(t for t in shop.texts_to(ADMIN) if t.startswith("📊 Stats"))
    users, searches = shop.rows("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM searches)")[0]
    assert f"Users: {users} · searches: {searches}" in stats
    assert f"Catalogue: {N_PRODUCTS} products ({N_PRODUCTS} in the active index)" in stats
    assert "Active model: base" in stats and "Latency p50 / p95: " in stats
    shop.fake.user_sends_command(ADMIN, "models")
    await shop.fake.wait_for(lambda f: any(t.startswith("Model versions") for t in shop.texts_to(ADMIN)))
    assert "✅ base (#1" in shop.texts_to(ADMIN)[-1]


async def test_admin_rollback_switches_model_without_restart(shop: Running, engine_files: EngineFiles) -> None:
    small = await shop.svc.db.create_model_version("small", str(engine_files.weights), str(engine_files.small_index))
    small_ids = {f"p{i}" for i in range(8)}

    async def admin_says(command: str, args: str, expected_start: str) -> str:
        before = len(shop.texts_to(ADMIN))
        shop.fake.user_sends_command(ADMIN, command, args)
        await shop.fake.wait_for(lambda f: len(shop.texts_to(ADMIN)) > before)
        reply = shop.texts_to(ADMIN)[-1]
        assert reply.startswith(expected_start), reply
        return reply

    await admin_says("rollback", "nosuch", "❌ Nothing changed: no model version 'nosuch'")
    assert shop.svc.models.current.name == "base"
    await admin_says("rollback", "small", "✅ Now answering with small (8 products)")
    keyboard = await shop.search(120, make_image(77))
    [(version,)] = shop.rows("SELECT model_version_id FROM searches WHERE user_id=120")
    assert version == small.id
    shown = {r[0] for r in shop.rows("SELECT product_id FROM recommendations r JOIN searches s ON s.id=r.search_id WHERE s.user_id=120")}
    assert shown <= small_ids and len(shown) == 5
    assert shop.rows("SELECT name FROM model_versions WHERE is_active") == [("small",)]
    await admin_says("models", "", "Model versions")
    assert "✅ small" in shop.texts_to(ADMIN)[-1] and "• base" in shop.texts_to(ADMIN)[-1]
    await admin_says("rollback", "base", "✅ Now answering with base (16 products)")
    await admin_says("reload", "", "✅ Now answering with base (16 products)")
    await shop.search(121, make_image(77))
    assert shop.rows("SELECT model_version_id FROM searches WHERE user_id=121") == [(1,)]
    # a press on a keyboard from the previous model still counts
    await shop.press(120, keyboard, buttons(keyboard)[0][0]["callback_data"])
    assert len(shop.rows("SELECT 1 FROM feedback WHERE user_id=120")) == 1


async def seed_consistent_feedback(shop: Running, n: int, first_uid: int) -> None:
    """``n`` logged searches whose shoppers like products p0-p7 and dislike p8-p15 whenever shown: a
    taste the search does not know yet (logged through the same database calls the bot makes; the
    rating path itself is tested above)."""
    from ffengine.images import load_image

    model, db = shop.svc.models.current, shop.svc.db
    images = [load_image(make_image(3000 + i, size=(140, 180))) for i in range(n)]
    answers = await asyncio.to_thread(model.answer_photos, images, 5)
    for i, answer in enumerate(answers):
        record = await db.record_search(first_uid + i, None, answer.features, model.version_id, 50.0, "ok", [(r.product.id, r.distance) for r in answer.recommendations])
        for rec, rec_id in zip(answer.recommendations, record.recommendation_ids, strict=True):
            await db.rate(first_uid + i, rec_id, 1 if int(rec.product.id[1:]) < 8 else -1)


@dataclass(frozen=True)
class RetrainChat:
    """What the admin's chat got during one /retrain: new messages (in order) and the edits of the status message."""

    sent: list[str]
    edits: list[str]


def retrain_chat(shop: Running, since: int) -> RetrainChat:
    """The admin's messages and status-message edits among ``shop.fake.calls[since:]`` (in arrival order)."""
    calls = [c for c in shop.fake.calls[since:] if c.ok and c.params.get("chat_id") == ADMIN]
    sent = [c for c in calls if c.method == "sendMessage"]
    status = next((c.result["message_id"] for c in sent if c.params["text"] == RETRAIN_STARTED), None)
    edits = [c.params["text"] for c in calls if c.method == "editMessageText" and c.params.get("message_id") == status]
    return RetrainChat([c.params["text"] for c in sent], edits)


def percent(progress_line: str) -> int:
    """``"🏋️ Retraining: 65% held-out ..."`` -> 65."""
    return int(progress_line.removeprefix("🏋️ Retraining: ").split("%")[0])


async def test_admin_retrain_switches_to_the_new_version_and_rollback_switches_back(shop: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bot.retrain.EDIT_EVERY_S", 0.01)  # show (nearly) every progress line
    await seed_consistent_feedback(shop, 45, 2000)
    since = len(shop.fake.calls)
    shop.fake.user_sends_command(ADMIN, "retrain")
    shop.fake.user_sends_command(ADMIN, "retrain")  # only one at a time
    await shop.fake.wait_for(lambda f: any(t.startswith(("✅", "❌", "ℹ️")) for t in retrain_chat(shop, since).edits), timeout=120)
    chat = retrain_chat(shop, since)
    # the run's status message first, then the answer to the second /retrain: never the other way round
    assert chat.sent == [RETRAIN_STARTED, "⏳ A retraining is already running; I'll report when it is done."]
    # the status message then shows the run's steps in order, and ends as the result
    *progress, report = chat.edits
    assert len(progress) >= 3 and all(line.startswith("🏋️ Retraining: ") for line in progress), chat.edits
    assert [percent(line) for line in progress] == sorted(percent(line) for line in progress), chat.edits
    assert report.startswith("✅ Now answering with feedback-"), report
    assert "Metrics: searches=" in report and report.endswith(" s)")
    assert [m["text"] for m in shop.fake.messages_to(ADMIN)][-2:] == [report, chat.sent[1]]  # edited in place
    [(new_id, name)] = shop.rows("SELECT id, name FROM model_versions WHERE is_active")
    assert name.startswith("feedback-") and shop.svc.models.current.name == name
    assert shop.rows("SELECT status FROM training_runs ORDER BY id DESC LIMIT 1") == [("succeeded",)]
    await shop.search(2100, make_image(78))
    assert shop.rows("SELECT model_version_id FROM searches WHERE user_id=2100") == [(new_id,)]
    shop.fake.user_sends_command(ADMIN, "rollback", "base")
    await shop.fake.wait_for(lambda f: shop.texts_to(ADMIN)[-1].startswith("✅ Now answering with base"))
    await shop.search(2101, make_image(78))
    assert shop.rows("SELECT model_version_id FROM searches WHERE user_id=2101") == [(1,)]
    assert shop.rows("SELECT name FROM model_versions WHERE is_active") == [("base",)]


async def test_admin_sees_every_retrain_step_in_order_then_the_result(shop: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bot's side of /retrain with a scripted training: each step shown once it is reported, from the
    training's worker threads too, and a step reported just before the end never hides the result."""
    monkeypatch.setattr("bot.retrain.EDIT_EVERY_S", 0.01)
    steps = [(0.02, "reading the index of base"), (0.3, "learning: metric step 60/200"), (0.9, "writing the index")]
    since = len(shop.fake.calls)

    async def train(db: Any, settings: Any, progress: Callable[[float, str], None]) -> TrainingResult:
        for shown, (fraction, text) in enumerate(steps, start=1):
            await asyncio.to_thread(progress, fraction, text)  # train/ reports from worker threads
            await shop.fake.wait_for(lambda f: len(retrain_chat(shop, since).edits) == shown)
        progress(1.0, "done")  # the result follows at once: this line may be skipped, never shown after it
        return TrainingResult("insufficient", None, {"searches": 3, "pairs": 0}, "not enough feedback yet")

    monkeypatch.setattr(shop.svc.retrainer, "train", train)
    shop.fake.user_sends_command(ADMIN, "retrain")
    await shop.fake.wait_for(lambda f: any(t.startswith("ℹ️") for t in retrain_chat(shop, since).edits))
    await asyncio.sleep(0.1)  # an edit still in flight would arrive now
    chat = retrain_chat(shop, since)
    assert chat.sent == [RETRAIN_STARTED]
    assert chat.edits[:3] == [f"🏋️ Retraining: {f:.0%} {t}" for f, t in steps]
    assert chat.edits[3:-1] in ([], ["🏋️ Retraining: 100% done"])
    assert chat.edits[-1].startswith("ℹ️ No new model version.\nnot enough feedback yet\nMetrics: searches=3, pairs=0\n("), chat.edits
    assert shop.fake.messages_to(ADMIN)[-1]["text"] == chat.edits[-1]
    assert not shop.svc.retrainer.running


async def test_web_photos_are_sent_by_url_and_an_unreachable_one_still_gets_an_answer(shop: Running, engine_files: EngineFiles) -> None:
    await shop.svc.db.create_model_version("remote", str(engine_files.weights), str(engine_files.remote_index))
    await shop.svc.models.activate(shop.svc.db, "remote")
    try:
        jpeg = make_image(61)
        await shop.search(150, jpeg)
        [first] = shop.fake.calls_of("sendMediaGroup", chat_id=150)
        assert [m.kind for m in first.media] == ["url"] * 5 and all(m.ref.startswith(REMOTE) for m in first.media)
        await wait_file_ids_stored(shop, 150)
        await shop.search(151, jpeg)
        assert [m.kind for m in shop.fake.calls_of("sendMediaGroup", chat_id=151)[0].media] == ["file_id"] * 5
        # a product whose photo Telegram cannot fetch: the answer comes as text, with the same keyboard
        unseen = {f"p{i}" for i in range(8)} - {r[0] for r in shop.rows("SELECT id FROM products WHERE photo_file_id IS NOT NULL")}
        for pid in unseen:
            shop.fake.fail_url(f"{REMOTE}/{pid}.jpg")
        jpeg = await first_image_showing(shop, unseen)
        keyboard = await shop.search(152, jpeg)
        listing = next(m["text"] for m in shop.fake.messages_to(152) if m.get("text", "").startswith("1. Product "))
        assert listing.count("https://shop.example/p/") == 5 and len(buttons(keyboard)) == 5
    finally:
        await shop.svc.models.activate(shop.svc.db, "base")


async def first_image_showing(shop: Running, products: set[str]) -> bytes:
    """A generated picture whose answer (by the current model) includes one of ``products``."""
    from ffengine.images import load_image

    candidates = [make_image(n) for n in range(200, 260)]
    answers = await asyncio.to_thread(shop.svc.models.current.answer_photos, [load_image(c) for c in candidates], 5)
    return next(c for c, a in zip(candidates, answers, strict=True) if products & {r.product.id for r in a.recommendations})


async def test_stale_photo_file_ids_are_replaced(shop: Running) -> None:
    jpeg = make_image(55)
    await shop.search(130, jpeg)
    shown = await wait_file_ids_stored(shop, 130)
    # BEGIN IMMEDIATE: a deferred transaction that reads before it writes fails at once ("database is locked",
    # no busy wait) if the running bot commits in between
    with contextlib.closing(sqlite3.connect(shop.data_dir / "ff.db", timeout=30, isolation_level="IMMEDIATE")) as con, con:
        con.executemany("UPDATE products SET photo_file_id='AgACAgStale' WHERE id=?", [(p,) for p in shown])
    await shop.search(131, jpeg)
    tries = shop.fake.calls_of("sendMediaGroup", chat_id=131)
    assert [c.status for c in tries] == [400, 200] and [m.kind for m in tries[1].media] == ["upload"] * 5
    await shop.fake.wait_for(lambda f: all(fid != "AgACAgStale" for _, fid in shop.rows("SELECT id, photo_file_id FROM products")))
    fresh = dict(shop.rows("SELECT id, photo_file_id FROM products"))
    assert {fresh[p] for p in shown} == {m["photo"][-1]["file_id"] for m in shop.fake.messages_to(131) if "photo" in m}


#: Product pages Telegram refuses as link buttons; the long one would also make a caption too long.
REFUSED_LINKS = ("https://shop.example/" + "x" * 3000, "http://localhost:8080/p", "http://10.0.0.1/p", "http://intranet/p")


def refused_link(product: Any) -> Any:
    """Half the products get the long link, the others the rest: any five shown include both kinds."""
    n = int(product.id[1:])
    return dataclasses.replace(product, url=REFUSED_LINKS[0 if n % 2 == 0 else 1 + n // 2 % 3])


def write_variant(engine_files: EngineFiles, out: Path, change: Callable[[Any], Any]) -> Path:
    """The small index again, each product changed by ``change`` (an index as an older import could have written it)."""
    from ffengine.index import Index, write_index

    small = Index.load(engine_files.small_index)
    write_index(out, small.features, [change(p) for p in small.products], fingerprint=small.fingerprint, catalog_hash=out.name)
    return out


async def switched_to(shop: Running, engine_files: EngineFiles, name: str, index: Path) -> None:
    await shop.svc.db.create_model_version(name, str(engine_files.weights), str(index))
    await shop.svc.models.activate(shop.svc.db, name)


async def test_product_links_telegram_refuses_still_leave_a_working_rating_keyboard(
    shop: Running, engine_files: EngineFiles, tmp_path: Path
) -> None:
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup
    from telegram.error import BadRequest

    index = write_variant(engine_files, tmp_path / "bad-links", refused_link)
    await switched_to(shop, engine_files, "bad-links", index)
    try:
        uid = 160
        keyboard = await shop.search(uid, make_image(62))
        rows = buttons(keyboard)
        assert len(rows) == 5 and all([b["text"] for b in row] == [f"{rank} 👍", f"{rank} 👎", f"{rank} 🔁"] for rank, row in enumerate(rows, 1))
        album = [m for m in shop.fake.messages_to(uid) if "photo" in m]
        assert len(album) == 5 and not any(REFUSED_LINKS[0] in m["caption"] for m in album)  # too long for a caption
        await shop.press(uid, keyboard, rows[0][0]["callback_data"])
        assert shop.rows("SELECT value FROM feedback WHERE recommendation_id=?", int(rows[0][0]["callback_data"].split(":")[1])) == [(1,)]
        for link in REFUSED_LINKS:  # the fake refuses each of these links as Telegram does
            with pytest.raises(BadRequest, match="(?i)button_url_invalid"):
                await shop.app.bot.send_message(uid, "x", reply_markup=InlineKeyboardMarkup([[InlineKeyboardButton("a", url=link)]]))
    finally:
        await shop.svc.models.activate(shop.svc.db, "base")


async def test_a_link_telegram_refuses_anyway_costs_only_the_link_buttons(shop: Running, caplog: pytest.LogCaptureFixture) -> None:
    uid = 161
    caplog.set_level(logging.WARNING, logger="bot.handlers.search")
    shop.fake.fail_next("sendMessage", status=400, description="Bad Request: BUTTON_URL_INVALID")  # the keyboard message
    keyboard = await shop.search(uid, make_image(63))
    assert [c.status for c in shop.fake.calls_of("sendMessage", chat_id=uid)] == [400, 200]
    rows = buttons(keyboard)
    assert len(rows) == 5 and all([b["text"][2:] for b in row] == ["👍", "👎", "🔁"] for row in rows)  # the rating buttons, without the links
    await shop.press(uid, keyboard, rows[1][1]["callback_data"])
    assert shop.rows("SELECT value FROM feedback WHERE recommendation_id=?", int(rows[1][1]["callback_data"].split(":")[1])) == [(-1,)]
    await shop.fake.wait_for(lambda f: [b["text"] for b in buttons(f.message(uid, keyboard["message_id"]))[1]] == ["2 👍", "✅2 👎", "2 🔁"])
    assert any("rating keyboard refused" in r.getMessage() and "button_url_invalid" in r.getMessage().lower() for r in caplog.records)


async def test_a_photo_path_swapped_for_a_link_after_import_is_never_uploaded(shop: Running, engine_files: EngineFiles, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(make_image(999))  # a picture, so only the path check can keep it from the shopper
    photos = (tmp_path / "photos").resolve()
    photos.mkdir()

    def copied(product: Any) -> Any:
        path = photos / f"{product.id}.jpg"
        path.write_bytes(Path(product.image).read_bytes())
        return dataclasses.replace(product, image=str(path))

    index = write_variant(engine_files, tmp_path / "swapped", copied)
    for photo in photos.iterdir():  # after the import: every photo now leads to another file
        photo.unlink()
        photo.symlink_to(secret)
    await switched_to(shop, engine_files, "swapped", index)
    try:
        uid = 162
        keyboard = await shop.search(uid, make_image(64))
        assert len(buttons(keyboard)) == 5
        uploads = [m for c in shop.fake.calls_of("sendMediaGroup") + shop.fake.calls_of("sendPhoto") for m in c.media if m.kind == "upload"]
        assert secret.read_bytes() not in {m.data for m in uploads}
        assert any(t.startswith("1. Product ") for t in shop.texts_to(uid))  # the products came as text instead
    finally:
        await shop.svc.models.activate(shop.svc.db, "base")


async def test_a_user_who_blocked_the_bot_costs_nothing(shop: Running, caplog: pytest.LogCaptureFixture) -> None:
    uid = 135
    caplog.set_level(logging.INFO, logger="bot.handlers.errors")
    shop.fake.user_blocks_bot(uid)
    shop.fake.user_sends_photo(uid, make_image(15))
    await shop.fake.wait_for(lambda f: any("could not answer update" in r.getMessage() and f"user {uid}" in r.getMessage() for r in caplog.records))
    assert not [t for t in shop.texts_to(ADMIN) if t.startswith("⚠️")]  # not an error worth an admin's time
    await shop.search(136, make_image(15))  # everyone else is served


async def test_errors_are_logged_apologised_for_and_sent_to_admins_rate_limited(shop: Running, caplog: pytest.LogCaptureFixture) -> None:
    shop.fake.add_user(ADMIN)
    def alerts() -> list[str]:
        return [t for t in shop.texts_to(ADMIN) if t.startswith("⚠️")]

    assert not alerts()
    for uid in (140, 141):
        shop.fake.fail_next("sendMessage", status=500, description="Internal Server Error")  # the keyboard message
        shop.fake.user_sends_photo(uid, make_image(uid))
        await shop.wait_text(uid, texts.APOLOGY)
        assert len([m for m in shop.fake.messages_to(uid) if "photo" in m]) == 5  # it failed after the album
        await shop.fake.wait_for(lambda f: len(alerts()) == 1)
    await asyncio.sleep(0.3)
    assert len(alerts()) == 1  # the second error within the interval is held back
    assert "NetworkError" in alerts()[0] and "from user 140" in alerts()[0] and TOKEN not in alerts()[0]
    assert any("error while handling update" in r.getMessage() and "user 141" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- bots of their own (other settings)


async def test_full_queue_answers_busy(engine_files: EngineFiles, tmp_path: Path) -> None:
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path, BOT_QUEUE_SIZE="2", BOT_BATCH_SIZE="1") as bot:
        users = [201, 202, 203, 204, 205]
        gate = threading.Event()
        blocker = bot.svc.batcher._executor.submit(gate.wait, 30)
        try:
            for uid in users[:3]:  # one in the model's hands, two waiting: full
                fake.user_sends_photo(uid, make_image(uid))
            await fake.wait_for(lambda f: bot.svc.batcher.depth == 3)
            for uid in users[3:]:
                fake.user_sends_photo(uid, make_image(uid))
            for uid in users[3:]:
                await bot.wait_text(uid, texts.BUSY)
        finally:
            gate.set()
            blocker.result(timeout=5)
        await fake.wait_for(lambda f: all(len(bot.keyboards(uid)) == 1 for uid in users[:3]))
        assert bot.rows("SELECT user_id, outcome FROM searches ORDER BY user_id") == [
            (201, "ok"), (202, "ok"), (203, "ok"), (204, "busy"), (205, "busy")
        ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_webhook_mode_checks_the_secret_and_serves_health(engine_files: EngineFiles, tmp_path: Path) -> None:
    import aiohttp

    port = free_port()
    hook = f"http://127.0.0.1:{port}/tg-hook"
    async with (
        FakeBotAPI(token=TOKEN) as fake,
        start_bot(fake, engine_files, tmp_path, BOT_MODE="webhook", BOT_WEBHOOK_URL=hook, BOT_WEBHOOK_PORT=str(port)) as bot,
        aiohttp.ClientSession() as http,
    ):
        assert fake.webhook is not None and fake.webhook["url"] == hook
        assert fake.webhook["secret_token"] == bot.settings.webhook_secret
        # Telegram (the fake, with the secret) delivers a photo; the bot answers as in polling mode
        await bot.search(301, make_image(21))
        assert not fake.calls_of("getUpdates")
        # anyone else is refused before the update reaches the bot
        update = {"update_id": 999_001, "message": {"message_id": 1, "date": 0, "chat": {"id": 302, "type": "private"},
                                                    "from": {"id": 302, "is_bot": False, "first_name": "M"}, "text": "/stats"}}  # fmt: skip
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
            async with http.post(hook, json=update, headers=headers) as resp:
                assert resp.status == 403
        async with http.post(hook, data=b"not json", headers={"X-Telegram-Bot-Api-Secret-Token": bot.settings.webhook_secret}) as resp:
            assert resp.status == 400
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
            health = await resp.json()
        assert health["status"] == "ok" and health["model_version"] == "base" and health["queue_depth"] == 0
        await asyncio.sleep(0.3)
        assert fake.messages_to(302) == []  # the forged update was never handled


async def test_first_start_builds_the_index_and_registers_the_base_version(engine_files: EngineFiles, tmp_path: Path) -> None:
    index = tmp_path / "built-index"
    extra = {"FFENGINE_INDEX": str(index), "FFENGINE_CATALOG": str(engine_files.catalog)}
    async with FakeBotAPI(token=TOKEN) as fake:
        async with start_bot(fake, engine_files, tmp_path, **extra) as bot:
            assert (index / "manifest.json").is_file()
            await bot.search(401, make_image(3))
            assert bot.rows("SELECT name, index_dir, is_active FROM model_versions") == [("base", str(index), 1)]
            assert bot.rows("SELECT count(*) FROM products") == [(N_PRODUCTS,)]
        stamp = (index / "manifest.json").stat().st_mtime_ns
        async with start_bot(fake, engine_files, tmp_path, **extra) as bot:  # a restart reuses everything
            await bot.search(401, make_image(4))
            assert bot.rows("SELECT count(*) FROM model_versions") == [(1,)]
            assert bot.rows("SELECT count(*) FROM searches WHERE outcome='ok'") == [(2,)]
        assert (index / "manifest.json").stat().st_mtime_ns == stamp


async def test_no_index_and_no_catalogue_stops_start_up_with_a_clear_message(engine_files: EngineFiles, tmp_path: Path) -> None:
    from ffengine.errors import ConfigError

    async with FakeBotAPI(token=TOKEN) as fake:
        settings = BotSettings.from_env(bot_env(fake, engine_files, tmp_path, FFENGINE_INDEX=str(tmp_path / "none")))
        app = build_application(settings)
        with pytest.raises(ConfigError, match="FFENGINE_CATALOG is not set"):
            async with running(app, settings):
                pass
        assert not fake.calls_of("getUpdates")


async def test_shutdown_lets_searches_in_flight_finish(engine_files: EngineFiles, tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """A search answered while the bot stops: its answer, its log and its album's file_ids all arrive, without PTB warnings."""
    from telegram.warnings import PTBUserWarning

    async with FakeBotAPI(token=TOKEN) as fake:
        starting = start_bot(fake, engine_files, tmp_path)
        bot = await starting.__aenter__()
        gate = threading.Event()
        blocker = bot.svc.batcher._executor.submit(gate.wait, 30)
        fake.user_sends_photo(501, make_image(5))
        await fake.wait_for(lambda f: bot.svc.batcher.depth == 1)
        stopping = asyncio.create_task(starting.__aexit__(None, None, None))
        await asyncio.sleep(0.5)
        assert not stopping.done()  # waiting for the search
        gate.set()
        blocker.result(timeout=5)
        await asyncio.wait_for(stopping, 30)
        assert len(bot.keyboards(501)) == 1
        assert bot.rows("SELECT outcome FROM searches WHERE user_id=501") == [("ok",)]
        assert "services" not in bot.app.bot_data  # the services closed: queue drained, database closed
        # the album was sent while stopping: storing its photos' file_ids (a background task) was awaited, not lost
        assert bot.rows("SELECT count(*) FROM products WHERE photo_file_id IS NOT NULL") == [(5,)]
        assert [str(w.message) for w in recwarn if issubclass(w.category, PTBUserWarning)] == []
