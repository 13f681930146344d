"""Typed errors that carry a message a person can act on.

Every error the engine raises on bad input or bad configuration derives from
:class:`FFError`; ``str(err)`` is the user-readable message (no traceback needed).
"""

from __future__ import annotations


class FFError(Exception):
    """Base of all FocusedFashion errors; ``str()`` is safe to show to a person."""


class ConfigError(FFError):
    """A setting is missing or malformed; the message names the setting."""


class ImageRejected(FFError):
    """An input is not a usable image (not an image, truncated, too big, a bomb).

    ``reason`` is a short machine-readable kind for logs and metrics: ``not_image``,
    ``truncated``, ``corrupt``, ``empty``, ``too_large`` (bytes), ``too_many_pixels`` (area),
    ``bad_shape`` (a side too long, or too thin), ``not_found``, ``not_a_file`` (a folder,
    device, pipe or socket), ``unreadable``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class WeightsError(FFError):
    """Model weights are missing, unreadable or do not fit the architecture."""


class CatalogError(FFError):
    """A catalogue cannot be imported at all (no file, no usable product)."""


class IndexLoadError(FFError):
    """An index directory is missing, corrupt, or was built by another model."""
