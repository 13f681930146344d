"""Alembic environment, async-aware.

Three ways in: the app passes its own connection in ``config.attributes["connection"]``
(``Database.open`` / ``ffengine.db.migrate``); ``alembic upgrade head`` from the repo root
uses ``sqlalchemy.url`` (``-x url=...`` also works) or else ``DATABASE_URL`` /
``ffengine.config.database_url()``; ``--sql`` renders SQL offline.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from pathlib import Path
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection

from ffengine.config import database_url, load_dotenv_file
from ffengine.db.engine import WRITE_OPTION, async_url, make_engine
from ffengine.db.models import Base, UTCDateTime

config = context.config
MIGRATION_LOCK_KEY = 0x4646_6462  # "FFdb": PostgreSQL advisory lock held while migrating
target_metadata = Base.metadata

if config.config_file_name is not None:  # run by the alembic command, not from code
    fileConfig(config.config_file_name, disable_existing_loggers=False)
    load_dotenv_file(Path(config.config_file_name).with_name(".env"))


def configured_url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or database_url()
    )


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Write ``UTCDateTime`` as plain ``sa.DateTime(timezone=True)`` so that migrations
    never import app code that may later move."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def do_run_migrations(connection: Connection) -> None:
    """Migrate inside the caller's transaction (committed by the caller, all or nothing)."""
    sqlite = connection.dialect.name == "sqlite"
    if connection.dialect.name == "postgresql":
        # Two processes starting together on an empty database must not both build the
        # schema; SQLite is already serialised by BEGIN IMMEDIATE.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        render_as_batch=sqlite,  # SQLite ALTERs need table copies
        transactional_ddl=True,  # also for SQLite: ffengine.db.engine emits BEGIN itself
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_own_engine(url: str) -> None:
    engine = make_engine(url, poolclass=pool.NullPool).execution_options(**{WRITE_OPTION: True})
    try:
        async with engine.begin() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=async_url(configured_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (shared := config.attributes.get("connection")) is not None:
    do_run_migrations(shared)
else:
    asyncio.run(run_with_own_engine(configured_url()))
