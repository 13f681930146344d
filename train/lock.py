"""One training run at a time, even across processes and crashes.

The lock is ``fcntl.flock`` on ``<data_dir>/train.lock``: the kernel drops it when the
holding process exits for any reason (crash, ``kill -9``, power loss), so a lock can
never be left "stale" — a file whose holder died is simply free, and the next run takes
it over (it reads who held it before, for the log). The file's content says who holds
it now (pid, host, start time, what kind of run), so a refused run can say why.

POSIX only (Linux, macOS), which is where the bot and its data directory live.

On PostgreSQL the lock is the database's instead (:func:`run_lock`): several hosts share one
database and a data folder, and a file lock on one host does not reach the others. A
session-level advisory lock lives as long as the connection that took it, so it too is freed
when its process dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ffengine.db import Database
from train.errors import TrainingLocked

LOCK_NAME = "train.lock"
#: PostgreSQL advisory lock key of training ("FFtr"; migrations hold "FFdb").
TRAINING_LOCK_KEY = 0x4646_7472


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) the training lock."""

    pid: int
    host: str
    started: float
    kind: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"a {self.kind} run (pid {self.pid} on {self.host}, started {when})"


def read_holder(path: Path) -> LockHolder | None:
    """Parse the lock file's content; ``None`` if empty or unreadable."""
    try:
        data = json.loads(path.read_text() or "null")
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["started"]), str(data["kind"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


@contextmanager
def training_lock(data_dir: Path, kind: str) -> Iterator[LockHolder | None]:
    """Hold the training lock for the ``with`` block; raise :class:`TrainingLocked` if another run has it.

    Yields the *previous* holder when its lock was left behind by a process that died
    (so the caller can log "took over from ..."), else ``None``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            who = holder.describe() if holder else "another training run"
            raise TrainingLocked(f"Training is already running: {who}. Wait for it to finish.") from None
        stale = read_holder(path)
        me = LockHolder(os.getpid(), socket.gethostname(), time.time(), kind)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me.__dict__).encode(), 0)
        os.fsync(fd)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)  # an empty file = nobody; the flock itself is what counts
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@asynccontextmanager
async def run_lock(db: Database, data_dir: Path, kind: str) -> AsyncIterator[LockHolder | None]:
    """The training lock every process sharing ``db`` respects: PostgreSQL's advisory lock on a
    dedicated connection held for the block, or :func:`training_lock` on SQLite (one host).

    Raises :class:`TrainingLocked` when another run holds it; yields what :func:`training_lock` yields
    (always ``None`` on PostgreSQL, which keeps no note of a dead holder).
    """
    if not db.is_postgres:
        with training_lock(data_dir, kind) as stale:
            yield stale
        return
    async with db.advisory_lock(TRAINING_LOCK_KEY) as taken:
        if not taken:
            raise TrainingLocked(f"Training is already running: {await running_run(db)}. Wait for it to finish.")
        yield None


async def running_run(db: Database) -> str:
    """The run holding the database's lock, as its ``training_runs`` row tells (it may not have one yet)."""
    latest = await db.list_training_runs(limit=1)
    if not latest or latest[0].status != "running":
        return "another process (on this or another host) holds the database's training lock"
    run = latest[0]
    return f"a {run.kind} run (#{run.id}, started {run.started_at:%Y-%m-%d %H:%M:%S} UTC, {run.progress:.0%} done)"
