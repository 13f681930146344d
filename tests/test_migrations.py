"""Alembic migrations on real SQLite files: up, down, up again, and models == migrations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from ffengine.db import Database, StorageError, upgrade_to_head
from ffengine.db.migrate import alembic_config, head_revision, script_location
from ffengine.db.models import Base

REPO = Path(__file__).resolve().parents[1]
TABLES = {"users", "searches", "recommendations", "feedback", "products", "model_versions", "training_runs", "search_items", "search_origins", "replicas", "processed_updates", "erasures"}


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows} - {"alembic_version", "sqlite_sequence"}


def current_revision(path: Path) -> str | None:
    """The revision the database file is at; ``None`` when it has no schema (or no file) yet."""
    if not path.exists():
        return None
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def schema_diff(path: Path) -> list:
    """What autogenerate would change to make the database match the models."""
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": Base.metadata})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_from_empty_creates_the_schema_at_head(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "ff.db"  # the data directory does not exist yet
    assert current_revision(path) is None
    upgrade_to_head(sqlite_url(path))
    assert tables(path) == TABLES
    assert current_revision(path) == head_revision()
    upgrade_to_head(sqlite_url(path))  # idempotent
    assert current_revision(path) == head_revision()


def test_models_match_the_migrations(tmp_path: Path) -> None:
    path = tmp_path / "ff.db"
    upgrade_to_head(sqlite_url(path))
    assert schema_diff(path) == []


def test_compare_detects_a_drift(tmp_path: Path) -> None:
    """The comparison above can fail: a schema missing an index is reported."""
    path = tmp_path / "ff.db"
    upgrade_to_head(sqlite_url(path))
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX ix_products_category")
    diff = schema_diff(path)
    assert any(op[0] == "add_index" and op[1].name == "ix_products_category" for op in diff)


def test_downgrade_to_base_and_back_up(tmp_path: Path) -> None:
    path = tmp_path / "ff.db"
    cfg = alembic_config(sqlite_url(path))
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    assert tables(path) == set()
    assert current_revision(path) is None
    command.upgrade(cfg, "head")
    assert tables(path) == TABLES
    assert schema_diff(path) == []


def test_each_step_down_keeps_the_data_and_comes_back_up(tmp_path: Path) -> None:
    """Downgrading the newest migration keeps the rows (and the one-running-run index) of the older schema."""
    path = tmp_path / "ff.db"
    cfg = alembic_config(sqlite_url(path))
    command.upgrade(cfg, "head")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO training_runs (kind, status, progress, log, started_at) VALUES ('feedback', 'running', 0.5, '', '2026-01-01')")
    command.downgrade(cfg, "-1")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT kind, progress FROM training_runs").fetchall() == [("feedback", 0.5)]
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "uq_training_runs_one_running" in indexes
    command.upgrade(cfg, "head")
    assert current_revision(path) == head_revision()
    assert schema_diff(path) == []


def test_the_items_migration_goes_down_and_up_without_touching_the_search_log(tmp_path: Path) -> None:
    """SQLite cascades a dropped table into the rows that reference it: 0003 must never copy ``searches``."""
    path = tmp_path / "ff.db"
    cfg = alembic_config(sqlite_url(path))
    command.upgrade(cfg, "head")
    log = ("users", "searches", "recommendations", "feedback")
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            PRAGMA foreign_keys = ON;
            INSERT INTO users (id, first_seen, last_seen) VALUES (7, '2026-01-01', '2026-01-01');
            INSERT INTO searches (id, user_id, created_at, latency_ms, outcome, file_id) VALUES (1, 7, '2026-01-01', 5, 'ok', 'f1'), (2, 7, '2026-01-01', 5, 'ok', NULL);
            INSERT INTO recommendations (id, search_id, rank, product_id, distance) VALUES (1, 1, 1, 'p1', 0.1), (2, 2, 1, 'p2', 0.1);
            INSERT INTO feedback (user_id, recommendation_id, value, created_at, updated_at) VALUES (7, 1, 1, '2026-01-01', '2026-01-01');
            INSERT INTO search_items VALUES (1, 0, 'Jeans', 0.5, 0, 0, 10, 10);
            INSERT INTO search_origins VALUES (2, 'item', 1, 0, NULL);
            """
        )
        with pytest.raises(sqlite3.IntegrityError):  # an origin names its source, and only one kind of source
            conn.execute("INSERT INTO search_origins VALUES (1, 'more_like', 2, 0, 2)")
        before = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in log}
    command.downgrade(cfg, "0002")
    with sqlite3.connect(path) as conn:
        assert {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in log} == before == {t: n for t, n in zip(log, (1, 2, 2, 1), strict=True)}
        assert "file_id" not in {row[1] for row in conn.execute("PRAGMA table_info(searches)")}
    assert tables(path) == TABLES - {"search_items", "search_origins", "replicas", "processed_updates", "erasures"}
    command.upgrade(cfg, "head")
    assert tables(path) == TABLES and schema_diff(path) == []


