"""Training runs: status, progress and log for admins to watch.

At most one run is ``running`` (a partial unique index enforces it). This is a record,
not a process lock: ``train/`` holds the crash-proof lock and finishes runs whose
process died (``finish_training_run(run_id, "failed")``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.errors import NotFound, StorageError, TrainingBusy
from ffengine.db.records import TrainingRun
from ffengine.db.store import Store, check_finite, check_id, check_text, to_json, to_record

LOG_MAX_CHARS = 64_000  # the log keeps its newest part
FINISHED_STATUSES = tuple(s for s in m.TRAINING_STATUSES if s != "running")


def append_log(log: str, line: str) -> str:
    text = log + line.rstrip("\n") + "\n"
    if len(text) > LOG_MAX_CHARS:
        text = "…\n" + text[-LOG_MAX_CHARS:].split("\n", 1)[-1]
    return text


async def running_run_id(session: AsyncSession) -> int | None:
    return await session.scalar(select(m.TrainingRun.id).where(m.TrainingRun.status == "running"))


async def require_run(session: AsyncSession, run_id: int) -> m.TrainingRun:
    row = await session.get(m.TrainingRun, check_id(run_id, "run_id"))
    if row is None:
        raise NotFound(f"no training run {run_id}")
    return row


class TrainingLog(Store):
    async def start_training_run(
        self, kind: str, params: dict[str, Any], progress_message: dict[str, Any] | None = None
    ) -> int:
        """Record a new running run and return its id; :class:`TrainingBusy` if one runs.

        ``progress_message``: where a person watches the run (kept with it, e.g. the bot's
        status message), so that the run can be reported there if its process dies.
        """
        check_text(kind, "training kind", 32)
        params_json = to_json(params, "params")
        message_json = to_json(progress_message, "progress_message")

        async def write(session: AsyncSession) -> int:
            busy = await running_run_id(session)
            if busy is not None:
                raise TrainingBusy(busy)
            row = m.TrainingRun(
                kind=kind, params=params_json, status="running", progress=0.0, log="", progress_message=message_json
            )
            session.add(row)
            await session.flush()
            return row.id

        try:
            return await self._write(write)
        except IntegrityError:  # another process started one between our check and insert
            busy = await self._read(running_run_id)
            raise TrainingBusy(busy if busy is not None else -1) from None

    async def update_training_run(
        self, run_id: int, progress: float | None = None, log_line: str | None = None
    ) -> None:
        """Set progress (0..1) and/or append a log line to a running run."""
        fraction = None if progress is None else check_finite(progress, "progress", minimum=0.0)
        if fraction is not None and fraction > 1:
            raise ValueError(f"progress must be at most 1, got {progress}")

        async def write(session: AsyncSession) -> None:
            row = await require_run(session, run_id)
            if row.status != "running":
                raise StorageError(f"training run {run_id} already finished ({row.status})")
            if fraction is not None:
                row.progress = fraction
            if log_line is not None:
                row.log = append_log(row.log, log_line)
            await session.flush()

        await self._write(write)

    async def finish_training_run(
        self,
        run_id: int,
        status: str,
        model_version_id: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> TrainingRun:
        """Close a running run: ``succeeded``, ``failed`` (crashed or errored) or ``rejected``
        (trained, but evaluated worse than the active version), with what it produced."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINISHED_STATUSES)}, got {status!r}")
        if model_version_id is not None:
            check_id(model_version_id, "model_version_id")
        metrics_json = to_json(metrics, "metrics")

        async def write(session: AsyncSession) -> TrainingRun:
            row = await require_run(session, run_id)
            if row.status != "running":
                raise StorageError(f"training run {run_id} already finished ({row.status})")
            if model_version_id is not None and await session.get(m.ModelVersion, model_version_id) is None:
                raise NotFound(f"no model version {model_version_id}")
            row.status = status
            row.finished_at = m.utcnow()
            if status == "succeeded":
                row.progress = 1.0
            row.model_version_id = model_version_id
            if metrics_json is not None:
                row.metrics = metrics_json
            await session.flush()
            return to_record(TrainingRun, row)

        return await self._write(write)

    async def list_training_runs(self, limit: int = 20) -> list[TrainingRun]:
        """Newest first."""
        if check_id(limit, "limit") < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")

        async def read(session: AsyncSession) -> list[TrainingRun]:
            rows = await session.scalars(select(m.TrainingRun).order_by(m.TrainingRun.id.desc()).limit(limit))
            return [to_record(TrainingRun, r) for r in rows]

        return await self._read(read)
