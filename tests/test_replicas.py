"""Several bot replicas on one database, in webhook mode behind a load balancer (the fake plays it).

The first tests run two real bots in-process on one SQLite file (the polling fallback: no
PostgreSQL needed). The end-to-end test runs two ``python -m bot`` processes against one real
PostgreSQL (``FF_TEST_POSTGRES_URL``, see ``.ci/start-postgres``) and the fake Bot API posting
updates to both in turn: a /retrain on A switches B, /rollback on B switches A, a re-delivered
update is handled once, a second /retrain is refused by the database's lock, and killing A in the
middle of a search loses neither the search nor a rating.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot import texts
from bot.retrain import STARTED as RETRAIN_STARTED
from tests.conftest import make_image
from tests.fake_bot_api import FakeBotAPI
from tests.pg_cluster import fresh_database
from tests.test_bot import (  # noqa: F401 - engine_files is a fixture
    ADMIN,
    TOKEN,
    EngineFiles,
    Running,
    bot_env,
    buttons,
    engine_files,
    free_port,
    start_bot,
)

REPO = Path(__file__).resolve().parents[1]
SYNC_S = "0.4"  # heartbeat and polling interval: a silent replica is dead after 2 s
ADMIN_URL = os.environ.get("FF_TEST_POSTGRES_URL", "")


def hook(port: int) -> str:
    return f"http://127.0.0.1:{port}/telegram"


def replica_env(port: int, name: str, public: str) -> dict[str, str]:
    return {
        "BOT_MODE": "webhook",
        "BOT_WEBHOOK_URL": public,
        "BOT_WEBHOOK_PORT": str(port),
        "BOT_REPLICA_NAME": name,
        "BOT_SYNC_INTERVAL": SYNC_S,
    }


async def health(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        return await resp.json()


async def serves_within(port: int, version: str, seconds: float) -> float:
    """How long until the replica on ``port`` answers with ``version``; fails after ``seconds``."""
    started = time.monotonic()
    while (await health(port))["model_version"] != version:
        assert time.monotonic() - started < seconds, f"replica on {port} still serves {(await health(port))['model_version']}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def admin_says(fake: FakeBotAPI, replica: int, command: str, args: str = "", starts: str = "") -> str:
    """Send an admin command to ``backends[replica]`` and return the bot's next message to the admin."""
    before = len([m for m in fake.messages_to(ADMIN) if "text" in m])
    fake.deliver_next_to(replica)
    fake.user_sends_command(ADMIN, command, args)
    await fake.wait_for(lambda f: len([m for m in f.messages_to(ADMIN) if "text" in m]) > before, 60)
    reply = [m["text"] for m in fake.messages_to(ADMIN) if "text" in m][before]
    assert reply.startswith(starts), reply
    return reply


# ---------------------------------------------------------------- two in-process replicas on SQLite


@contextlib.asynccontextmanager
async def two_bots(fake: FakeBotAPI, files: EngineFiles, data_dir: Path) -> AsyncIterator[tuple[Running, Running]]:
    ports = [free_port(), free_port()]
    public = hook(free_port())  # the load balancer's address: nothing listens there, the fake forwards
    fake.balance([hook(p) for p in ports])
    async with (
        start_bot(fake, files, data_dir, **replica_env(ports[0], "bot-a", public)) as a,
        start_bot(fake, files, data_dir, **replica_env(ports[1], "bot-b", public)) as b,
    ):
        yield a, b


async def test_replicas_on_sqlite_follow_a_rollback_and_handle_a_redelivered_update_once(engine_files: EngineFiles, tmp_path: Path) -> None:
    async with FakeBotAPI(token=TOKEN) as fake, two_bots(fake, engine_files, tmp_path) as (a, b):
        small = await a.svc.db.create_model_version("small", str(engine_files.weights), str(engine_files.small_index))
        reply = await admin_says(fake, 0, "models", starts="Model versions")
        assert "Answered by replica bot-a" in reply and "• bot-a: base" in reply and "• bot-b: base" in reply
        await admin_says(fake, 1, "rollback", "small", starts="✅ Now answering with small (8 products)")
        started = time.monotonic()
        await fake.wait_for(lambda f: a.svc.models.current.name == "small", 5)  # polling: no NOTIFY on SQLite
        assert time.monotonic() - started < 5
        reply = await admin_says(fake, 0, "reload", starts="✅ Now answering with small")
        assert "Answered by replica bot-a" in reply and "• bot-b: small" in reply

        # the same photo update delivered to both replicas at once, and once more later: one search, one answer
        update = fake.user_sends_photo(801, make_image(41))
        statuses = await asyncio.gather(*(fake.post_update(update, url) for url in fake.backends))
        await fake.wait_for(lambda f: len(a.keyboards(801)) == 1, 60)
        assert statuses == [200, 200] and await fake.post_update(update, fake.backends[1]) == 200
        await asyncio.sleep(0.3)
        assert len(a.keyboards(801)) == 1
        assert a.rows("SELECT model_version_id FROM searches WHERE user_id=801") == [(small.id,)]
        finished = "SELECT count(*) FROM processed_updates WHERE update_id=? AND finished_at IS NOT NULL"
        await fake.wait_for(lambda f: a.rows(finished, update["update_id"]) == [(1,)], 10)


