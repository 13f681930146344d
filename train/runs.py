"""The frame every training run shares: lock, ``training_runs`` row, progress, clean failure.

The lock (:func:`train.lock.run_lock`) is the database's on PostgreSQL, so one run at a time
holds across every host that shares the database; a file lock in the data folder on SQLite.

Inside :func:`training_run` a run may write files into folders it lists in
``run.made``; if it fails (an exception, a cancellation) before it registers them as
a model version, they are removed and the row is closed as ``failed`` with the error.
Nothing that is active is touched by a failing run. A run registers its version with
:meth:`Run.register`, which refuses one the bot could not answer with and promotes one only while
the version the run started from is still active. A rejected version's files are
removed once it is recorded (:func:`train.versions.keep_rejected`).

A run whose process is killed can clean up nothing: its row stays ``running``, a
half-written index stays on disk. The next run closes such rows and removes such files
before it starts (:func:`close_dead_runs`); the bot does it at start-up
(:func:`recover_interrupted`) and edits the status message stored with each closed run
(:data:`PROGRESS_MESSAGE`) to say the run was interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ffengine.config import EngineSettings
from ffengine.db import Database
from ffengine.db import TrainingRun as RunRecord
from ffengine.errors import FFError
from train.errors import TrainingLocked
from train.lock import run_lock
from train.versions import (
    Current,
    check_servable,
    keep_rejected,
    remove_partial_writes,
    remove_version_files,
    superseded,
)

log = logging.getLogger(__name__)

#: ``progress(fraction 0..1, text)``; may be called from any thread.
Progress = Callable[[float, str], None]


#: Where a person watches the runs started in this context (the bot's status message:
#: ``{"chat_id": ..., "message_id": ...}``); stored with the run. A context variable, because
#: the entry points between the bot and :func:`training_run` take no such argument.
PROGRESS_MESSAGE: ContextVar[dict[str, int] | None] = ContextVar("ff_progress_message", default=None)

#: ``TrainingResult.status`` -> ``training_runs.status``.
RUN_STATUS = {"promoted": "succeeded", "unevaluated": "succeeded", "rejected": "rejected", "insufficient": "rejected"}


@dataclass(frozen=True)
class TrainingResult:
    """The outcome of a training run (the bot's ``RetrainResult``; see :mod:`train`)."""

    #: promoted | rejected (not better) | insufficient (too little data) | unevaluated (not activated: nothing to
    #: compare on, or the version it was made from is no longer the active one)
    status: str
    version: str | None  # the registered model version (None when nothing was trained)
    metrics: dict[str, Any]
    reason: str  # one sentence for people
    run_id: int | None = None

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "promoted": self.promoted,
            "version": self.version,
            "reason": self.reason,
            "run_id": self.run_id,
            "metrics": self.metrics,
        }


