"""Storage: the log the bot writes and the retraining reads (SQLAlchemy 2 async + Alembic).

``Database.open(url)`` (URL from ``ffengine.config.database_url()``) migrates and returns
the one object callers use; see docs/ARCHITECTURE.md for the contract.
"""

from ffengine.db.coordination import ACTIVE_VERSION_CHANNEL
from ffengine.db.database import UNVERSIONED, Database
from ffengine.db.errors import (
    FeedbackRefused,
    NotFound,
    StorageError,
    StorageUnavailable,
    Erased,
    Superseded,
    TrainingBusy,
)
from ffengine.db.migrate import upgrade_to_head
from ffengine.db.models import EMBEDDING_DIM
from ffengine.db.records import (
    FeedbackItem,
    FeedbackSearch,
    LikeRate,
    ModelVersion,
    Origin,
    PressedItem,
    PressedRecommendation,
    RatingResult,
    ReplicaRecord,
    SearchRecord,
    Stats,
    StoredItem,
    TrainingRun,
    UpdateClaim,
    UpsertResult,
    UserSummary,
)

__all__ = [
    "ACTIVE_VERSION_CHANNEL",
    "EMBEDDING_DIM",
    "UNVERSIONED",
    "Database",
    "FeedbackItem",
    "FeedbackRefused",
    "FeedbackSearch",
    "LikeRate",
    "ModelVersion",
    "NotFound",
    "Origin",
    "PressedItem",
    "PressedRecommendation",
    "RatingResult",
    "ReplicaRecord",
    "SearchRecord",
    "Stats",
    "StorageError",
    "StorageUnavailable",
    "Erased",
    "Superseded",
    "StoredItem",
    "TrainingBusy",
    "TrainingRun",
    "UpdateClaim",
    "UpsertResult",
    "UserSummary",
    "upgrade_to_head",
]
