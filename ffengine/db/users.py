"""Users: first/last seen, language, and their right to see and erase what is kept."""

from __future__ import annotations

from sqlalchemy import case, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.records import UserSummary
from ffengine.db.store import Store, check_text, check_user_id, dialect_insert, lock_user


async def ensure_user(session: AsyncSession, user_id: int, language: str | None = None) -> None:
    """Create the user row or refresh ``last_seen`` (and ``language`` when given): one upsert."""
    now = m.utcnow()
    insert = dialect_insert(session)(m.User).values(id=user_id, language=language, first_seen=now, last_seen=now)
    refresh = {"last_seen": now} if language is None else {"last_seen": now, "language": language}
    await session.execute(insert.on_conflict_do_update(index_elements=[m.User.id], set_=refresh))


async def note_erasure(session: AsyncSession, user_id: int, update_id: int) -> None:
    """Remember that the user was erased at ``update_id`` (the latest such update, if erased again)."""
    insert = dialect_insert(session)(m.Erasure).values(user_id=user_id, update_id=update_id, erased_at=m.utcnow())
    later = insert.excluded.update_id
    newer = case((later > m.Erasure.update_id, later), else_=m.Erasure.update_id)
    await session.execute(
        insert.on_conflict_do_update(index_elements=[m.Erasure.user_id], set_={"update_id": newer, "erased_at": m.utcnow()})
    )


async def erased_after(session: AsyncSession, user_id: int, update_id: int) -> bool:
    """Whether the user was erased by a /forget received after the update ``update_id``."""
    erased_by = await session.scalar(select(m.Erasure.update_id).where(m.Erasure.user_id == user_id))
    return erased_by is not None and erased_by > update_id


class UserStore(Store):
    async def touch_user(self, user_id: int, language: str | None) -> None:
        """Note that the user talked to the bot now (``language``: Telegram's language_code)."""
        check_user_id(user_id)
        check_text(language, "language", 16, optional=True)

        async def write(session: AsyncSession) -> None:
            await ensure_user(session, user_id, language)

        await self._write(write)

    async def forget_user(self, user_id: int, *, update_id: int | None = None) -> int:
        """Erase the user's searches (with the items seen in their photos and the buttons they
        pressed), what they were shown, their ratings and the user row.

        ``update_id``: the /forget's Telegram update. It is noted (:class:`~ffengine.db.models.Erasure`)
        so that a search of an earlier update, logged after this by another replica, is refused.

        Returns the number of rows deleted (0 for an unknown user). Explicit deletes, not
        only ON DELETE CASCADE, so the count is exact and nothing depends on the backend.
        The user's row is locked first, as every write of their rows does, so a rating or a
        search being logged at the same moment is waited for (or waits), never a deadlock.
        """
        check_user_id(user_id)

        async def write(session: AsyncSession) -> int:
            await lock_user(session, user_id, erase=True)
            their_searches = select(m.Search.id).where(m.Search.user_id == user_id)
            their_recommendations = select(m.Recommendation.id).where(m.Recommendation.search_id.in_(their_searches))
            statements = [
                delete(m.Feedback).where(
                    (m.Feedback.user_id == user_id) | m.Feedback.recommendation_id.in_(their_recommendations)
                ),
                delete(m.SearchOrigin).where(
                    m.SearchOrigin.search_id.in_(their_searches) | m.SearchOrigin.parent_search_id.in_(their_searches)
                ),
                delete(m.SearchItem).where(m.SearchItem.search_id.in_(their_searches)),
                delete(m.Recommendation).where(m.Recommendation.search_id.in_(their_searches)),
                delete(m.Search).where(m.Search.user_id == user_id),
                delete(m.User).where(m.User.id == user_id),
            ]
            deleted = 0
            for statement in statements:
                result = await session.execute(statement.execution_options(synchronize_session=False))
                deleted += result.rowcount  # type: ignore[attr-defined]
            if update_id is not None:
                await note_erasure(session, user_id, update_id)
            return deleted

        return await self._write(write)

    async def user_summary(self, user_id: int) -> UserSummary:
        """What is kept about the user: counts and dates (``known=False`` if nothing)."""
        check_user_id(user_id)

        async def read(session: AsyncSession) -> UserSummary:
            user = await session.get(m.User, user_id)
            searches, with_embedding = (
                await session.execute(
                    select(func.count(m.Search.id), func.count(m.Search.embedding)).where(m.Search.user_id == user_id)
                )
            ).one()
            recommendations = await session.scalar(
                select(func.count(m.Recommendation.id))
                .join(m.Search, m.Search.id == m.Recommendation.search_id)
                .where(m.Search.user_id == user_id)
            )
            ratings, likes = (
                await session.execute(
                    select(
                        func.count(m.Feedback.id), func.coalesce(func.sum(case((m.Feedback.value > 0, 1), else_=0)), 0)
                    ).where(m.Feedback.user_id == user_id)
                )
            ).one()
            return UserSummary(
                user_id=user_id,
                known=user is not None,
                language=user.language if user else None,
                first_seen=user.first_seen if user else None,
                last_seen=user.last_seen if user else None,
                searches=searches,
                searches_with_embedding=with_embedding,
                recommendations=recommendations or 0,
                ratings=ratings,
                likes=likes,
                dislikes=ratings - likes,
            )

        return await self._read(read)