class Run:
    """One training run in progress: report with :meth:`say` (any thread) or :meth:`step` (on the loop)."""

    def __init__(self, db: Database, run_id: int, progress: Progress | None, settings: EngineSettings) -> None:
        self.db, self.id, self.progress, self.settings = db, run_id, progress, settings
        self.made: list[Path] = []
        self.finished = False

    def say(self, fraction: float, text: str) -> None:
        """From any thread: only the callback (training steps are too many for the database)."""
        log.info("training run %d %3.0f%%: %s", self.id, 100 * fraction, text)
        if self.progress is not None:
            try:
                self.progress(fraction, text)
            except Exception:  # noqa: BLE001 - a broken progress display must not stop training
                log.exception("progress callback failed")

    async def step(self, fraction: float, text: str) -> None:
        """On the loop: the callback and a log line with progress in the ``training_runs`` row."""
        self.say(fraction, text)
        await self.db.update_training_run(self.id, progress=fraction, log_line=text)

    def within(self, start: float, end: float, prefix: str) -> Progress:
        """A callback mapping 0..1 of a sub-task onto ``start..end`` of the run."""
        return lambda f, text: self.say(start + (end - start) * f, f"{prefix}: {text}")

    async def register(
        self, result: TrainingResult, parent: Current, weights: str, index_dir: Path, activate: bool
    ) -> TrainingResult:
        """Register the version ``result`` names, made from ``parent`` (and make it active when ``result`` is
        promoted and ``activate``); returns the result that holds.

        A version the bot could not answer with fails the run instead (:func:`~train.versions.check_servable`;
        its files go). A promotion stands only while ``parent`` is still the active version: a version switched
        to meanwhile (a rollback) stays active, and this one is registered as ``unevaluated``, saying why.
        """
        assert result.version is not None
        name = result.version
        await asyncio.to_thread(check_servable, name, weights, index_dir)
        if result.promoted and (why := await superseded(self.db, parent)) is not None:
            how = f"to use it: `python -m train rollback {name}`"
            result = replace(result, status="unevaluated", reason=f"{name} registered but not activated: {why}; {how}")
        await self.db.create_model_version(
            name, weights, str(index_dir.resolve()), parent_id=parent.id, metrics=result.metrics,
            notes=f"{result.status}: {result.reason}", activate=activate and result.promoted,
        )  # fmt: skip
        self.made.clear()  # registered: from here on its folder is a kept version
        return result

    async def finish(self, result: TrainingResult) -> TrainingResult:
        """Close the row with what the run produced; returns ``result`` with the run id."""
        version = await self.db.get_model_version(result.version) if result.version else None
        await self.db.update_training_run(self.id, log_line=result.reason)
        if version is not None and result.status == "rejected" and not keep_rejected():
            if await asyncio.to_thread(remove_version_files, self.settings, version):
                await self.db.update_training_run(self.id, log_line=f"removed the files of {version.name} (TRAIN_KEEP_REJECTED=1 keeps them)")
        await self.db.finish_training_run(
            self.id, RUN_STATUS[result.status], model_version_id=version.id if version else None, metrics=result.metrics
        )
        self.finished = True
        return replace(result, run_id=self.id)


async def close_dead_runs(db: Database, settings: EngineSettings) -> list[RunRecord]:
    """Under the lock no other run is alive: a row still ``running`` belongs to a process that died
    (it is closed as failed), a half-written index to a run that was killed (it is removed)."""
    closed = []
    for run in await db.list_training_runs(limit=20):
        if run.status == "running":
            log.warning("training run %d was left running by a process that died; marking it failed", run.id)
            await db.update_training_run(run.id, log_line="the process running this died (crash or kill)")
            closed.append(await db.finish_training_run(run.id, "failed", metrics={"error": "interrupted"}))
    await asyncio.to_thread(remove_partial_writes, settings)
    return closed


async def recover_interrupted(db: Database, settings: EngineSettings) -> list[RunRecord]:
    """:func:`close_dead_runs` unless a training holds the lock (its run is alive); the closed runs."""
    try:
        async with run_lock(db, settings.data_dir, "start-up check"):
            return await close_dead_runs(db, settings)
    except TrainingLocked as busy:
        log.info("not checking for interrupted training runs: %s", busy)
        return []


@asynccontextmanager
async def training_run(
    db: Database, settings: EngineSettings, kind: str, params: dict[str, Any], progress: Progress | None
) -> AsyncIterator[Run]:
    """Hold the lock and a ``running`` row for the block; on any failure clean up and record it."""
    keep_rejected()  # a malformed setting stops the run before any work
    async with run_lock(db, settings.data_dir, kind) as stale:
        if stale is not None:
            log.warning("took over the training lock from %s, which died", stale.describe())
        await close_dead_runs(db, settings)
        run = Run(db, await db.start_training_run(kind, params, PROGRESS_MESSAGE.get()), progress, settings)
        try:
            yield run
        except BaseException as exc:
            for folder in run.made:  # written but never registered: nothing refers to it
                shutil.rmtree(folder, ignore_errors=True)
            message = str(exc) if isinstance(exc, FFError) else f"{type(exc).__name__}: {exc}"
            await asyncio.shield(record_failure(db, run.id, message))
            raise
        if not run.finished:
            await record_failure(db, run.id, "the run ended without a result")


async def record_failure(db: Database, run_id: int, message: str) -> None:
    try:
        await db.update_training_run(run_id, log_line=f"failed: {message}")
        await db.finish_training_run(run_id, "failed", metrics={"error": message[:500]})
    except Exception:  # noqa: BLE001 - the original error matters more
        log.exception("could not record the failure of training run %d", run_id)
