"""Schema migrations from code: the app upgrades on start, ``ffengine db upgrade`` on demand.

The Alembic config is built here, pointing at the ``migrations`` package wherever it is
installed, so nothing depends on the working directory or on ``alembic.ini``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ffengine.db.engine import WRITE_OPTION, async_url
from ffengine.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

# Alembic's ``context`` proxy is process-global: two migrations interleaved in one process
# (two Database.open at once) would clobber each other, so one runs at a time.
_MIGRATING = threading.Lock()


def script_location() -> Path:
    """The ``migrations`` package's folder, wherever it is installed (found through the
    import system, so an editable install, a wheel and the repo checkout all work)."""
    spec = importlib.util.find_spec("migrations")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "env.py").is_file():
            return Path(folder)
    raise ConfigError(
        "the `migrations` package (with env.py) is not installed next to ffengine; reinstall FocusedFashion"
    )


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` for our migrations; ``url`` (optional) is the database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if url is not None:
        rendered = async_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))  # configparser escaping
    return cfg


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/versions is empty"
    return head


def upgrade_to_head(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (creating it if empty). Sync.

    Safe to call from inside a running event loop (it then runs in a helper thread),
    but async code should prefer ``Database.open(url)``, which does the same.
    """

    def upgrade() -> None:
        with _MIGRATING:
            command.upgrade(alembic_config(url), "head")

    _run_blocking(upgrade)


def revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade_engine(engine: AsyncEngine) -> None:
    """Upgrade through the app's own engine (same pragmas, one write transaction)."""

    def upgrade(connection: Connection) -> None:
        before = revision_of(connection)
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
        after = revision_of(connection)
        if after != before:  # one line instead of Alembic's own (quieted by the bot): what changed
            log.info("database schema upgraded from %s to %s", before or "empty", after)

    while not _MIGRATING.acquire(blocking=False):  # never block the event loop
        await asyncio.sleep(0.02)
    try:
        async with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
            await conn.run_sync(upgrade)
    finally:
        _MIGRATING.release()


async def engine_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(revision_of)


def _run_blocking(fn: Callable[[], T]) -> T:
    """Run ``fn`` here, or in a fresh thread when this thread already runs an event loop
    (Alembic's env.py calls ``asyncio.run``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ffengine-migrate") as pool_:
        return pool_.submit(fn).result()
