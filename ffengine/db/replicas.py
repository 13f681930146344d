"""Replicas: heartbeats, and which replica took on each Telegram update (at most one).

Several bot processes may serve one database. Each writes a heartbeat (:meth:`heartbeat`)
naming the model version it answers with, so an admin sees whether all of them followed a
switch; each claims an update before handling it (:meth:`claim_update`), so an update
Telegram delivers twice is handled once. Both are one insert-or-update / insert-or-ignore
statement in the dialect's own syntax (SQLite and PostgreSQL both have ``ON CONFLICT``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.records import ReplicaRecord, UpdateClaim
from ffengine.db.store import BIGINT_MAX, Store, check_id, check_text, dialect_insert, to_record

#: Claims and heartbeats older than this are deleted (Telegram gives up re-delivering long before).
KEEP_FOR = timedelta(days=1)


def check_update_id(update_id: int) -> int:
    if not 0 <= check_id(update_id, "update_id") <= BIGINT_MAX:
        raise ValueError(f"update_id must be a non-negative 64-bit integer, got {update_id}")
    return update_id


class ReplicaStore(Store):
    async def heartbeat(self, replica: str, model_version_id: int | None) -> None:
        """Note that ``replica`` is alive now and answers with ``model_version_id``."""
        check_text(replica, "replica name", m.REPLICA_NAME_MAX)

        async def write(session: AsyncSession) -> None:
            now = m.utcnow()
            insert = dialect_insert(session)(m.Replica).values(name=replica, started_at=now, last_seen=now, model_version_id=model_version_id)
            await session.execute(insert.on_conflict_do_update(index_elements=[m.Replica.name], set_={"last_seen": now, "model_version_id": model_version_id}))

        await self._write(write, idempotent=True)

    async def forget_replica(self, replica: str) -> None:
        """A replica that stops says so: it is no longer listed, and its unfinished claims can be taken over."""

        async def write(session: AsyncSession) -> None:
            await session.execute(delete(m.Replica).where(m.Replica.name == replica))

        await self._write(write, idempotent=True)

    async def list_replicas(self, seen_within: timedelta | None = None) -> list[ReplicaRecord]:
        """Replicas by name, with the name of the version each serves; only those seen within ``seen_within``."""

        async def read(session: AsyncSession) -> list[ReplicaRecord]:
            query = select(m.Replica, m.ModelVersion.name).outerjoin(m.ModelVersion, m.ModelVersion.id == m.Replica.model_version_id)
            if seen_within is not None:
                query = query.where(m.Replica.last_seen >= m.utcnow() - seen_within)
            rows = await session.execute(query.order_by(m.Replica.name))
            return [to_record(ReplicaRecord, row, model_version=version) for row, version in rows]

        return await self._read(read)

    async def replica_last_seen(self, replica: str) -> datetime | None:
        """When ``replica`` last sent a heartbeat (``None``: never, or it stopped cleanly)."""

        async def read(session: AsyncSession) -> datetime | None:
            return await session.scalar(select(m.Replica.last_seen).where(m.Replica.name == replica))

        return await self._read(read)

    async def claim_update(self, update_id: int, replica: str) -> UpdateClaim:
        """Take on a Telegram update unless a replica already has: insert-or-ignore on its id."""
        check_update_id(update_id)
        check_text(replica, "replica name", m.REPLICA_NAME_MAX)

        async def write(session: AsyncSession) -> UpdateClaim:
            insert = dialect_insert(session)(m.ProcessedUpdate).values(update_id=update_id, replica=replica, received_at=m.utcnow())
            result = await session.execute(insert.on_conflict_do_nothing(index_elements=[m.ProcessedUpdate.update_id]))
            if result.rowcount == 1:
                return UpdateClaim(update_id, replica, mine=True, finished=False)
            row = await session.get(m.ProcessedUpdate, update_id)
            assert row is not None  # rows are only deleted a day later
            return UpdateClaim(update_id, row.replica, mine=False, finished=row.finished_at is not None)

        return await self._write(write)

    async def take_over_update(self, update_id: int, replica: str, previous: str) -> bool:
        """Claim an update ``previous`` took on and never finished (it died); False if another replica was quicker."""

        async def write(session: AsyncSession) -> bool:
            result = await session.execute(
                update(m.ProcessedUpdate)
                .where(m.ProcessedUpdate.update_id == update_id, m.ProcessedUpdate.replica == previous, m.ProcessedUpdate.finished_at.is_(None))
                .values(replica=replica, received_at=m.utcnow())
            )
            return result.rowcount == 1

        return await self._write(write)

    async def finish_update(self, update_id: int) -> None:
        """The update's handlers are done: a re-delivery is now simply dropped."""

        async def write(session: AsyncSession) -> None:
            await session.execute(update(m.ProcessedUpdate).where(m.ProcessedUpdate.update_id == update_id).values(finished_at=m.utcnow()))

        await self._write(write, idempotent=True)

    async def prune_replicas_and_updates(self, older_than: timedelta = KEEP_FOR) -> int:
        """Delete claims, heartbeats and erasure notes older than ``older_than``; how many rows went."""

        async def write(session: AsyncSession) -> int:
            cutoff = m.utcnow() - older_than
            claims = await session.execute(delete(m.ProcessedUpdate).where(m.ProcessedUpdate.received_at < cutoff))
            replicas = await session.execute(delete(m.Replica).where(m.Replica.last_seen < cutoff))
            erasures = await session.execute(delete(m.Erasure).where(m.Erasure.erased_at < cutoff))  # as old as any claim
            return claims.rowcount + replicas.rowcount + erasures.rowcount

        return await self._write(write, idempotent=True)