async def test_a_catalogue_update_is_a_version_both_replicas_follow_with_the_product_table(engine_files: EngineFiles, tmp_path: Path) -> None:
    from ffengine.build import build_index
    from ffengine.embedder import Embedder
    from train.catalogue import update_catalogue_async

    shop = tmp_path / "shop"
    shutil.copytree(engine_files.catalog.parent, shop)
    await asyncio.to_thread(build_index, shop / "products.csv", tmp_path / "day1", Embedder.load(str(engine_files.weights), "cpu"), progress=False)
    async with FakeBotAPI(token=TOKEN) as fake, two_bots(fake, engine_files, tmp_path) as (a, b):
        await a.svc.db.create_model_version("day1", str(engine_files.weights), str(tmp_path / "day1"))
        await admin_says(fake, 0, "rollback", "day1", starts="✅ Now answering with day1")
        assert await a.svc.db.set_photo_file_id("p1", "AgAD-old-photo") and await a.svc.db.set_photo_file_id("p2", "AgAD-kept")
        lines = (shop / "products.csv").read_text().splitlines()  # the shop changes in place, overnight:
        (shop / "images" / "new.jpg").write_bytes(make_image(77, size=(90, 120)))
        (shop / "images" / "1.jpg").write_bytes(make_image(78, size=(120, 160)))  # p1's photo replaced under its name
        rows = [lines[0], *lines[2:], "new-1,New arrival,https://shop.example/new-1,images/new.jpg,999,INR,Shirts"]  # p0 gone
        (shop / "products.csv").write_text("\n".join(rows) + "\n")
        result = await update_catalogue_async(a.svc.db, a.settings.engine, shop / "products.csv", name="day2")
        assert (result.status, result.metrics["embedded"], result.metrics["reused"]) == ("promoted", 2, len(lines) - 3)
        await fake.wait_for(lambda f: a.svc.models.current.name == b.svc.models.current.name == "day2", 5)
        assert "new-1" in b.svc.models.current.recommender.row_by_id and "p0" not in a.svc.models.current.recommender.row_by_id
        await fake.wait_for(lambda f: a.rows("SELECT title FROM products WHERE id='new-1'") == [("New arrival",)], 5)
        assert await a.svc.db.get_photo_file_ids(["p1", "p2"]) == {"p2": "AgAD-kept"}  # p1's new photo is uploaded anew


async def test_a_replica_that_cannot_load_the_new_version_keeps_serving_and_tells_the_admins(engine_files: EngineFiles, tmp_path: Path) -> None:
    broken = tmp_path / "broken-index"
    broken.mkdir()
    async with FakeBotAPI(token=TOKEN) as fake, two_bots(fake, engine_files, tmp_path) as (a, b):
        fake.add_user(ADMIN)
        version = await a.svc.db.create_model_version("broken", str(engine_files.weights), str(broken))
        await a.svc.db.activate_model_version(version.id)  # e.g. `python -m train rollback` on a host that has the files
        await fake.wait_for(lambda f: sum("cannot load the active model version" in t for t in a.texts_to(ADMIN)) == 2, 10)
        assert a.svc.models.current.name == b.svc.models.current.name == "base"
        await a.search(802, make_image(42))
        assert a.rows("SELECT model_version_id FROM searches WHERE user_id=802") == [(1,)]
        reply = await admin_says(fake, 1, "models", starts="Model versions")
        assert "⚠️ bot-a: base" in reply and "⚠️ bot-b: base" in reply  # not (yet) the active one
        await asyncio.sleep(1)  # ticks go on without loading it again or alerting again
        assert sum("cannot load" in t for t in a.texts_to(ADMIN)) == 2


