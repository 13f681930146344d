"""Model versions and training runs on a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from ffengine.db import Database, NotFound, StorageError, Superseded, TrainingBusy
from ffengine.db.training import LOG_MAX_CHARS


def active_rows(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM model_versions WHERE is_active")]


# --- model versions -------------------------------------------------------------------------


async def test_versions_are_created_found_and_listed(db: Database) -> None:
    base = await db.create_model_version("base", "IMAGENET1K_V2", "data/index", metrics={"p@5": 0.61}, notes="ImageNet")
    child = await db.create_model_version(
        "fb-1", "IMAGENET1K_V2", "data/models/fb-1/index", parent_id=base.id, metrics={"p@5": np.float32(0.625)}
    )
    assert child.parent_id == base.id and not child.active and child.created_at.tzinfo is not None
    assert child.metrics == {"p@5": pytest.approx(0.625)}  # numpy numbers become JSON numbers
    assert await db.get_model_version("fb-1") == child
    assert await db.get_model_version(child.id) == child
    assert await db.get_model_version("nope") is None and await db.get_model_version(999) is None
    assert [v.name for v in await db.list_model_versions()] == ["base", "fb-1"]
    assert (await db.get_model_version("base")).notes == "ImageNet"  # type: ignore[union-attr]


async def test_duplicate_names_and_unknown_parents_are_refused(db: Database) -> None:
    await db.create_model_version("base", "IMAGENET1K_V2", "data/index")
    with pytest.raises(StorageError, match="already exists"):
        await db.create_model_version("base", "other.pth", "elsewhere")
    with pytest.raises(NotFound, match="parent"):
        await db.create_model_version("orphan", "x.pth", "idx", parent_id=42)
    with pytest.raises(ValueError, match="NaN"):
        await db.create_model_version("nan", "x.pth", "idx", metrics={"loss": float("nan")})
    assert [v.name for v in await db.list_model_versions()] == ["base"]


async def test_activation_switches_the_single_active_version(db: Database, db_path: Path) -> None:
    assert await db.active_model_version() is None
    a = await db.create_model_version("a", "IMAGENET1K_V2", "ia", activate=True)
    b = await db.create_model_version("b", "b.pth", "ib")
    assert a.active and (await db.active_model_version()).name == "a"  # type: ignore[union-attr]
    switched = await db.activate_model_version("b")
    assert switched.id == b.id and switched.active and switched.activated_at is not None
    assert active_rows(db_path) == ["b"]
    await db.activate_model_version(a.id)
    await db.activate_model_version(a.id)  # activating the active one is harmless
    assert active_rows(db_path) == ["a"]
    assert not (await db.get_model_version("b")).active  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await db.activate_model_version("missing")
    assert active_rows(db_path) == ["a"]


async def test_an_activation_over_a_version_no_longer_active_changes_nothing(db: Database, db_path: Path) -> None:
    base = await db.create_model_version("base", "IMAGENET1K_V2", "ib", activate=True)
    other = await db.create_model_version("other", "IMAGENET1K_V2", "io")
    trained = await db.create_model_version("trained", "t.pth", "it", parent_id=base.id)
    await db.activate_model_version("other")  # a rollback while "trained" was being loaded
    with pytest.raises(Superseded, match="other is active"):
        await db.activate_model_version(trained.id, replacing=base.id)
    assert active_rows(db_path) == ["other"]
    assert (await db.activate_model_version(trained.id, replacing=other.id)).active  # over the active one: switched
    assert active_rows(db_path) == ["trained"]


async def test_the_database_refuses_two_active_versions(db: Database) -> None:
    await db.create_model_version("a", "IMAGENET1K_V2", "ia", activate=True)
    await db.create_model_version("b", "b.pth", "ib")
    with pytest.raises(IntegrityError):
        async with db._engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE model_versions SET is_active = 1 WHERE name = 'b'")


async def test_searches_name_the_version_that_answered(db: Database) -> None:
    v = await db.create_model_version("v", "IMAGENET1K_V2", "i", activate=True)
    rec = await db.record_search(1, None, np.zeros(1280, np.float32), v.id, 5.0, "ok", [("p", 0.0)])
    (exported,) = await db.export_feedback()
    assert exported.search_id == rec.search_id and exported.model_version_id == v.id
    with pytest.raises(NotFound, match="12345"):  # a version that does not exist is a bug, not a silent NULL
        await db.record_search(1, None, None, 12345, 5.0, "ok", [])
    assert len(await db.export_feedback()) == 1


# --- training runs ---------------------------------------------------------------------------


async def test_training_run_lifecycle(db: Database) -> None:
    run_id = await db.start_training_run("feedback", {"epochs": 3, "lr": 1e-3})
    with pytest.raises(TrainingBusy) as busy:
        await db.start_training_run("finetune", {})
    assert busy.value.run_id == run_id and str(run_id) in str(busy.value)
    await db.update_training_run(run_id, progress=0.5, log_line="epoch 1/3 loss 0.41")
    await db.update_training_run(run_id, log_line="epoch 2/3 loss 0.33\n")
    [running] = await db.list_training_runs(1)
    assert (running.id, running.status, running.progress) == (run_id, "running", 0.5)
    assert running.log == "epoch 1/3 loss 0.41\nepoch 2/3 loss 0.33\n"
    assert running.params == {"epochs": 3, "lr": 1e-3}

    v = await db.create_model_version("fb-1", "IMAGENET1K_V2", "data/models/fb-1/index")
    done = await db.finish_training_run(run_id, "succeeded", model_version_id=v.id, metrics={"p@5": 0.7})
    assert (done.status, done.progress, done.model_version_id, done.metrics) == ("succeeded", 1.0, v.id, {"p@5": 0.7})
    assert done.finished_at is not None and done.finished_at >= done.started_at
    with pytest.raises(StorageError, match="already finished"):
        await db.update_training_run(run_id, progress=0.9)
    with pytest.raises(StorageError, match="already finished"):
        await db.finish_training_run(run_id, "failed")

    second = await db.start_training_run("finetune", {})  # free again
    await db.finish_training_run(second, "rejected")
    assert [(r.id, r.status) for r in await db.list_training_runs(10)] == [(second, "rejected"), (run_id, "succeeded")]
    assert len(await db.list_training_runs(1)) == 1


async def test_a_run_keeps_where_its_progress_is_watched(db: Database) -> None:
    """A killed bot's successor finds the admin's status message through the run."""
    watched = await db.start_training_run("feedback", {}, progress_message={"chat_id": 42, "message_id": 7})
    closed = await db.finish_training_run(watched, "failed")
    assert closed.progress_message == {"chat_id": 42, "message_id": 7}
    unwatched = await db.start_training_run("feedback", {})
    assert [(r.id, r.progress_message) for r in await db.list_training_runs(1)] == [(unwatched, None)]


async def test_training_run_input_is_checked(db: Database) -> None:
    run_id = await db.start_training_run("feedback", {})
    with pytest.raises(ValueError, match="progress"):
        await db.update_training_run(run_id, progress=1.5)
    with pytest.raises(ValueError, match="status"):
        await db.finish_training_run(run_id, "running")
    with pytest.raises(NotFound):
        await db.update_training_run(run_id + 1, progress=0.1)
    with pytest.raises(NotFound):
        await db.finish_training_run(run_id, "succeeded", model_version_id=77)
    assert (await db.list_training_runs(1))[0].status == "running"


async def test_training_log_keeps_its_newest_part(db: Database) -> None:
    run_id = await db.start_training_run("feedback", {})
    line = "x" * 999
    for i in range(LOG_MAX_CHARS // 1000 + 20):
        await db.update_training_run(run_id, log_line=f"{i:04d} {line}")
    log = (await db.list_training_runs(1))[0].log
    assert len(log) <= LOG_MAX_CHARS + 2
    assert log.startswith("…\n") and log.endswith(f"{LOG_MAX_CHARS // 1000 + 19:04d} {line}\n")


async def test_the_database_refuses_two_running_runs(db: Database) -> None:
    await db.start_training_run("feedback", {})
    with pytest.raises(IntegrityError):
        async with db._engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO training_runs (kind, status, progress, log, started_at) "
                "VALUES ('x', 'running', 0, '', '2026-01-01')"
            )
