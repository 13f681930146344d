"""/forget against what the same shopper does at the same moment, and the faults around it
(issue #20's probe): a photo sent right before it, a rating or "more like this" pressed around
it, forged ids no column can hold, a webhook secret that is not UTF-8, a full disk.

The bot tests drive the unmodified bot (in-process, polling the fake Bot API over loopback
HTTP) on a real SQLite file and, where ``FF_TEST_POSTGRES_URL`` names a server, on a fresh
PostgreSQL database; rows are read back through a separate connection pool. The full disk is
a real one (a small tmpfs; skipped where this process may not mount it), and SQLite's page
limit stands in for it in the storage-only test that runs everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from bot import texts
from ffengine.db import Database, FeedbackRefused, Origin, StorageUnavailable
from tests.conftest import make_image
from tests.fake_bot_api import FakeBotAPI
from tests.pg_cluster import fresh_database
from tests.test_bot import (  # noqa: F401 - engine_files is a fixture
    ADMIN,
    TOKEN,
    EngineFiles,
    Running,
    buttons,
    engine_files,
    free_port,
    last_answer,
    start_bot,
)
from tests.test_bot_faults import alerts

PG_URL = os.environ.get("FF_TEST_POSTGRES_URL", "")
USERS = 30
#: Every table that holds a shopper's rows (the user, their searches and what hangs off them).
USER_TABLES = ("users", "searches", "recommendations", "search_items", "search_origins", "feedback")
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="set FF_TEST_POSTGRES_URL to run")),
]


@contextlib.asynccontextmanager
async def database_url(backend: str, data_dir: Path) -> AsyncIterator[str]:
    """A fresh database of ``backend`` for one bot."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{data_dir / 'ff.db'}"
        return
    async with fresh_database(PG_URL) as url:
        yield url


@contextlib.asynccontextmanager
async def shop_on(backend: str, files: EngineFiles, data_dir: Path, **extra: str) -> AsyncIterator[Running]:
    async with database_url(backend, data_dir) as url, FakeBotAPI(token=TOKEN) as fake:
        fake.add_user(ADMIN)
        async with start_bot(fake, files, data_dir, DATABASE_URL=url, **extra) as bot:
            yield bot


async def table_rows(url: str) -> dict[str, int]:
    """How many rows each user table holds, read through a pool of its own (committed rows only)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return {t: (await conn.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one() for t in USER_TABLES}
    finally:
        await engine.dispose()


async def nothing_kept(url: str) -> bool:
    return await table_rows(url) == dict.fromkeys(USER_TABLES, 0)


async def searched(bot: Running, users: range) -> dict[int, dict]:
    """Each user's rating keyboard, all searching at once."""
    keyboards = await asyncio.gather(*(bot.search(uid, make_image(uid, size=(160, 200))) for uid in users))
    return dict(zip(users, keyboards, strict=True))


def answers(bot: Running) -> dict[str, dict]:
    """The bot's answer to each callback query, by query id."""
    return {c.params["callback_query_id"]: c.params for c in bot.fake.calls_of("answerCallbackQuery")}


def press(bot: Running, uid: int, keyboard: dict, row: int, column: int) -> str:
    """Press a button of the keyboard (without waiting); the callback query's id."""
    data = buttons(keyboard)[row][column]["callback_data"]
    return bot.fake.user_presses_button(uid, keyboard["message_id"], data)["callback_query"]["id"]


def forget_replies(bot: Running, uid: int) -> list[str]:
    done = texts.FORGOTTEN.split("{")[0]
    return [t for t in bot.texts_to(uid) if t.startswith(done) or t in (texts.FORGET_WAIT, texts.NOTHING_TO_FORGET)]


@contextlib.contextmanager
def model_held(bot: Running) -> Iterator[None]:
    """Occupy the single model thread, so that searches wait in the queue while the body runs."""
    gate = threading.Event()
    blocker = bot.svc.batcher._executor.submit(gate.wait, 60)
    try:
        yield
    finally:
        gate.set()
        blocker.result(timeout=5)