def test_the_replica_name_setting_is_checked() -> None:
    from bot.config import BotSettings
    from ffengine.errors import ConfigError

    env = {"TELEGRAM_BOT_TOKEN": TOKEN}
    assert BotSettings.from_env({**env, "BOT_REPLICA_NAME": "bot-1"}).replica_name == "bot-1"
    assert BotSettings.from_env(env).replica_name.endswith(f"-{os.getpid()}")
    with pytest.raises(ConfigError, match="BOT_REPLICA_NAME"):
        BotSettings.from_env({**env, "BOT_REPLICA_NAME": "no spaces"})


def test_the_deploy_example_is_a_valid_webhook_setup() -> None:
    """deploy/: the replicas' settings pass the bot's own checks, and every replica is behind the balancer."""
    from bot.config import BotSettings

    deploy = REPO / "deploy"
    env = dict(line.split("=", 1) for line in (deploy / "bot.env.example").read_text().splitlines() if line and not line.startswith("#"))
    settings = BotSettings.from_env({**env, "TELEGRAM_BOT_TOKEN": TOKEN, "BOT_REPLICA_NAME": "bot-1"})
    assert settings.mode == "webhook" and settings.webhook_listen == "0.0.0.0"
    assert make_url(settings.database_url).get_backend_name() == "postgresql"
    compose = (deploy / "compose.yaml").read_text()
    replicas = [line.strip().rstrip(":") for line in compose.splitlines() if line.startswith("  bot-")]
    assert len(replicas) >= 2
    balancer = (deploy / "Caddyfile").read_text()
    assert all(f"{name}:{settings.webhook_port}" in balancer for name in replicas)
    assert "FFENGINE_DATA_DIR" in compose and "/healthz" in balancer
    assert "BOT_REPLICA_NAME=%H-%i" in (deploy / "systemd" / "focusedfashion-bot@.service").read_text()


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze")
    shutil.copy(REPO / "deploy" / "systemd" / "focusedfashion-bot@.service", tmp_path)
    done = subprocess.run([analyze, "verify", str(tmp_path / "focusedfashion-bot@1.service")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "focusedfashion-bot" not in done.stderr, done.stderr


# ---------------------------------------------------------------- two processes on PostgreSQL

REPLICA = """
import asyncio, os, pathlib, sys, time

import train.feedback
from bot.models import ActiveModel
from train.runs import TrainingResult, training_run


async def quick_retrain(db, settings, *, progress=None, options=None, activate=True):
    # the real lock and run row; instead of learning, the test's small index as the new version, once told to go
    async with training_run(db, settings, "feedback", {}, progress) as run:
        await run.step(0.5, "waiting for the test")
        while not pathlib.Path(os.environ["FF_TEST_RETRAIN_GO"]).exists():
            await asyncio.sleep(0.05)
        name = f"quick-{time.time_ns()}"
        await db.create_model_version(name, os.environ["FFENGINE_WEIGHTS"], os.environ["FF_TEST_NEW_INDEX"])
        return await run.finish(TrainingResult("promoted", name, {"searches": 0}, "test retrain"))


answer = ActiveModel.answer_photos


def slow_when_told(self, images, k):
    flag = os.environ.get("FF_TEST_SLOW_FLAG")
    while flag and pathlib.Path(flag).exists():  # "mid-search" for as long as the test wants
        time.sleep(0.05)
    return answer(self, images, k)


train.feedback.retrain_from_feedback_async = quick_retrain
ActiveModel.answer_photos = slow_when_told
from bot.__main__ import main
sys.exit(main([]))
"""


@dataclass
class Replica:
    name: str
    port: int
    process: asyncio.subprocess.Process

    async def ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.returncode is None, f"replica {self.name} exited with {self.process.returncode}"
            with contextlib.suppress(aiohttp.ClientError):
                if (await health(self.port))["status"] == "ok":
                    return
            assert time.monotonic() < deadline, f"replica {self.name} did not start"
            await asyncio.sleep(0.2)


@dataclass
class Cluster:
    fake: FakeBotAPI
    a: Replica
    b: Replica
    probe: AsyncEngine
    tmp: Path

    async def rows(self, sql: str, **params: Any) -> list[tuple]:
        async with self.probe.connect() as conn:
            return [tuple(r) for r in await conn.execute(text(sql), params)]

    async def eventually(self, sql: str, expected: list[tuple], timeout: float = 30, **params: Any) -> None:
        """Wait until the query returns ``expected`` (handlers still finishing write last)."""
        deadline = time.monotonic() + timeout
        while (found := await self.rows(sql, **params)) != expected:
            assert time.monotonic() < deadline, f"{sql}: {found} != {expected}"
            await asyncio.sleep(0.05)

    def keyboards(self, uid: int) -> list[dict]:
        return [m for m in self.fake.messages_to(uid) if m.get("reply_markup") and m.get("text", "").startswith(texts.RESULTS)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pg_url() -> AsyncIterator[str]:
    if not ADMIN_URL:
        pytest.skip("set FF_TEST_POSTGRES_URL=postgresql+asyncpg://user@127.0.0.1:PORT/postgres (bash .ci/start-postgres) to run")
    async with fresh_database(ADMIN_URL, "ff_replicas") as url:
        yield url


async def start_replica(fake: FakeBotAPI, files: EngineFiles, tmp: Path, name: str, port: int, env: dict[str, str]) -> Replica:
    log = (tmp / f"{name}.log").open("wb")
    full = {**os.environ, **env, **replica_env(port, name, hook(free_port())), "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", textwrap.dedent(REPLICA), cwd=tmp, env=full, stdout=log, stderr=log)
    return Replica(name, port, process)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(pg_url: str, engine_files: EngineFiles, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("replicas")
    async with FakeBotAPI(token=TOKEN) as fake:
        env = {
            **bot_env(fake, engine_files, tmp / "data"),
            "DATABASE_URL": pg_url,
            "FF_TEST_RETRAIN_GO": str(tmp / "go"),
            "FF_TEST_NEW_INDEX": str(engine_files.small_index),
        }
        ports = [free_port(), free_port()]
        fake.balance([hook(p) for p in ports])
        fake.add_user(ADMIN)
        # both start at once on an empty database: one migrates and registers the base version, the other waits
        a = await start_replica(fake, engine_files, tmp, "replica-a", ports[0], {**env, "FF_TEST_SLOW_FLAG": str(tmp / "slow")})
        b = await start_replica(fake, engine_files, tmp, "replica-b", ports[1], env)
        probe = create_async_engine(pg_url)
        try:
            await asyncio.gather(a.ready(), b.ready())
            yield Cluster(fake, a, b, probe, tmp)
        finally:
            await probe.dispose()
            for replica in (a, b):
                if replica.process.returncode is None:
                    replica.process.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(replica.process.wait(), 60)


pg = pytest.mark.asyncio(loop_scope="module")


@pg
async def test_each_replica_answers_and_lists_the_others(cluster: Cluster) -> None:
    fake = cluster.fake
    reply = await admin_says(fake, 0, "models", starts="Model versions")
    assert "Answered by replica replica-a" in reply and "• replica-a: base" in reply and "• replica-b: base" in reply
    reply = await admin_says(fake, 1, "stats", starts="📊 Stats")
    assert "Answered by replica replica-b" in reply and "• replica-a: base" in reply
    assert await cluster.rows("SELECT name FROM model_versions") == [("base",)]  # registered once


async def retrain_chat(fake: FakeBotAPI, replica: int) -> int:
    """Send /retrain to ``backends[replica]``; the id of the status message it starts."""
    before = len(fake.calls_of("sendMessage", chat_id=ADMIN))
    fake.deliver_next_to(replica)
    fake.user_sends_command(ADMIN, "retrain")
    sent = lambda f: [c for c in f.calls_of("sendMessage", chat_id=ADMIN)[before:] if c.ok and c.params["text"] == RETRAIN_STARTED]
    await fake.wait_for(lambda f: bool(sent(f)), 60)
    return sent(fake)[0].result["message_id"]


async def message_becomes(fake: FakeBotAPI, message_id: int, done: Callable[[str], bool], timeout: float = 60) -> str:
    await fake.wait_for(lambda f: done((f.message(ADMIN, message_id) or {}).get("text", "")), timeout)
    return fake.message(ADMIN, message_id)["text"]  # type: ignore[index]


@pg
async def test_retrain_on_a_switches_b_within_5_s_and_a_second_retrain_is_refused(cluster: Cluster) -> None:
    fake = cluster.fake
    first = await retrain_chat(fake, 0)
    for _ in range(600):
        if await cluster.rows("SELECT 1 FROM training_runs WHERE status = 'running'"):
            break
        await asyncio.sleep(0.05)
    second = await retrain_chat(fake, 1)  # another replica: only the database's lock can refuse it
    refused = await message_becomes(fake, second, lambda t: t.startswith("⏳"))
    assert refused.startswith("⏳ Not started. Training is already running: a feedback run (#1,"), refused
    (cluster.tmp / "go").touch()
    report = await message_becomes(fake, first, lambda t: t.startswith(("✅", "❌", "ℹ️")))
    assert report.startswith("✅ Now answering with quick-"), report
    [(name,)] = await cluster.rows("SELECT name FROM model_versions WHERE is_active")
    assert report.startswith(f"✅ Now answering with {name} (8 products)")
    assert await serves_within(cluster.b.port, name, 5.0) < 5.0  # LISTEN/NOTIFY: usually a few ms
    assert await cluster.rows("SELECT status FROM training_runs ORDER BY id") == [("succeeded",)]
    reply = await admin_says(fake, 1, "models", starts="Model versions")
    assert f"• replica-a: {name}" in reply and f"• replica-b: {name}" in reply


@pg
async def test_rollback_on_b_switches_a_within_5_s(cluster: Cluster) -> None:
    await admin_says(cluster.fake, 1, "rollback", "base", starts="✅ Now answering with base (16 products).")
    assert await serves_within(cluster.a.port, "base", 5.0) < 5.0


@pg
async def test_a_redelivered_update_is_logged_and_answered_once(cluster: Cluster) -> None:
    fake, uid = cluster.fake, 901
    fake.deliver_next_to(0)
    update = fake.user_sends_photo(uid, make_image(51))  # the fake delivers it to A...
    again = await asyncio.gather(*(fake.post_update(update, url) for url in fake.backends))  # ...and both get it again at once
    await fake.wait_for(lambda f: len(cluster.keyboards(uid)) == 1, 60)
    assert again == [200, 200]
    keyboard = cluster.keyboards(uid)[0]
    press = fake.user_presses_button(uid, keyboard["message_id"], buttons(keyboard)[0][0]["callback_data"])
    await fake.wait_for(lambda f: len(f.calls_of("answerCallbackQuery")) >= 1, 30)
    assert await fake.post_update(press, fake.backends[1]) == 200  # Telegram retrying the press
    await asyncio.sleep(0.5)
    assert len(cluster.keyboards(uid)) == 1 and len(fake.calls_of("answerCallbackQuery")) == 1
    await cluster.eventually("SELECT count(*) FROM searches WHERE user_id = :uid", [(1,)], uid=uid)
    await cluster.eventually("SELECT count(*) FROM feedback WHERE user_id = :uid", [(1,)], uid=uid)


@pg
async def test_killing_a_mid_search_loses_nothing_and_b_keeps_answering(cluster: Cluster) -> None:
    fake, uid = cluster.fake, 902
    fake.deliver_next_to(1)
    fake.user_sends_photo(uid, make_image(52))
    await fake.wait_for(lambda f: len(cluster.keyboards(uid)) == 1, 60)
    keyboard = cluster.keyboards(uid)[0]
    (cluster.tmp / "slow").touch()  # A's next search hangs in the model
    fake.deliver_next_to(0)
    photo = fake.user_sends_photo(uid, make_image(53))
    for _ in range(600):
        if await cluster.rows("SELECT 1 FROM processed_updates WHERE update_id = :u AND replica = 'replica-a'", u=photo["update_id"]):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # downloading, in the model's hands
    cluster.a.process.send_signal(signal.SIGKILL)
    await cluster.a.process.wait()
    presses = [row[0]["callback_data"] for row in buttons(keyboard)[:3]]
    for data in presses:  # the balancer still sends some of them to A first
        fake.user_presses_button(uid, keyboard["message_id"], data)
    await fake.wait_for(lambda f: len(cluster.keyboards(uid)) == 2, 60)  # B took the photo over and answered it
    await cluster.eventually("SELECT count(*) FROM feedback WHERE user_id = :uid", [(3,)], uid=uid)
    await cluster.eventually("SELECT replica, finished_at IS NOT NULL FROM processed_updates WHERE update_id = :u", [("replica-b", True)], u=photo["update_id"])
    await cluster.eventually("SELECT count(*) FROM searches WHERE user_id = :uid", [(2,)], uid=uid)
    fake.user_sends_photo(uid + 1, make_image(54))
    await fake.wait_for(lambda f: len(cluster.keyboards(uid + 1)) == 1, 60)
    await asyncio.sleep(2.5)  # A's heartbeat is now too old: it is no longer listed
    reply = await admin_says(fake, 1, "models", starts="Model versions")
    assert "replica-b" in reply and "replica-a" not in reply
