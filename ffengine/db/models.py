"""The schema: SQLAlchemy 2 declarative models, mirrored by the Alembic migrations.

Portable across SQLite and PostgreSQL: plain types, CHECK constraints instead of
native enums, partial unique indexes (both dialects have them) as the database's own
guard for "one active model version" and "one running training run". Timestamps are
stored in UTC and always come back timezone-aware. Users' photos are never stored:
a search keeps the photo's Telegram ``file_unique_id`` and its backbone embedding.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ffengine.catalog import FIELD_LIMITS

EMBEDDING_DIM = 1280  # == ffengine.embedder.FEATURE_DIM (kept here so storage never imports torch)
EMBEDDING_BYTES = EMBEDDING_DIM * 4  # float32
PRODUCT_ID_MAX = 255  # as the migrations made the column: wider than the importer's ids (FIELD_LIMITS["id"])
#: The longest text of each product field: the importer's own limits (``ffengine.catalog.FIELD_LIMITS``), so that
#: every row it accepts fits the ``products`` columns; ``ffengine.db.products`` checks rows against them.
PRODUCT_FIELD_MAX = FIELD_LIMITS
TRAINING_STATUSES = ("running", "succeeded", "failed", "rejected")
CATEGORY_MAX = PRODUCT_FIELD_MAX["category"]  # a garment item's category is a catalogue category
REPLICA_NAME_MAX = 128

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC; naive values are refused on the way in (they hide bugs)
    and values read back from SQLite (which keeps no offset) are marked UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON()}


class User(Base):
    """A Telegram user who has talked to the bot (no name, no username: not needed)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    language: Mapped[str | None] = mapped_column(sa.String(16))
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """A backbone + index pair that can answer searches; at most one is active."""

    __tablename__ = "model_versions"
    __table_args__ = (
        sa.Index(
            "uq_model_versions_one_active",
            "is_active",
            unique=True,
            sqlite_where=sa.text("is_active"),
            postgresql_where=sa.text("is_active"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("model_versions.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    weights: Mapped[str] = mapped_column(sa.Text)
    index_dir: Mapped[str] = mapped_column(sa.Text)
    metrics: Mapped[dict[str, Any] | None]
    notes: Mapped[str | None] = mapped_column(sa.Text)
    is_active: Mapped[bool] = mapped_column(default=False)
    activated_at: Mapped[datetime | None]


class Search(Base):
    """One photo a user sent and how it was answered."""

    __tablename__ = "searches"
    __table_args__ = (
        sa.CheckConstraint("latency_ms >= 0", name="latency_nonnegative"),
        sa.CheckConstraint("length(outcome) > 0", name="outcome_not_empty"),
        sa.CheckConstraint(f"embedding IS NULL OR length(embedding) = {EMBEDDING_BYTES}", name="embedding_size"),
        sa.Index(None, "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    file_unique_id: Mapped[str | None] = mapped_column(sa.String(128))
    embedding: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    model_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("model_versions.id"), index=True)
    latency_ms: Mapped[float] = mapped_column(sa.Float)
    outcome: Mapped[str] = mapped_column(sa.String(32))
    #: Telegram's downloadable id of the photo: pressing one of its items downloads it again
    #: (the photo itself is never stored).
    file_id: Mapped[str | None] = mapped_column(sa.String(256))


class SearchItem(Base):
    """A garment the engine saw in a photo search (most probable first), offered as a button.

    The box is in the photo's own pixels, so pressing the item crops the same place again.
    """

    __tablename__ = "search_items"
    __table_args__ = (
        sa.CheckConstraint("position >= 0", name="position_nonnegative"),
        sa.CheckConstraint("probability >= 0 AND probability <= 1", name="probability_fraction"),
        sa.CheckConstraint("box_left >= 0 AND box_top >= 0 AND box_right > box_left AND box_bottom > box_top", name="box_valid"),
    )

    search_id: Mapped[int] = mapped_column(sa.ForeignKey("searches.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True, autoincrement=False)
    category: Mapped[str] = mapped_column(sa.String(CATEGORY_MAX))
    probability: Mapped[float] = mapped_column(sa.Float)
    box_left: Mapped[int] = mapped_column(sa.Integer)
    box_top: Mapped[int] = mapped_column(sa.Integer)
    box_right: Mapped[int] = mapped_column(sa.Integer)
    box_bottom: Mapped[int] = mapped_column(sa.Integer)


class SearchOrigin(Base):
    """Where a search that started from a button came from: an item of an earlier photo search
    (``item``) or a product an earlier search showed (``more_like``). A search without one
    started from a photo. A table of its own, not columns on ``searches``: SQLite would copy
    ``searches`` to add constraints, and dropping the old copy cascades into its recommendations.
    """

    __tablename__ = "search_origins"
    __table_args__ = (
        sa.CheckConstraint(
            "(kind = 'item' AND item_index IS NOT NULL AND source_recommendation_id IS NULL)"
            " OR (kind = 'more_like' AND item_index IS NULL AND source_recommendation_id IS NOT NULL)",
            name="kind_matches_source",
        ),
    )

    search_id: Mapped[int] = mapped_column(sa.ForeignKey("searches.id", ondelete="CASCADE"), primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(sa.String(16))
    parent_search_id: Mapped[int] = mapped_column(sa.ForeignKey("searches.id", ondelete="CASCADE"), index=True)
    item_index: Mapped[int | None] = mapped_column(sa.SmallInteger)
    source_recommendation_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("recommendations.id", ondelete="CASCADE"), index=True
    )


class Recommendation(Base):
    """A product shown for a search, at a rank (1 = closest). ``product_id`` is not a
    foreign key: the catalogue may be re-imported without the product, the log stays."""

    __tablename__ = "recommendations"
    __table_args__ = (
        sa.UniqueConstraint("search_id", "rank"),
        sa.CheckConstraint("rank >= 1", name="rank_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[int] = mapped_column(sa.ForeignKey("searches.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(sa.SmallInteger)
    product_id: Mapped[str] = mapped_column(sa.String(PRODUCT_ID_MAX), index=True)
    distance: Mapped[float] = mapped_column(sa.Float)


class Feedback(Base):
    """A user's 👍 (+1) or 👎 (-1) on one recommendation; one per user and recommendation."""

    __tablename__ = "feedback"
    __table_args__ = (
        sa.UniqueConstraint("recommendation_id", "user_id"),
        sa.CheckConstraint("value IN (-1, 1)", name="value_is_vote"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    recommendation_id: Mapped[int] = mapped_column(sa.ForeignKey("recommendations.id", ondelete="CASCADE"))
    value: Mapped[int] = mapped_column(sa.SmallInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Product(Base):
    """The store catalogue as imported, plus the Telegram ``file_id`` of its photo once
    uploaded (cleared when a re-import changes the image)."""

    __tablename__ = "products"

    id: Mapped[str] = mapped_column(sa.String(PRODUCT_ID_MAX), primary_key=True)
    title: Mapped[str] = mapped_column(sa.Text)
    url: Mapped[str | None] = mapped_column(sa.Text)
    image: Mapped[str] = mapped_column(sa.Text)
    category: Mapped[str | None] = mapped_column(sa.String(CATEGORY_MAX), index=True)
    colour: Mapped[str | None] = mapped_column(sa.String(PRODUCT_FIELD_MAX["colour"]))
    gender: Mapped[str | None] = mapped_column(sa.String(PRODUCT_FIELD_MAX["gender"]))
    price: Mapped[float | None] = mapped_column(sa.Float)
    currency: Mapped[str | None] = mapped_column(sa.String(PRODUCT_FIELD_MAX["currency"]))
    extra: Mapped[dict[str, Any] | None]
    photo_file_id: Mapped[str | None] = mapped_column(sa.String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """One retraining job: what it was asked, how far it got, what it produced."""

    __tablename__ = "training_runs"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in TRAINING_STATUSES)), name="status_known"
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="progress_fraction"),
        sa.Index(
            "uq_training_runs_one_running",
            "status",
            unique=True,
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(32))
    params: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(sa.String(16), default="running")
    progress: Mapped[float] = mapped_column(sa.Float, default=0.0)
    log: Mapped[str] = mapped_column(sa.Text, default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    model_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("model_versions.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any] | None]
    #: Where a person watches the run (the bot's status message: chat_id, message_id), so that
    #: whoever finds the run interrupted can say so there.
    progress_message: Mapped[dict[str, Any] | None]


class Replica(Base):
    """A bot process that serves (its heartbeat): which model version it answers with, when it was last
    seen. Replicas follow the active version; this says whether each one got there."""

    __tablename__ = "replicas"

    name: Mapped[str] = mapped_column(sa.String(REPLICA_NAME_MAX), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    model_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("model_versions.id", ondelete="SET NULL"))


class ProcessedUpdate(Base):
    """A Telegram update a replica took on: the primary key lets one replica claim it, so an update
    Telegram delivers twice (to a slow or dead replica, then to another) is handled once.
    ``finished_at`` is set when its handlers are done; rows older than a day are deleted."""

    __tablename__ = "processed_updates"

    update_id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    replica: Mapped[str] = mapped_column(sa.String(REPLICA_NAME_MAX))
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]


class Erasure(Base):
    """A user erased by /forget, and the update id of that /forget: kept as long as update claims
    (:class:`ProcessedUpdate`), so that a search of an update received before the erase but logged
    after it by another replica is refused rather than outliving "erased". It holds nothing of what
    was erased."""

    __tablename__ = "erasures"

    user_id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    update_id: Mapped[int] = mapped_column(sa.BigInteger)
    erased_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