# ---------------------------------------------------------------- /forget and what the shopper did just before


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_forget_right_after_a_photo_waits_for_its_search_and_erases_it(
    backend: str, engine_files: EngineFiles, tmp_path: Path
) -> None:
    users = range(2000, 2000 + USERS)
    async with shop_on(backend, engine_files, tmp_path) as bot:
        await searched(bot, users)  # something to erase already, so "erased" is said
        with model_held(bot):  # the photos are still being searched when the /forget arrives
            for uid in users:
                bot.fake.user_sends_photo(uid, make_image(uid + 1, size=(160, 200)))
                bot.fake.user_sends_command(uid, "forget")
            await bot.fake.wait_for(lambda f: bot.svc.batcher.depth == USERS, 60)
        await bot.fake.wait_for(lambda f: all(forget_replies(bot, u) for u in users), 120)
        await bot.fake.wait_for(lambda f: all(len(bot.keyboards(u)) == 2 for u in users))
        erased = texts.FORGOTTEN.format(searches=2, ratings=0)
        for uid in users:
            assert forget_replies(bot, uid) == [erased], uid
            [told] = [m["message_id"] for m in bot.fake.messages_to(uid) if m.get("text") == erased]
            assert told > bot.keyboards(uid)[-1]["message_id"]  # the photo was answered first
            assert texts.APOLOGY not in bot.texts_to(uid)
        assert await nothing_kept(bot.settings.database_url)
        assert not alerts(bot)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_presses_around_a_forget_are_answered_and_nothing_outlives_it(
    backend: str, engine_files: EngineFiles, tmp_path: Path
) -> None:
    users = range(3000, 3000 + USERS)
    async with shop_on(backend, engine_files, tmp_path) as bot:
        keyboards = await searched(bot, users)
        pressed: dict[int, tuple[str, str, str]] = {}
        for uid, keyboard in keyboards.items():
            more = press(bot, uid, keyboard, 0, -1)  # 🔁 of the first product
            like = press(bot, uid, keyboard, 1, 0)  # 👍 of the second
            bot.fake.user_sends_command(uid, "forget")
            pressed[uid] = (more, like, press(bot, uid, keyboard, 2, 0))  # and a 👍 after it
        queries = [q for three in pressed.values() for q in three]
        await bot.fake.wait_for(lambda f: all(q in answers(bot) for q in queries), 120)
        await bot.fake.wait_for(lambda f: all(forget_replies(bot, u) for u in users))
        for uid, (more, like, late) in pressed.items():
            got = answers(bot)
            assert (got[more]["text"], got[like]["text"]) == (texts.SEARCHING, texts.RATED[1]), uid
            assert (got[late]["text"], got[late]["show_alert"]) == (texts.EXPIRED, True), uid
            assert forget_replies(bot, uid) == [texts.FORGOTTEN.format(searches=2, ratings=1)], uid
            assert texts.APOLOGY not in bot.texts_to(uid)
        assert await nothing_kept(bot.settings.database_url)
        assert not alerts(bot)


