"""Only a version the bot can answer with becomes active, and a rollback stands (issue #20).

``python -m train`` runs in this process on the tiny generated store of ``test_train_cli`` (random
weights, real files, a real SQLite file or, with ``FF_TEST_POSTGRES_URL``, a fresh PostgreSQL database);
the replicas are two real in-process bots on one SQLite file (``test_replicas``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from bot.app import build_application
from bot.config import BotSettings
from bot.runner import running
from ffengine.config import EngineSettings
from ffengine.db import Database
from ffengine.index import Index, write_index
from tests.fake_bot_api import FakeBotAPI
from tests.test_bot import ADMIN, TOKEN, EngineFiles, bot_env, engine_files  # noqa: F401  (fixture)
from tests.test_catalog_rows import database_url
from tests.test_replicas import two_bots
from tests.test_train_cli import cli, last_json, settings_env, store  # noqa: F401  (fixtures)
from train.catalogue import update_catalogue_async
from train.errors import TrainingError
from train.runs import TrainingResult
from train.versions import register_base

LONG_CATEGORY = "C" * 200


async def in_database(url: str, work: Any) -> Any:
    """``await work(db)`` on the database at ``url``, opened (migrated) for it and closed after."""
    db = await Database.open(url)
    try:
        return await work(db)
    finally:
        await db.close()


async def start_up(db: Database) -> tuple[str, dict[str, Any]]:
    """What the bot does with the active version at start (``bot.app.open_services``): load it, store its products."""
    active = await db.active_model_version()
    assert active is not None
    index = await asyncio.to_thread(Index.load, active.index_dir)
    await db.upsert_products(index.products)
    return active.name, {p.id: p for p in index.products}


def with_bad_rows(store: Path) -> Path:
    """The store's catalogue and two rows an export can hold that the database could not store as they are."""
    lines = (store / "products.csv").read_text().splitlines()
    lines += [
        f"bad-cat,Long category,https://shop.example/bc,images/0.jpg,{LONG_CATEGORY},Red,Men,Casual",
        "bad-nul,Nul\x00title,https://shop.example/bn,images/1.jpg,Tshirts,Red\x00,Men,Casual",
    ]
    path = store / "with-bad-rows.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_train_catalog_with_rows_the_database_refuses_promotes_a_version_the_bot_starts_with(
    store: Path, tmp_path: Path, cli, kind: str
) -> None:
    async with database_url(kind, tmp_path / "ff.db") as url:
        args = ["--catalog", str(with_bad_rows(store)), "--name", "cat-bad-rows", "--database-url", url, "--json"]
        result = await asyncio.to_thread(lambda: last_json(cli(store, tmp_path / "ff.db", "catalog", *args)))
        assert (result["status"], result["metrics"]["index_products"]) == ("promoted", 38)
        active, products = await in_database(url, start_up)
    assert active == "cat-bad-rows"
    assert products["bad-cat"].category is None
    assert (products["bad-nul"].title, products["bad-nul"].colour) == ("Nul title", None)


def with_a_refused_product(index_dir: Path, folder: Path) -> Path:
    """The index at ``index_dir`` written again at ``folder``, its first product's category too long for the
    database: what an index written before the field rules (or by hand) may hold."""
    index = Index.load(index_dir)
    products = [dataclasses.replace(p, category=LONG_CATEGORY) if i == 0 else p for i, p in enumerate(index.products)]
    return write_index(folder, index.features, products, fingerprint=index.fingerprint, catalog_hash="written-by-hand")


def test_rollback_refuses_a_version_whose_products_the_database_refuses(store: Path, tmp_path: Path, cli) -> None:
    db = tmp_path / "ff.db"
    index_dir = with_a_refused_product(store / "data" / "index", tmp_path / "old-index")
    weights = str(store / "base.pth")

    async def versions(d: Database) -> None:
        await register_base(d, weights, store / "data" / "index", "the running setup")
        await d.create_model_version("old", weights, str(index_dir))

    asyncio.run(in_database(f"sqlite+aiosqlite:///{db}", versions))

    refused = cli(store, db, "rollback", "old")

    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "old holds products the database refuses: product 'sku0': category is longer than 128" in refused.stderr
    versions = last_json(cli(store, db, "models", "--json"))["versions"]
    assert [(v["name"], v["active"]) for v in versions] == [("base", True), ("old", False)]


