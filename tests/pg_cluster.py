"""A throwaway PostgreSQL server a test owns, so it can stop and start it (a restart, an outage).

Started like ``.ci/start-postgres`` starts the shared one: ``initdb`` and ``pg_ctl`` on a data
folder in a temp dir, loopback only, as the ``postgres`` user when the tests run as root
(PostgreSQL refuses to run as root). Tests skip with the reason when the binaries are absent.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine


def postgres_bin() -> Path | None:
    """Debian's newest ``/usr/lib/postgresql/N/bin``, else the folder of ``pg_ctl`` on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    if found:
        return found[-1]
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One server on ``127.0.0.1:port`` with its data in ``root``; ``url`` reaches it as role ``ff``."""

    def __init__(self, bin_dir: Path, root: Path, port: int, as_postgres: bool) -> None:
        self.bin_dir, self.root, self.port, self.as_postgres = bin_dir, root, port, as_postgres

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://ff@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "ff")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what a service manager's restart does (clients are disconnected)."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def own_postgres() -> Iterator[Cluster]:
    """A started cluster, removed afterwards; skips the test when PostgreSQL is not installed."""
    bin_dir = postgres_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("needs the PostgreSQL server binaries (initdb, pg_ctl); `apt-get install postgresql` provides them")
    as_postgres = os.geteuid() == 0
    if as_postgres and shutil.which("su") is None:
        pytest.skip("running as root needs `su postgres` to start PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="ff-pg-test."))  # not tmp_path: the postgres user must reach it
    try:
        if as_postgres:
            shutil.chown(root, "postgres")
        cluster = Cluster(bin_dir, root, free_port(), as_postgres)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            try:
                cluster.stop("immediate")
            except subprocess.CalledProcessError:
                pass  # already stopped by the test
    finally:
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def fresh_database(admin_url: str, prefix: str = "ff_test") -> AsyncIterator[str]:
    """A new, empty database on the server ``admin_url`` names (a role that may CREATE DATABASE), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()
