"""Embedding cache: backbone features keyed by (model fingerprint, image content sha256).

Re-importing a catalogue where three photos changed should embed three photos, and a
different model must never reuse another model's features. Each feature vector is one
``.npy`` file under ``<cache_dir>/<fingerprint>/<sha[:2]>/<sha>.npy``:

* no pickle anywhere (``np.load(allow_pickle=False)``);
* writes are atomic (:func:`ffengine.files.write_atomic`), so a crash or a concurrent
  build never leaves a half-written entry under the final name;
* an entry that is unreadable, of the wrong shape or dtype, or not finite is
  ignored (the caller recomputes and overwrites it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ffengine.files import write_atomic

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def content_hash(data: bytes) -> str:
    """The cache key of an image: sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def fingerprint_dir_name(fingerprint: str) -> str:
    """A folder name for ``fingerprint``: itself when filesystem-safe, else its sha256."""
    if _SAFE_NAME.match(fingerprint):
        return fingerprint
    return "fp-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:32]


class DiskWrites:
    """Attempts to write a cache: the first refusal (full disk, read-only folder) is logged, the rest
    are quiet; the caller goes on without caching either way."""

    def __init__(self, what: str, root: Path) -> None:
        self.what, self.root = what, root
        self._warned = False

    def attempt(self, write: Callable[[], object]) -> bool:
        """Run ``write``; ``False`` if the disk refused it (``OSError``)."""
        try:
            write()
        except OSError as exc:
            if not self._warned:
                log.warning("%s %s is not writable (%s); continuing without it", self.what, self.root, exc)
                self._warned = True
            return False
        return True


class EmbeddingCache:
    """Features of one model (``fingerprint``, ``dim`` floats each) stored on disk.

    Safe to share between threads and processes: every file is written once,
    atomically, and readers ignore anything malformed.
    """

    def __init__(self, root: str | os.PathLike[str], fingerprint: str, dim: int) -> None:
        if not fingerprint:
            raise ValueError("an embedding cache needs the model fingerprint")
        self.root = Path(root) / fingerprint_dir_name(fingerprint)
        self.fingerprint = fingerprint
        self.dim = dim
        self._writes = DiskWrites("embedding cache", self.root)

    def path(self, digest: str) -> Path:
        if not _SHA256.match(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        """The cached ``(dim,)`` float32 feature, or ``None`` when absent or unusable."""
        path = self.path(digest)
        try:
            value = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - any damage (bad header, short file, pickle) means "recompute"
            log.debug("ignoring unreadable cache entry %s (%s)", path, exc)
            return None
        if not isinstance(value, np.ndarray):  # an .npz archive: not ours
            value.close()
            return None
        if value.dtype != np.float32 or value.shape != (self.dim,) or not np.isfinite(value).all():
            log.debug("ignoring malformed cache entry %s", path)
            return None
        return value

    def put(self, digest: str, feature: np.ndarray) -> bool:
        """Store one feature atomically; returns ``False`` (and warns once) if the disk refuses."""
        feature = np.ascontiguousarray(feature, dtype=np.float32)
        if feature.shape != (self.dim,):
            raise ValueError(f"expected a ({self.dim},) feature, got {feature.shape}")
        path = self.path(digest)
        return self._writes.attempt(lambda: write_atomic(path, lambda fh: np.save(fh, feature, allow_pickle=False)))

    def __len__(self) -> int:
        """Number of stored entries (walks the folder; for tests and tools)."""
        if not self.root.is_dir():
            return 0
        return sum(1 for _ in self.root.glob("??/*.npy"))
