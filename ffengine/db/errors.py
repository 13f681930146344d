"""Storage errors whose ``str()`` a person can act on (shown by the bot or the CLI)."""

from __future__ import annotations

from ffengine.errors import FFError


class StorageError(FFError):
    """The database refused a request (unknown row, duplicate name, finished run)."""


class NotFound(StorageError):
    """A model version, training run or other named row does not exist."""


class FeedbackRefused(StorageError):
    """A button press (a rating, an item, "more like this") cannot be followed; nothing was written.

    ``reason`` is a short machine-readable kind for logs and metrics:
    ``bad_value`` (not +1/-1), ``not_found`` (no such recommendation, search or item),
    ``not_yours`` (it belongs to someone else's search).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Erased(StorageError):
    """A search was not logged: its user was erased (/forget) after the search's update arrived."""


class Superseded(StorageError):
    """A version was not activated: the one it was to replace is no longer the active one (a rollback
    or another replica's switch came first, and stands)."""


class StorageUnavailable(StorageError):
    """The database cannot take the request now (server down, connection lost, file deleted
    or replaced); nothing was written. Callers tell the person it was not saved."""


class TrainingBusy(StorageError):
    """A training run is already marked running; ``run_id`` names it."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"training run {run_id} is still running; wait for it to finish")
        self.run_id = run_id