def test_the_replicas_migration_goes_down_and_up_keeping_the_versions_and_the_log(tmp_path: Path) -> None:
    """0004 only adds tables: down and up again keep every model version and search (SQLite cascades a copied table)."""
    path = tmp_path / "ff.db"
    cfg = alembic_config(sqlite_url(path))
    command.upgrade(cfg, "head")
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            PRAGMA foreign_keys = ON;
            INSERT INTO model_versions (id, name, created_at, weights, index_dir, is_active) VALUES (1, 'base', '2026-01-01', 'w', 'i', 1);
            INSERT INTO users (id, first_seen, last_seen) VALUES (7, '2026-01-01', '2026-01-01');
            INSERT INTO searches (id, user_id, created_at, latency_ms, outcome, model_version_id) VALUES (1, 7, '2026-01-01', 5, 'ok', 1);
            INSERT INTO replicas VALUES ('bot-1', '2026-01-01', '2026-01-01', 1);
            INSERT INTO processed_updates VALUES (42, 'bot-1', '2026-01-01', NULL);
            """
        )
        with pytest.raises(sqlite3.IntegrityError):  # one claim per update
            conn.execute("INSERT INTO processed_updates VALUES (42, 'bot-2', '2026-01-01', NULL)")
    command.downgrade(cfg, "0003")
    assert tables(path) == TABLES - {"replicas", "processed_updates", "erasures"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM model_versions").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM searches").fetchone()[0] == 1
    command.upgrade(cfg, "head")
    assert tables(path) == TABLES and schema_diff(path) == []


def test_the_erasures_migration_goes_down_and_up_keeping_the_log(tmp_path: Path) -> None:
    """0005 only adds a table: down and up again keep every search; one note per user."""
    path = tmp_path / "ff.db"
    cfg = alembic_config(sqlite_url(path))
    command.upgrade(cfg, "head")
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            INSERT INTO users (id, first_seen, last_seen) VALUES (7, '2026-01-01', '2026-01-01');
            INSERT INTO searches (id, user_id, created_at, latency_ms, outcome) VALUES (1, 7, '2026-01-01', 5, 'ok');
            INSERT INTO erasures VALUES (8, 42, '2026-01-01');
            """
        )
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO erasures VALUES (8, 43, '2026-01-01')")
    command.downgrade(cfg, "0004")
    assert tables(path) == TABLES - {"erasures"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM searches").fetchone()[0] == 1
    command.upgrade(cfg, "head")
    assert tables(path) == TABLES and schema_diff(path) == []


async def test_open_upgrades_and_sets_up_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "data" / "ff.db"
    db = await Database.open(sqlite_url(path))
    try:
        await db.touch_user(1, "en")
    finally:
        await db.close()
    assert tables(path) == TABLES
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file


async def test_open_without_upgrade_refuses_an_old_schema(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "ff.db")
    with pytest.raises(StorageError, match="ffengine db upgrade"):
        await Database.open(url, upgrade=False)
    upgrade_to_head(url)  # works from inside a running event loop too
    db = await Database.open(url, upgrade=False)
    await db.close()


def test_bad_urls_are_refused_with_the_setting_named(tmp_path: Path) -> None:
    from ffengine.errors import ConfigError

    with pytest.raises(ConfigError, match="DATABASE_URL"):
        upgrade_to_head("not a url")
    with pytest.raises(ConfigError, match="async driver"):
        upgrade_to_head("postgresql+psycopg2://127.0.0.1/ff")


def test_plain_sqlite_url_gets_the_async_driver(tmp_path: Path) -> None:
    upgrade_to_head(f"sqlite:///{tmp_path / 'ff.db'}")
    assert tables(tmp_path / "ff.db") == TABLES


def test_migrations_are_found_from_any_working_directory(tmp_path: Path) -> None:
    """The app finds the migrations through the import system, not the CWD."""
    path = tmp_path / "ff.db"
    code = "import sys; from ffengine.db import upgrade_to_head; upgrade_to_head(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, sqlite_url(path)], cwd=tmp_path, check=True, timeout=120)
    assert tables(path) == TABLES
    assert (script_location() / "env.py").is_file()


def test_alembic_command_from_repo_root_reads_database_url(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    env = {**os.environ, "DATABASE_URL": sqlite_url(path)}
    alembic = [sys.executable, "-m", "alembic"]
    subprocess.run([*alembic, "upgrade", "head"], cwd=REPO, env=env, check=True, timeout=120, capture_output=True)
    assert tables(path) == TABLES
    check = subprocess.run([*alembic, "check"], cwd=REPO, env=env, timeout=120, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
