"""``Database``: the one door to storage for the bot, the trainer and the CLI.

Every method is async and one transaction; results are frozen dataclasses
(:mod:`ffengine.db.records`). Open it with :meth:`Database.open`, which brings the
schema to the newest migration first.
"""

from __future__ import annotations

import logging
from types import TracebackType

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.selectable import ScalarSelect

from ffengine.db import migrate
from ffengine.db import models as m
from ffengine.db.coordination import Coordination
from ffengine.db.engine import display_url, make_engine
from ffengine.db.errors import StorageError
from ffengine.db.presses import PressLog
from ffengine.db.products import ProductStore
from ffengine.db.records import LikeRate, Stats
from ffengine.db.replicas import ReplicaStore
from ffengine.db.searches import SearchLog
from ffengine.db.training import TrainingLog
from ffengine.db.users import UserStore
from ffengine.db.versions import ModelRegistry

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1000  # stats: percentiles over this many most recent successful searches
UNVERSIONED = "(no version)"  # stats.like_rate key for searches answered without a model version


class Database(UserStore, SearchLog, PressLog, ProductStore, ModelRegistry, TrainingLog, ReplicaStore, Coordination):
    """Async storage on any SQLAlchemy URL (SQLite file by default, PostgreSQL via asyncpg)."""

    @classmethod
    async def open(cls, url: str, *, upgrade: bool = True) -> Database:
        """Connect to ``url`` and migrate to the newest schema (``upgrade=False``: only
        check that it is already there, so a read-only tool never changes the schema)."""
        engine = make_engine(url)
        try:
            if upgrade:
                await migrate.upgrade_engine(engine)
            else:
                current, head = await migrate.engine_revision(engine), migrate.head_revision()
                if current != head:
                    raise StorageError(
                        f"the database is at schema {current or 'none'}, this code needs {head}: "
                        "run `ffengine db upgrade`"
                    )
        except BaseException:
            await engine.dispose()
            raise
        log.info("database ready: %s", display_url(url))
        return cls(engine)

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The database URL with its password hidden (safe to log or show)."""
        return display_url(self._engine.url)

    async def stats(self) -> Stats:
        """Counts, like rates per model version and recent latency, for the admin."""

        async def read(session: AsyncSession) -> Stats:
            def count(model: type[m.Base]) -> ScalarSelect[int]:
                return select(func.count()).select_from(model).scalar_subquery()

            ok = select(func.count()).select_from(m.Search).where(m.Search.outcome == "ok").scalar_subquery()
            users, searches, searches_ok, products, ratings = (
                await session.execute(select(count(m.User), count(m.Search), ok, count(m.Product), count(m.Feedback)))
            ).one()
            per_version = (
                await session.execute(
                    select(
                        m.ModelVersion.name,
                        func.count(m.Feedback.id),
                        func.coalesce(func.sum(case((m.Feedback.value > 0, 1), else_=0)), 0),
                    )
                    .select_from(m.Feedback)
                    .join(m.Recommendation, m.Recommendation.id == m.Feedback.recommendation_id)
                    .join(m.Search, m.Search.id == m.Recommendation.search_id)
                    .outerjoin(m.ModelVersion, m.ModelVersion.id == m.Search.model_version_id)
                    .group_by(m.ModelVersion.name)
                )
            ).all()
            like_rate = {(name or UNVERSIONED): LikeRate(rate=liked / n, ratings=n) for name, n, liked in per_version}
            likes = sum(liked for _, _, liked in per_version)
            latencies = list(
                await session.scalars(
                    select(m.Search.latency_ms)
                    .where(m.Search.outcome == "ok")
                    .order_by(m.Search.id.desc())
                    .limit(LATENCY_WINDOW)
                )
            )
            active = await session.scalar(select(m.ModelVersion.name).where(m.ModelVersion.is_active.is_(True)))
            p50, p95 = np.percentile(latencies, [50, 95]).tolist() if latencies else (None, None)
            return Stats(
                users=users,
                searches=searches,
                searches_ok=searches_ok,
                ratings=ratings,
                likes=likes,
                dislikes=ratings - likes,
                like_rate=like_rate,
                latency_p50_ms=p50,
                latency_p95_ms=p95,
                products=products,
                active_model_version=active,
            )

        return await self._read(read)