def test_a_rollback_made_while_a_catalogue_update_runs_is_not_undone_by_it(store: Path, tmp_path: Path, cli) -> None:
    db = tmp_path / "ff.db"
    first = last_json(cli(store, db, "catalog", "--catalog", str(store / "products.csv"), "--name", "cat-1", "--json"))
    assert first["status"] == "promoted"
    reached, resume = threading.Event(), threading.Event()

    def progress(fraction: float, text: str) -> None:  # the run's first step: it waits there for the admin's rollback
        if not reached.is_set():
            reached.set()
            resume.wait(120)

    settings = EngineSettings.from_env(settings_env(store, db))
    outcome: dict[str, TrainingResult | BaseException] = {}

    def catalogue_update() -> None:
        def work(d: Database) -> Any:
            return update_catalogue_async(d, settings, store / "products.csv", name="cat-2", progress=progress)

        try:
            outcome["result"] = asyncio.run(in_database(f"sqlite+aiosqlite:///{db}", work))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["result"] = exc

    running = threading.Thread(target=catalogue_update, name="train-catalog")
    running.start()
    try:
        assert reached.wait(120), "the catalogue update did not start"
        rolled = cli(store, db, "rollback", "base")
        assert rolled.returncode == 0, rolled.stderr
        assert rolled.stdout.startswith("base is now the active model version")
    finally:
        resume.set()
        running.join(300)

    result = outcome["result"]
    assert isinstance(result, TrainingResult), result
    assert result.status == "unevaluated" and not result.promoted and result.version == "cat-2"
    assert "cat-1, which it was made from, is no longer the active version (base is)" in result.reason
    assert "python -m train rollback cat-2" in result.reason
    versions = last_json(cli(store, db, "models", "--json"))["versions"]
    assert [(v["name"], v["active"]) for v in versions] == [("base", True), ("cat-1", False), ("cat-2", False)]
    assert versions[2]["notes"].startswith("unevaluated: cat-2 registered but not activated")


async def test_replicas_that_cannot_store_the_new_versions_products_say_so_once_and_keep_serving(
    engine_files: EngineFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = with_a_refused_product(engine_files.small_index, tmp_path / "bad-index")
    caplog.set_level(logging.ERROR, logger="bot.replicas")
    async with FakeBotAPI(token=TOKEN) as fake, two_bots(fake, engine_files, tmp_path) as (a, b):
        fake.add_user(ADMIN)
        version = await a.svc.db.create_model_version("bad-rows", str(engine_files.weights), str(bad))
        await a.svc.db.activate_model_version(version.id)  # as a version made before the field rules would be
        said = "cannot load the active model version bad-rows"
        await fake.wait_for(lambda f: sum(said in t for t in a.texts_to(ADMIN)) == 2, 10)
        assert all("category is longer than 128 characters" in t for t in a.texts_to(ADMIN) if "bad-rows" in t)
        assert a.svc.models.current.name == b.svc.models.current.name == "base"
        await asyncio.sleep(1.5)  # several ticks go by on each replica: neither tries again nor says it again
        logged = [r for r in caplog.records if said in r.getMessage()]
        assert len(logged) == 2 and {r.getMessage().split()[1] for r in logged} == {"bot-a", "bot-b"}
        assert a.svc.models.current.name == b.svc.models.current.name == "base"
        assert a.rows("SELECT count(*) FROM products WHERE length(category) > 128") == [(0,)]


async def test_a_first_start_on_an_index_whose_products_the_database_refuses_stops_before_registering_it(
    engine_files: EngineFiles, tmp_path: Path
) -> None:
    old = with_a_refused_product(engine_files.index, tmp_path / "old-index")
    async with FakeBotAPI(token=TOKEN) as fake:
        settings = BotSettings.from_env(bot_env(fake, engine_files, tmp_path, FFENGINE_INDEX=str(old)))
        app = build_application(settings)
        with pytest.raises(TrainingError, match="base holds products the database refuses: product 'p0': category"):
            async with running(app, settings):
                pass
    with contextlib.closing(sqlite3.connect(tmp_path / "ff.db")) as conn:
        assert conn.execute("SELECT count(*) FROM model_versions").fetchone() == (0,)
