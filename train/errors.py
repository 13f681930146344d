"""Training errors: each is an :class:`~ffengine.errors.FFError`, so ``str()`` is a message for a person."""

from __future__ import annotations

from ffengine.errors import FFError


class TrainingError(FFError):
    """A training run could not be done (bad input, nothing to learn from, a broken model version)."""


class TrainingLocked(TrainingError):
    """Another training run holds the lock; try again when it has finished."""
