"""The search log and its ratings: what the bot writes and the retraining reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ffengine.db import models as m
from ffengine.db.errors import Erased, FeedbackRefused, NotFound
from ffengine.db.presses import (
    ItemLike,
    add_origin,
    check_origin,
    implied_likes,
    item_rows,
    owned_recommendation,
    pressed_key,
)
from ffengine.db.records import FeedbackItem, FeedbackSearch, Origin, RatingResult, SearchRecord
from ffengine.db.store import Store, check_finite, check_id, check_text, check_user_id, lock_user
from ffengine.db.users import ensure_user, erased_after

EMBEDDING_DTYPE = np.dtype("<f4")  # little-endian float32 on every machine
EXPORT_CHUNK = 500
MAX_RESULTS = 1000


def embedding_to_bytes(embedding: Any) -> bytes:
    """``(1280,)`` (or ``(1, 1280)``) finite floats -> 5120 bytes of little-endian float32."""
    arr = np.asarray(embedding, dtype=EMBEDDING_DTYPE)
    if arr.shape not in ((m.EMBEDDING_DIM,), (1, m.EMBEDDING_DIM)):
        raise ValueError(f"embedding must have shape ({m.EMBEDDING_DIM},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("embedding has NaN or infinite values")
    return np.ascontiguousarray(arr.reshape(-1)).tobytes()


def embedding_from_bytes(blob: bytes) -> np.ndarray:
    """The stored bytes as a fresh writable ``(1280,)`` native float32 array."""
    return np.frombuffer(blob, dtype=EMBEDDING_DTYPE).astype(np.float32)


class SearchLog(Store):
    async def record_search(
        self,
        user_id: int,
        file_unique_id: str | None,
        embedding: np.ndarray | None,
        model_version_id: int | None,
        latency_ms: float,
        outcome: str,
        results: Sequence[tuple[str, float]],
        *,
        file_id: str | None = None,
        items: Sequence[ItemLike] = (),
        origin: Origin | None = None,
        update_id: int | None = None,
    ) -> SearchRecord:
        """Log one search and what it showed (``results`` in rank order, rank 1 first).

        ``outcome`` is ``"ok"`` or a short error kind (``not_image``, ``timeout``...).
        The user row is created if the bot never touched it. Only the photo's Telegram
        ``file_unique_id`` / ``file_id`` and its embedding are kept, never the photo.
        A photo search logs the ``items`` it offered (most probable first); a search started
        from a button logs its ``origin``, refused (:class:`FeedbackRefused`) unless that is
        still the user's own. A search of the Telegram update ``update_id`` is refused
        (:class:`Erased`) when a /forget received after that update has erased the user meanwhile.
        """
        check_user_id(user_id)
        check_text(file_unique_id, "file_unique_id", 128, optional=True)
        check_text(file_id, "file_id", 256, optional=True)
        item_values = item_rows(items)
        if origin is not None:
            check_origin(origin)
        check_text(outcome, "outcome", 32)
        blob = None if embedding is None else embedding_to_bytes(embedding)
        if model_version_id is not None:
            check_id(model_version_id, "model_version_id")
        if update_id is not None:
            check_id(update_id, "update_id")
        latency = check_finite(latency_ms, "latency_ms", minimum=0.0)
        if len(results) > MAX_RESULTS:
            raise ValueError(f"at most {MAX_RESULTS} results per search, got {len(results)}")
        rows = [
            {
                "rank": rank,
                "product_id": check_text(product_id, "product id", m.PRODUCT_ID_MAX),
                "distance": check_finite(distance, "distance"),
            }
            for rank, (product_id, distance) in enumerate(results, start=1)
        ]

        async def write(session: AsyncSession) -> SearchRecord:
            if model_version_id is not None and await session.get(m.ModelVersion, model_version_id) is None:
                raise NotFound(f"no model version {model_version_id}")
            await ensure_user(session, user_id)  # locks the user's row first (see lock_user)
            if update_id is not None and await erased_after(session, user_id, update_id):
                raise Erased(f"user {user_id} was erased after update {update_id} arrived; its search is not kept")
            search = m.Search(
                user_id=user_id,
                file_unique_id=file_unique_id,
                file_id=file_id,
                embedding=blob,
                model_version_id=model_version_id,
                latency_ms=latency,
                outcome=outcome,
            )
            session.add(search)
            await session.flush()
            if origin is not None:
                await add_origin(session, search.id, user_id, origin)
            recommendations = [m.Recommendation(search_id=search.id, **row) for row in rows]
            session.add_all([*recommendations, *(m.SearchItem(search_id=search.id, **row) for row in item_values)])
            await session.flush()
            return SearchRecord(search.id, [r.id for r in recommendations])

        return await self._write(write)

    async def rate(self, user_id: int, recommendation_id: int, value: int) -> RatingResult:
        """Record 👍 (+1) or 👎 (-1) on a recommendation the user was shown.

        Pressing the same button again changes nothing (``changed=False``); the other
        one replaces the rating. Refused (:class:`FeedbackRefused`, nothing written) when
        the value is not ±1, the recommendation does not exist or answered someone
        else's search.
        """
        check_user_id(user_id)
        if isinstance(value, bool) or value not in (1, -1):
            raise FeedbackRefused("a rating is 👍 or 👎", reason="bad_value")
        if isinstance(recommendation_id, bool) or not isinstance(recommendation_id, int):
            raise FeedbackRefused("this button does not belong to a recommendation", reason="not_found")
        pressed_key(recommendation_id, m.Recommendation.id, "recommendation_id")

        async def write(session: AsyncSession) -> RatingResult:
            await lock_user(session, user_id)  # an erase of the user's rows runs wholly before or after
            search_id = (await owned_recommendation(session, user_id, recommendation_id)).search_id
            feedback = await session.scalar(
                select(m.Feedback).where(
                    m.Feedback.recommendation_id == recommendation_id, m.Feedback.user_id == user_id
                )
            )
            if feedback is None:
                session.add(m.Feedback(user_id=user_id, recommendation_id=recommendation_id, value=value))
                await session.flush()
                return RatingResult(recommendation_id, search_id, value, changed=True, previous=None)
            previous = feedback.value
            if previous != value:
                feedback.value = value
                feedback.updated_at = m.utcnow()
                await session.flush()
            return RatingResult(recommendation_id, search_id, value, changed=previous != value, previous=previous)

        return await self._write(write, retry_on_conflict=True, idempotent=True)  # the same press twice is one rating

    async def ratings_for_search(self, user_id: int, search_id: int) -> dict[int, int]:
        """The user's ratings on one search: recommendation id -> +1 / -1."""
        check_user_id(user_id)
        check_id(search_id, "search_id")

        async def read(session: AsyncSession) -> dict[int, int]:
            rows = await session.execute(
                select(m.Feedback.recommendation_id, m.Feedback.value)
                .join(m.Recommendation, m.Recommendation.id == m.Feedback.recommendation_id)
                .where(m.Recommendation.search_id == search_id, m.Feedback.user_id == user_id)
            )
            return {rec_id: value for rec_id, value in rows}

        return await self._read(read)

    async def export_feedback(
        self, *, since_id: int | None = None, rated_only: bool = False, limit: int | None = None
    ) -> list[FeedbackSearch]:
        """Searches that kept an embedding (id > ``since_id``, oldest first), each with what
        it showed and the searcher's rating of each item: the retraining's input.

        A product the searcher did not rate but whose category is an item they chose from
        that photo counts as liked (``implicit``). ``rated_only`` keeps searches with at least
        one rating, pressed or implied; ``limit`` caps the count
        (page with ``since_id`` = the last ``search_id`` seen).
        """
        if since_id is not None:
            check_id(since_id, "since_id")
        if limit is not None and (check_id(limit, "limit") < 1):
            raise ValueError(f"limit must be at least 1, got {limit}")

        async def read(session: AsyncSession) -> list[FeedbackSearch]:
            query = select(m.Search).where(m.Search.embedding.is_not(None)).order_by(m.Search.id)
            if since_id is not None:
                query = query.where(m.Search.id > since_id)
            if rated_only:
                rated = (
                    select(m.Feedback.id)
                    .join(m.Recommendation, m.Recommendation.id == m.Feedback.recommendation_id)
                    .where(m.Recommendation.search_id == m.Search.id, m.Feedback.user_id == m.Search.user_id)
                )
                implied = implied_likes().where(m.Recommendation.search_id == m.Search.id)
                query = query.where(rated.exists() | implied.exists())
            if limit is not None:
                query = query.limit(limit)
            searches = list(await session.scalars(query))
            items: dict[int, list[FeedbackItem]] = defaultdict(list)
            for start in range(0, len(searches), EXPORT_CHUNK):
                ids = [s.id for s in searches[start : start + EXPORT_CHUNK]]
                rows = await session.execute(
                    select(m.Recommendation, m.Feedback.value)
                    .join(m.Search, m.Search.id == m.Recommendation.search_id)
                    .outerjoin(
                        m.Feedback,
                        (m.Feedback.recommendation_id == m.Recommendation.id)
                        & (m.Feedback.user_id == m.Search.user_id),
                    )
                    .where(m.Recommendation.search_id.in_(ids))
                    .order_by(m.Recommendation.search_id, m.Recommendation.rank)
                )
                chosen = set(await session.scalars(implied_likes().where(m.Recommendation.search_id.in_(ids))))
                for rec, rating in rows:
                    implicit = rating is None and rec.id in chosen
                    items[rec.search_id].append(
                        FeedbackItem(rec.id, rec.rank, rec.product_id, rec.distance, 1 if implicit else rating, implicit)
                    )
            exported = []
            for s in searches:
                assert s.embedding is not None  # selected for it
                embedding = embedding_from_bytes(s.embedding)
                exported.append(
                    FeedbackSearch(s.id, s.user_id, s.model_version_id, embedding, s.created_at, items[s.id])
                )
            return exported

        return await self._read(read)
