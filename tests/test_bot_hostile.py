"""Hostile pictures and floods sent to the real bot (fake Bot API over loopback): issue 20, items 1 to 4
and the per-user rate limit.

Decoder bombs are refused with a friendly line and logged by their kind, and a shopper sending an
ordinary photo while they arrive is answered as usual (how long that takes is ``bench/hostile.py``'s
to measure, not a test's).
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest

from bot import texts
from tests import hostile_images
from tests.conftest import make_image
from tests.fake_bot_api import FakeBotAPI
from tests.test_bot import TOKEN, EngineFiles, engine_files, start_bot  # noqa: F401 - engine_files is a fixture

pytestmark = pytest.mark.asyncio(loop_scope="function")

BOMBS = {  # uid: (file, name, MIME type, logged outcome)
    301: (hostile_images.progressive_scan_bomb(), "scans.jpg", "image/jpeg", "too_costly"),
    302: (hostile_images.tiff_tile_bomb(), "tile.tif", "image/tiff", "too_costly"),
    303: (hostile_images.bmp_rle_bomb(), "rle.bmp", "image/bmp", "unsupported"),
    304: (hostile_images.progressive_scan_bomb(6_000, 6_000), "scans2.jpg", "image/jpeg", "too_costly"),
    305: (hostile_images.tiff_tile_bomb(side=128), "tile2.tif", "image/tiff", "too_costly"),
    306: (hostile_images.bmp_rle_bomb(11_000), "rle2.bmp", "image/bmp", "unsupported"),
}
SHOPPER = 310


async def test_six_bombs_are_refused_and_a_shopper_meanwhile_is_answered(engine_files: EngineFiles, tmp_path: Path) -> None:
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path) as bot:
        for uid, (data, name, mime, _) in BOMBS.items():
            fake.user_sends_document(uid, data, file_name=name, mime_type=mime)
        fake.user_sends_photo(SHOPPER, make_image(7))
        exif = hostile_images.exif_bomb("PNG")
        fake.user_sends_document(SHOPPER + 1, exif, file_name="exif.png", mime_type="image/png")
        for uid in BOMBS:
            await fake.wait_for(lambda f, uid=uid: any(t.startswith("Sorry, I couldn't use that picture") for t in bot.texts_to(uid)))
        await fake.wait_for(lambda f: len(bot.keyboards(SHOPPER)) == 1 and len(bot.keyboards(SHOPPER + 1)) == 1, 60)
        logged = dict(bot.rows("SELECT user_id, outcome FROM searches"))
        assert logged == {**{uid: bomb[3] for uid, bomb in BOMBS.items()}, SHOPPER: "ok", SHOPPER + 1: "ok"}
        assert bot.svc.decoder.pending == 0


async def test_photos_wait_for_a_decode_thread_and_a_full_pool_answers_busy(engine_files: EngineFiles, tmp_path: Path) -> None:
    # room for three photos at the decoder (one thread, two waiting); the model's queue (the same setting, one in
    # the model's hands and two waiting) then takes all three, so "busy" can come from the decoder alone
    env = {"BOT_DECODE_THREADS": "1", "BOT_QUEUE_SIZE": "2"}
    admitted, refused = (320, 321, 322), 324
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path, **env) as bot:
        gate = threading.Event()
        blocker = bot.svc.decoder._executor.submit(gate.wait, 30)  # the only decode thread is held (outside the count)
        try:
            for uid in admitted:  # all admitted, all waiting for the thread
                fake.user_sends_photo(uid, make_image(uid))
            await fake.wait_for(lambda f: bot.svc.decoder.pending == len(admitted))
            fake.user_sends_photo(refused, make_image(24))  # no room left
            await bot.wait_text(refused, texts.BUSY)
            # other work of the bot's worker threads goes on: /privacy reads the database meanwhile
            fake.user_sends_command(323, "privacy")
            await fake.wait_for(lambda f: bool(bot.texts_to(323)))
        finally:
            gate.set()
            blocker.result(timeout=5)
        await fake.wait_for(lambda f: all(len(bot.keyboards(uid)) == 1 for uid in admitted), 60)
        assert dict(bot.rows("SELECT user_id, outcome FROM searches")) == {**dict.fromkeys(admitted, "ok"), refused: "busy"}


async def test_a_user_sending_photos_too_fast_is_asked_to_slow_down(engine_files: EngineFiles, tmp_path: Path) -> None:
    env = {"BOT_USER_SEARCH_BURST": "2", "BOT_USER_SEARCHES_PER_MINUTE": "1"}
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path, **env) as bot:
        uid, other = 330, 331
        await bot.search(uid, make_image(30))
        await bot.search(uid, make_image(31))
        third = fake.user_sends_photo(uid, make_image(32))
        await fake.wait_for(lambda f: any(t.startswith("🐢") for t in bot.texts_to(uid)))
        slow_down = next(t for t in bot.texts_to(uid) if t.startswith("🐢"))
        seconds = int(re.search(r"in (\d+) s", slow_down)[1])  # type: ignore[index]
        assert slow_down == texts.SLOW_DOWN.format(seconds=seconds) and 30 < seconds <= 60
        await bot.search(other, make_image(33))  # someone else is not held back
        await asyncio.sleep(0.3)
        assert len(bot.keyboards(uid)) == 2  # the third photo was neither searched nor downloaded
        assert bot.rows("SELECT user_id, count(*) FROM searches GROUP BY user_id ORDER BY user_id") == [(uid, 2), (other, 1)]
        third_file = third["message"]["photo"][-1]["file_id"]
        assert not [c for c in fake.calls_of("getFile") if c.params.get("file_id") == third_file]