async def test_a_forget_behind_a_search_that_takes_too_long_erases_nothing_and_says_so(
    engine_files: EngineFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.handlers import privacy

    uid = 2500
    monkeypatch.setattr(privacy, "EARLIER_WAIT_S", 0.2)
    async with shop_on("sqlite", engine_files, tmp_path) as bot:
        with model_held(bot):
            bot.fake.user_sends_photo(uid, make_image(25))
            bot.fake.user_sends_command(uid, "forget")
            await bot.wait_text(uid, texts.FORGET_WAIT)
        await bot.fake.wait_for(lambda f: len(bot.keyboards(uid)) == 1, 60)
        assert (await table_rows(bot.settings.database_url))["searches"] == 1  # nothing was erased: "wait" was true
        bot.fake.user_sends_command(uid, "forget")
        await bot.wait_text(uid, texts.FORGOTTEN.format(searches=1, ratings=0))
        assert await nothing_kept(bot.settings.database_url)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_more_like_this_whose_search_another_replica_erased_is_told_expired(
    backend: str, engine_files: EngineFiles, tmp_path: Path
) -> None:
    uid = 2600
    async with shop_on(backend, engine_files, tmp_path) as bot:
        keyboard = (await searched(bot, range(uid, uid + 1)))[uid]
        other_replica = await Database.open(bot.settings.database_url)
        try:
            with model_held(bot):
                press(bot, uid, keyboard, 0, -1)
                await bot.fake.wait_for(lambda f: uid in bot.svc.in_flight)  # looked up; its search waits for the model
                assert await other_replica.forget_user(uid) > 0
            await bot.wait_text(uid, texts.EXPIRED)
        finally:
            await other_replica.close()
        assert texts.APOLOGY not in bot.texts_to(uid) and not alerts(bot)
        assert await nothing_kept(bot.settings.database_url)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_photo_search_another_replica_erased_while_it_ran_is_not_kept(
    backend: str, engine_files: EngineFiles, tmp_path: Path
) -> None:
    uids = range(2700, 2700 + USERS)
    async with shop_on(backend, engine_files, tmp_path) as bot:
        await searched(bot, uids)  # each has a search to erase
        other_replica = await Database.open(bot.settings.database_url)
        try:
            with model_held(bot):  # the photos wait for the model while another replica takes each /forget
                photos = {uid: bot.fake.user_sends_photo(uid, make_image(uid + 7, size=(160, 200))) for uid in uids}
                await bot.fake.wait_for(lambda f: bot.svc.batcher.depth == USERS, 60)
                for uid, update in photos.items():  # that /forget came in after the photo: a later update id
                    assert await other_replica.forget_user(uid, update_id=update["update_id"] + 1) > 0
            albums = lambda u: [c for c in bot.fake.calls_of("sendMediaGroup", chat_id=u) if c.status == 200]  # noqa: E731
            await bot.fake.wait_for(lambda f: all(len(albums(u)) == 2 for u in uids), 60)
            await asyncio.sleep(0.5)  # time for a keyboard or an apology, were there to be one
            # a later photo of the same user (after their /forget) is kept as usual
            later = await bot.search(uids[0], make_image(9))
        finally:
            await other_replica.close()
        for uid in uids:
            assert len(bot.keyboards(uid)) == 1 + (uid == uids[0]), uid  # the album came, no buttons for rows not kept
            assert texts.APOLOGY not in bot.texts_to(uid)
        assert not alerts(bot)
        rows = await table_rows(bot.settings.database_url)
        assert (rows["users"], rows["searches"], rows["recommendations"]) == (1, 1, 5) and later


# ---------------------------------------------------------------- an erase racing the shopper's writes, in the database


@pytest.mark.skipif(not PG_URL, reason="set FF_TEST_POSTGRES_URL to run")
async def test_erases_racing_ratings_and_searches_from_buttons_never_deadlock_on_postgresql() -> None:
    """Two replicas on one server: one erases each user while the other logs a "more like this"
    of theirs and a rating. Each write lands wholly before the erase (and is erased) or is refused."""
    users = range(1, USERS + 1)
    emb = np.zeros(1280, np.float32)
    shown = [(f"p{i}", 0.1 * i) for i in range(5)]
    async with fresh_database(PG_URL) as url:
        eraser, writer = await Database.open(url), await Database.open(url)
        try:
            parents = [await writer.record_search(u, "AQAD", emb, None, 1.0, "ok", shown) for u in users]
            firsts = zip(users, (p.recommendation_ids[0] for p in parents), strict=True)
            origins = [Origin.more_like(await writer.pressed_recommendation(u, r)) for u, r in firsts]
            work = [
                job
                for user, parent, origin in zip(users, parents, origins, strict=True)
                for job in (
                    writer.record_search(user, None, emb, None, 1.0, "ok", shown, origin=origin),
                    writer.rate(user, parent.recommendation_ids[1], 1),
                    eraser.forget_user(user),
                )
            ]
            results = await asyncio.gather(*work, return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException) and not isinstance(r, FeedbackRefused)] == []
            assert await nothing_kept(url)
        finally:
            await eraser.close()
            await writer.close()


# ---------------------------------------------------------------- forged ids and webhook secrets


