"""The bot when something under it fails: its database restarts, goes away or loses its file,
a /retrain is killed, a webhook body is hostile, an admin or the index is wrong.

Each test reproduces a probe against the real bot (in-process, or as ``python -m bot`` where
it must be killed) with the fake Bot API, and checks that people are told, nothing is lost
silently and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

from bot import texts
from bot.retrain import INTERRUPTED
from bot.retrain import STARTED as RETRAIN_STARTED
from ffengine.errors import FFError
from tests.conftest import make_image
from tests.fake_bot_api import FakeBotAPI
from tests.pg_cluster import own_postgres
from tests.test_bot import (  # noqa: F401 - engine_files is a fixture
    ADMIN,
    TOKEN,
    EngineFiles,
    Running,
    bot_env,
    buttons,
    engine_files,
    free_port,
    last_answer,
    start_bot,
)

REPO = Path(__file__).resolve().parents[1]


def alerts(bot: Running) -> list[str]:
    return [t for t in bot.texts_to(ADMIN) if t.startswith("⚠️")]


def likes(keyboard: dict) -> list[str]:
    return [row[0]["callback_data"] for row in buttons(keyboard)]


def recommendation(data: str) -> int:
    """``"r:17:+1"`` -> 17."""
    return int(data.split(":")[1])


async def press_and_redraw(bot: Running, uid: int, keyboard: dict, data: str) -> None:
    """Press, and wait until the handler is done (it redraws the keyboard after answering)."""
    before = len(bot.fake.calls_of("editMessageReplyMarkup"))
    await bot.press(uid, keyboard, data)
    await bot.fake.wait_for(lambda f: len(f.calls_of("editMessageReplyMarkup")) > before)


# ---------------------------------------------------------------- the database goes away


async def test_ratings_around_a_postgresql_restart_and_outage_are_answered_and_kept(engine_files: EngineFiles, tmp_path: Path) -> None:
    uid = 601
    with own_postgres() as cluster:
        async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path, DATABASE_URL=cluster.url) as bot:
            fake.add_user(ADMIN)
            keyboard = await bot.search(uid, make_image(31))
            a, b, c = likes(keyboard)[:3]
            await press_and_redraw(bot, uid, keyboard, a)  # the pool now holds connections to this server process
            assert last_answer(fake)["text"] == texts.RATED[1]

            await asyncio.to_thread(cluster.restart)
            await press_and_redraw(bot, uid, keyboard, b)  # the first database action after the restart
            assert last_answer(fake)["text"] == texts.RATED[1]

            await asyncio.to_thread(cluster.stop)
            await bot.press(uid, keyboard, c)  # answered, not left spinning
            assert last_answer(fake) == {**last_answer(fake), "text": texts.NOT_SAVED, "show_alert": True}
            await fake.wait_for(lambda f: len(alerts(bot)) == 1)
            assert "Ratings are not being saved" in alerts(bot)[0] and TOKEN not in alerts(bot)[0]
            assert texts.APOLOGY not in bot.texts_to(uid)

            await asyncio.to_thread(cluster.start)
            await press_and_redraw(bot, uid, keyboard, c)  # tapped again, as asked
            assert last_answer(fake)["text"] == texts.RATED[1]
            [search] = [s for s in await bot.svc.db.export_feedback(rated_only=True) if s.user_id == uid]
            assert {i.recommendation_id: i.rating for i in search.items if i.rating} == {recommendation(x): 1 for x in (a, b, c)}


async def test_a_deleted_database_file_is_told_to_the_shopper_and_the_admins(engine_files: EngineFiles, tmp_path: Path) -> None:
    uid = 611
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path) as bot:
        fake.add_user(ADMIN)
        keyboard = await bot.search(uid, make_image(32))
        first, second = likes(keyboard)[:2]
        await bot.press(uid, keyboard, first)
        assert last_answer(fake)["text"] == texts.RATED[1]
        (tmp_path / "ff.db").unlink()
        await bot.press(uid, keyboard, second)
        assert last_answer(fake)["text"] == texts.NOT_SAVED  # never "noted" for a rating that is lost
        await fake.wait_for(lambda f: len(alerts(bot)) == 1)
        assert "deleted or replaced" in alerts(bot)[0] and str(tmp_path / "ff.db") in alerts(bot)[0]


# ---------------------------------------------------------------- a killed /retrain

STUCK_BOT = """
import asyncio, sys
import train.feedback
from train.runs import training_run

async def stuck(db, settings, *, progress=None, options=None, activate=True):
    async with training_run(db, settings, "feedback", {{}}, progress) as run:
        half = settings.models_dir / "feedback-killed" / "index.tmp-half"
        half.mkdir(parents=True)
        (half / "features.npy").write_bytes(bytes(4096))
        await run.step(0.45, "learning: metric step 90/200")
        await asyncio.Event().wait()  # SIGKILL arrives here

