"""What the storage layer hands out: plain frozen dataclasses, never ORM objects,
so callers never hold a session or trigger a lazy load."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SearchRecord:
    search_id: int
    recommendation_ids: list[int]  # in rank order (rank 1 first)


@dataclass(frozen=True)
class StoredItem:
    """A garment seen in a photo search, as logged: its button's place, category and box."""

    position: int  # 0 = the most probable
    category: str
    probability: float
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the photo's own pixels


@dataclass(frozen=True)
class PressedItem:
    """An item button its own user pressed: what searching that item again needs."""

    search_id: int
    item: StoredItem
    items: list[StoredItem]  # all of the photo's items (the answer offers the others)
    file_id: str | None  # None: the photo can no longer be downloaded
    file_unique_id: str | None
    model_version_id: int | None


@dataclass(frozen=True)
class PressedRecommendation:
    """A "more like this" button its own user pressed: the product to search with."""

    recommendation_id: int
    search_id: int
    product_id: str


@dataclass(frozen=True)
class Origin:
    """Which button a search started from (see ``models.SearchOrigin``); use the constructors."""

    kind: str  # "item" or "more_like"
    parent_search_id: int
    item_index: int | None = None
    source_recommendation_id: int | None = None

    @classmethod
    def item(cls, search_id: int, position: int) -> Origin:
        return cls("item", search_id, item_index=position)

    @classmethod
    def more_like(cls, pressed: PressedRecommendation) -> Origin:
        return cls("more_like", pressed.search_id, source_recommendation_id=pressed.recommendation_id)


@dataclass(frozen=True)
class RatingResult:
    recommendation_id: int
    search_id: int
    value: int  # +1 or -1, as now stored
    changed: bool  # False when the same button was pressed again
    previous: int | None = None  # the value before, None for a first rating


@dataclass(frozen=True)
class LikeRate:
    rate: float  # likes / ratings
    ratings: int


@dataclass(frozen=True)
class Stats:
    users: int
    searches: int
    searches_ok: int
    ratings: int
    likes: int
    dislikes: int
    like_rate: dict[str, LikeRate]  # model version name (UNVERSIONED for none) -> rate
    latency_p50_ms: float | None  # over the most recent successful searches
    latency_p95_ms: float | None
    products: int
    active_model_version: str | None


@dataclass(frozen=True)
class FeedbackItem:
    recommendation_id: int
    rank: int
    product_id: str
    distance: float
    rating: int | None  # the searcher's +1 / -1, None when not rated
    implicit: bool = False  # the +1 was not pressed: the searcher chose an item of this product's category


@dataclass(frozen=True)
class FeedbackSearch:
    search_id: int
    user_id: int
    model_version_id: int | None
    embedding: np.ndarray  # (1280,) float32 backbone features of the query photo
    created_at: datetime
    items: list[FeedbackItem]


@dataclass(frozen=True)
class UserSummary:
    """Everything kept about one user (photos are never kept)."""

    user_id: int
    known: bool
    language: str | None
    first_seen: datetime | None
    last_seen: datetime | None
    searches: int
    searches_with_embedding: int  # 1280 numbers describing a photo, not the photo
    recommendations: int
    ratings: int
    likes: int
    dislikes: int


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    updated: int
    unchanged: int


@dataclass(frozen=True)
class ModelVersion:
    id: int
    name: str
    parent_id: int | None
    created_at: datetime
    weights: str  # torchvision weights name or a file path
    index_dir: str
    metrics: dict[str, Any] | None
    notes: str | None
    active: bool
    activated_at: datetime | None


@dataclass(frozen=True)
class TrainingRun:
    id: int
    kind: str
    params: dict[str, Any] | None
    status: str  # running / succeeded / failed / rejected
    progress: float  # 0..1
    log: str
    started_at: datetime
    finished_at: datetime | None
    model_version_id: int | None
    metrics: dict[str, Any] | None
    progress_message: dict[str, Any] | None = None  # where a person watches it (see models.TrainingRun)


@dataclass(frozen=True)
class ReplicaRecord:
    """A bot process's last heartbeat: the model version it answers with (``None``: none yet)."""

    name: str
    started_at: datetime
    last_seen: datetime
    model_version_id: int | None
    model_version: str | None  # its name


@dataclass(frozen=True)
class UpdateClaim:
    """Who took on a Telegram update: ``mine`` when this call claimed it, else the replica that had."""

    update_id: int
    replica: str
    mine: bool
    finished: bool