@pytest.mark.parametrize("backend", BACKENDS)
async def test_forged_ids_too_big_for_their_columns_get_the_expired_alert(
    backend: str, engine_files: EngineFiles, tmp_path: Path
) -> None:
    uid = 4001
    forged = ["m:2147483648", "r:2147483648:+1", "i:2147483648:0", "m:999999999999999999", "r:9223372036854775807:-1"]
    async with shop_on(backend, engine_files, tmp_path) as bot:
        user = bot.fake.add_user(uid)
        for n, data in enumerate(forged):
            query = {"id": f"big-{n}", "from": user, "chat_instance": "1", "data": data}
            bot.fake.inject_update({"callback_query": query})
        ids = [f"big-{n}" for n in range(len(forged))]
        await bot.fake.wait_for(lambda f: all(i in answers(bot) for i in ids))
        got = answers(bot)
        assert [(got[i]["text"], got[i]["show_alert"]) for i in ids] == [(texts.EXPIRED, True)] * len(ids)
        await asyncio.sleep(0.3)
        assert not alerts(bot) and texts.APOLOGY not in bot.texts_to(uid)


async def post_raw(port: int, secret: bytes, body: bytes) -> bytes:
    """POST ``body`` to the webhook with ``secret`` as the header's very bytes (a client library would
    encode it); the status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        b"POST /tg-hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"X-Telegram-Bot-Api-Secret-Token: " + secret + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    writer.write(head + body)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return status_line.split()[1]


async def test_a_webhook_secret_that_is_not_utf8_is_refused_quietly(
    engine_files: EngineFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    hook = f"http://127.0.0.1:{port}/tg-hook"
    webhook = {"BOT_MODE": "webhook", "BOT_WEBHOOK_URL": hook, "BOT_WEBHOOK_PORT": str(port)}
    async with shop_on("sqlite", engine_files, tmp_path, **webhook) as bot:
        body = b'{"update_id": 77, "message": {"message_id": 1, "date": 0, "chat": {"id": 5, "type": "private"}}}'
        secret = bot.settings.webhook_secret.encode()
        for given in (b"\xff", secret[:-1] + b"\xff", b"\xc3\x28" + secret):
            assert await post_raw(port, given, body) == b"403", given
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        await bot.search(4002, make_image(3))  # and it serves on


# ---------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(root: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted at ``root``; skips the test where this process may not mount one."""
    root.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("a full disk needs a small file system: mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill(disk: Path) -> None:
    """Take every byte left on ``disk``."""
    with (disk / "ballast").open("ab", buffering=0) as out:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while out.write(b"\0" * chunk):
                    pass


async def test_a_full_disk_gets_cant_save_for_a_rating_and_a_photo(engine_files: EngineFiles, tmp_path: Path) -> None:
    uid = 5001
    with small_disk(tmp_path / "disk") as disk:
        async with shop_on("sqlite", engine_files, disk) as bot:
            keyboard = await bot.search(uid, make_image(51))
            await asyncio.to_thread(fill, disk)
            await bot.press(uid, keyboard, buttons(keyboard)[0][0]["callback_data"])
            assert (last_answer(bot.fake)["text"], last_answer(bot.fake)["show_alert"]) == (texts.NOT_SAVED, True)
            bot.fake.user_sends_photo(uid, make_image(52))
            await bot.wait_text(uid, texts.STORAGE_DOWN)
            assert len([m for m in bot.fake.messages_to(uid) if "photo" in m]) == 10  # the second album was still shown
            assert texts.APOLOGY not in bot.texts_to(uid)
            await bot.fake.wait_for(lambda f: len(alerts(bot)) >= 1)
            assert "disk full" in alerts(bot)[0]
            (disk / "ballast").unlink()  # room again: the bot saves again without a restart
            await bot.press(uid, keyboard, buttons(keyboard)[0][0]["callback_data"])
            assert last_answer(bot.fake)["text"] == texts.RATED[1]


async def test_a_database_with_no_room_left_is_unavailable_not_an_error(db: Database) -> None:
    """The storage layer alone, on any machine: SQLite's page limit gives the error a full disk gives."""

    @event.listens_for(db._engine.sync_engine, "connect")
    def no_room(dbapi_connection: Any, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA max_page_count = 1")  # as many pages as it has: it cannot shrink
        cursor.close()

    await db._engine.dispose()  # the pooled connections had no limit
    results = [(f"p{i}", 0.1) for i in range(500)]  # more than the pages it has left can hold
    with pytest.raises(StorageUnavailable, match="disk full"):
        await db.record_search(7, "AQAD", np.zeros(1280, np.float32), None, 1.0, "ok", results)