train.feedback.retrain_from_feedback_async = stuck
from bot.__main__ import main
sys.exit(main([]))
"""


async def test_a_killed_retrain_is_closed_and_reported_at_the_next_start(engine_files: EngineFiles, tmp_path: Path) -> None:
    async with FakeBotAPI(token=TOKEN) as fake:
        env = {**os.environ, **bot_env(fake, engine_files, tmp_path), "PYTHONPATH": str(REPO)}
        with (tmp_path / "bot.log").open("wb") as log:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", textwrap.dedent(STUCK_BOT.format()), cwd=tmp_path, env=env, stdout=log, stderr=log
            )
            try:
                fake.user_sends_command(ADMIN, "retrain")

                def status_message() -> dict | None:
                    sent = [c for c in fake.calls_of("sendMessage", chat_id=ADMIN) if c.params["text"] == RETRAIN_STARTED and c.ok]
                    return fake.message(ADMIN, sent[0].result["message_id"]) if sent else None

                await fake.wait_for(lambda f: (status_message() or {}).get("text", "").startswith("🏋️ Retraining: 45%"), 180)
            finally:
                child.send_signal(signal.SIGKILL)
                await child.wait()
        half = tmp_path / "models" / "feedback-killed" / "index.tmp-half"
        assert half.is_dir()  # what the kill left: a running row, the message at 45%, half an index

        async with start_bot(fake, engine_files, tmp_path) as bot:
            assert bot.rows("SELECT status FROM training_runs") == [("failed",)]
            assert status_message()["text"] == INTERRUPTED.format(progress=0.45)  # type: ignore[index]
            assert not (tmp_path / "models" / "feedback-killed").exists()
            [(watched,)] = bot.rows("SELECT progress_message FROM training_runs")
            assert json.loads(watched) == {"chat_id": ADMIN, "message_id": status_message()["message_id"]}  # type: ignore[index]
            assert not bot.svc.retrainer.running


# ---------------------------------------------------------------- hostile or mistaken input


async def test_deeply_nested_json_at_the_webhook_is_refused_with_400(engine_files: EngineFiles, tmp_path: Path) -> None:
    import aiohttp

    port = free_port()
    hook = f"http://127.0.0.1:{port}/tg-hook"
    depth = 100_000
    body = b'{"update_id": 5, "message": ' + b"[" * depth + b"]" * depth + b"}"
    async with (
        FakeBotAPI(token=TOKEN) as fake,
        start_bot(fake, engine_files, tmp_path, BOT_MODE="webhook", BOT_WEBHOOK_URL=hook, BOT_WEBHOOK_PORT=str(port)) as bot,
        aiohttp.ClientSession() as http,
    ):
        headers = {"X-Telegram-Bot-Api-Secret-Token": bot.settings.webhook_secret, "Content-Type": "application/json"}
        async with http.post(hook, data=body, headers=headers) as resp:
            assert resp.status == 400
        await bot.search(621, make_image(33))  # and the bot serves on


async def test_rollback_to_a_number_no_id_can_be_gets_a_clear_reply(engine_files: EngineFiles, tmp_path: Path) -> None:
    async with FakeBotAPI(token=TOKEN) as fake, start_bot(fake, engine_files, tmp_path) as bot:
        for arg in ("9" * 40, "²"):
            before = len(bot.texts_to(ADMIN))
            fake.user_sends_command(ADMIN, "rollback", arg)
            await fake.wait_for(lambda f: len(bot.texts_to(ADMIN)) > before)
            assert bot.texts_to(ADMIN)[-1].startswith("❌ Nothing changed: no model version"), bot.texts_to(ADMIN)[-1]
        assert bot.svc.models.current.name == "base"


async def test_a_corrupt_index_stops_start_up_before_it_is_registered(engine_files: EngineFiles, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(engine_files.index, index)
    (index / "features.npy").write_bytes(b"broken")
    async with FakeBotAPI(token=TOKEN) as fake:
        with pytest.raises(FFError, match="corrupt"):
            async with start_bot(fake, engine_files, tmp_path, FFENGINE_INDEX=str(index)):
                pass
    with closing(sqlite3.connect(tmp_path / "ff.db")) as con:
        assert con.execute("SELECT name FROM model_versions").fetchall() == []  # a fixed index is registered next start


def test_a_fatal_signal_in_the_bot_leaves_a_traceback(tmp_path: Path) -> None:
    """SIGBUS (an SQLite ``-shm`` cut short under the bot) used to end it without a word in the log."""
    code = "import faulthandler, sys; from bot.__main__ import main; main([]); print(faulthandler.is_enabled())"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TELEGRAM_BOT_TOKEN": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr
