"""Model versions: which backbone + index answered, and which one answers now."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.coordination import ACTIVE_VERSION_CHANNEL
from ffengine.db.errors import NotFound, StorageError, Superseded
from ffengine.db.records import ModelVersion
from ffengine.db.store import BIGINT_MAX, Store, check_id, check_text, to_json, to_record


def version_record(row: m.ModelVersion) -> ModelVersion:
    return to_record(ModelVersion, row, active=row.is_active)


async def find_version(session: AsyncSession, id_or_name: int | str) -> m.ModelVersion | None:
    """By id (an int) or by name (a str; a name made of digits is still a name)."""
    if isinstance(id_or_name, str):
        return await session.scalar(select(m.ModelVersion).where(m.ModelVersion.name == id_or_name))
    if abs(check_id(id_or_name, "model version id")) > BIGINT_MAX:  # no row has it; the driver could not even send it
        return None
    return await session.get(m.ModelVersion, id_or_name)


async def require_version(session: AsyncSession, id_or_name: int | str) -> m.ModelVersion:
    row = await find_version(session, id_or_name)
    if row is None:
        raise NotFound(f"no model version {id_or_name!r}")
    return row


async def make_active(session: AsyncSession, row: m.ModelVersion) -> None:
    """Deactivate the others first, then activate ``row``: the partial unique index
    (one active at most) holds at every statement. On PostgreSQL every listening replica is
    notified when the transaction commits (and not if it does not)."""
    await session.execute(
        update(m.ModelVersion)
        .where(m.ModelVersion.is_active.is_(True), m.ModelVersion.id != row.id)
        .values(is_active=False)
        .execution_options(synchronize_session=False)
    )
    if not row.is_active:
        row.is_active = True
        row.activated_at = m.utcnow()
    await session.flush()
    if session.bind.dialect.name == "postgresql":
        await session.execute(select(func.pg_notify(ACTIVE_VERSION_CHANNEL, str(row.id))))


class ModelRegistry(Store):
    async def create_model_version(
        self,
        name: str,
        weights: str,
        index_dir: str,
        *,
        parent_id: int | None = None,
        metrics: dict[str, Any] | None = None,
        notes: str | None = None,
        activate: bool = False,
    ) -> ModelVersion:
        """Register a model version (``weights``: torchvision name or file path).
        Names are unique; ``activate=True`` also makes it the one that answers."""
        check_text(name, "model version name", 128)
        check_text(str(weights), "weights", 100_000)
        check_text(str(index_dir), "index_dir", 100_000)
        if parent_id is not None:
            check_id(parent_id, "parent_id")
        metrics_json = to_json(metrics, "metrics")

        async def write(session: AsyncSession) -> ModelVersion:
            if parent_id is not None and await session.get(m.ModelVersion, parent_id) is None:
                raise NotFound(f"no parent model version {parent_id}")
            if await find_version(session, name) is not None:
                raise StorageError(f"a model version named {name!r} already exists")
            row = m.ModelVersion(
                name=name,
                weights=str(weights),
                index_dir=str(index_dir),
                parent_id=parent_id,
                metrics=metrics_json,
                notes=notes,
            )
            session.add(row)
            await session.flush()
            if activate:
                await make_active(session, row)
            return version_record(row)

        try:
            return await self._write(write, retry_on_conflict=True)
        except IntegrityError:  # still a clash after the retries: a concurrent creator kept the name
            raise StorageError(f"a model version named {name!r} already exists") from None

    async def activate_model_version(self, version_id_or_name: int | str, *, replacing: int | None = None) -> ModelVersion:
        """Make this version the one that answers; every other version is deactivated
        in the same transaction (raises :class:`NotFound` for an unknown one).

        ``replacing``: the id of the version this one is to replace; if another is active by now,
        :class:`Superseded` is raised and nothing changes (checked in the same transaction, so a
        rollback made while the caller loaded this version is never undone)."""

        async def write(session: AsyncSession) -> ModelVersion:
            row = await require_version(session, version_id_or_name)
            if replacing is not None:
                active = await session.scalar(select(m.ModelVersion).where(m.ModelVersion.is_active.is_(True)).with_for_update())
                if active is None or active.id != replacing:
                    now = f"{active.name} is active" if active else "no version is active"
                    raise Superseded(f"{row.name} was not activated: {now} now, not the version it was to replace")
            await make_active(session, row)
            return version_record(row)

        return await self._write(write, retry_on_conflict=True)

    async def active_model_version(self) -> ModelVersion | None:
        async def read(session: AsyncSession) -> ModelVersion | None:
            row = await session.scalar(select(m.ModelVersion).where(m.ModelVersion.is_active.is_(True)))
            return version_record(row) if row else None

        return await self._read(read)

    async def get_model_version(self, id_or_name: int | str) -> ModelVersion | None:
        async def read(session: AsyncSession) -> ModelVersion | None:
            row = await find_version(session, id_or_name)
            return version_record(row) if row else None

        return await self._read(read)

    async def list_model_versions(self) -> list[ModelVersion]:
        """Oldest first."""

        async def read(session: AsyncSession) -> list[ModelVersion]:
            rows = await session.scalars(select(m.ModelVersion).order_by(m.ModelVersion.id))
            return [version_record(r) for r in rows]

        return await self._read(read)
