"""On-disk HTTP cache of remote catalogue images, revalidated on every use.

Rebuilding an index from a catalogue of web images should not download every image again.
:class:`HttpCache` keeps each downloaded body with the validators its server sent (``ETag``,
``Last-Modified``); :class:`ffengine.fetch.Fetcher` sends them back (``If-None-Match``,
``If-Modified-Since``) and reuses the stored bytes only when the server answers
``304 Not Modified``, so a changed image is always downloaded again. Nothing is served
without asking the server (no freshness lifetimes to get wrong).

One file per URL, ``<cache_dir>/http/<sha256(url)[:2]>/<sha256(url)>.body``: a magic line, a
JSON line (``key``, ``size``, ``sha256``, ``etag``, ``last_modified``), then the body; the URL
itself is not stored (signed CDN links carry tokens). Files are written atomically
(:func:`ffengine.cache.write_atomic`) and checked on every read — magic, key, size against
the fetch limit, sha256, header syntax — so a damaged or planted entry is ignored and the
image downloaded unconditionally. The bytes then go through the same checks as fresh ones
(the caller decodes them with :func:`ffengine.images.load_image`). Responses marked
``Cache-Control: no-store`` or carrying no validator are not stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ffengine.cache import DiskWrites, write_atomic

log = logging.getLogger(__name__)

#: The HTTP cache's folder inside the cache directory (beside the per-model embedding folders).
HTTP_CACHE_DIR = "http"
MAGIC = b"ffengine-http-cache 1\n"
#: Longest JSON line accepted; validators are bounded well below it.
HEADER_LIMIT = 8192
#: A header value we will send back: visible ASCII and spaces, no CR/LF, bounded.
_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,1023}")


def _valid(value: object) -> str | None:
    return value if isinstance(value, str) and _HEADER_VALUE.fullmatch(value) else None


@dataclass(frozen=True)
class Validators:
    """What identifies a version of a resource: its ``ETag`` and/or ``Last-Modified``."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Validators | None:
        """The response's validators, or ``None`` when it must not (``no-store``) or cannot be revalidated."""
        if "no-store" in headers.get("Cache-Control", "").lower():
            return None
        found = cls(_valid(headers.get("ETag")), _valid(headers.get("Last-Modified")))
        return found if found.etag or found.last_modified else None

    def conditional_headers(self) -> dict[str, str]:
        """Request headers asking for the body only if it changed."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class CachedBody:
    """A stored body and the validators to revalidate it with."""

    body: bytes
    validators: Validators


class HttpCache:
    """Downloaded bodies by URL under ``root``; safe to share between threads and processes.

    Blocking file I/O: call from a worker thread (``asyncio.to_thread``) on an event loop.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._writes = DiskWrites("HTTP cache", self.root)

    @classmethod
    def beside(cls, cache_dir: str | os.PathLike[str]) -> HttpCache:
        """The HTTP cache that lives in the embedding cache's directory."""
        return cls(Path(cache_dir) / HTTP_CACHE_DIR)

    def path(self, url: str) -> Path:
        key = _key(url)
        return self.root / key[:2] / f"{key}.body"

    def get(self, url: str, max_bytes: int) -> CachedBody | None:
        """The stored body of ``url`` if present, intact and at most ``max_bytes``, else ``None``."""
        path = self.path(url)
        try:
            with path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size > len(MAGIC) + HEADER_LIMIT + max_bytes:
                    log.debug("ignoring oversized HTTP cache entry %s", path)
                    return None
                raw = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("ignoring unreadable HTTP cache entry %s (%s)", path, exc)
            return None
        entry = _parse(raw, _key(url), max_bytes)
        if entry is None:
            log.debug("ignoring damaged HTTP cache entry %s", path)
        return entry

    def store(self, url: str, body: bytes, validators: Validators | None) -> bool:
        """Remember ``body`` as the current version of ``url``, or forget ``url`` when ``validators``
        is ``None``; returns ``False`` (and warns once) if the disk refuses."""
        path = self.path(url)
        if validators is None:
            return self._writes.attempt(lambda: path.unlink(missing_ok=True))
        return self._writes.attempt(lambda: write_atomic(path, lambda fh: fh.write(_serialise(_key(url), body, validators))))


def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _serialise(key: str, body: bytes, validators: Validators) -> bytes:
    meta = {
        "key": key,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "etag": validators.etag,
        "last_modified": validators.last_modified,
    }
    return MAGIC + json.dumps(meta).encode() + b"\n" + body


def _parse(raw: bytes, key: str, max_bytes: int) -> CachedBody | None:
    """The entry in ``raw`` if every check passes, else ``None``."""
    if not raw.startswith(MAGIC):
        return None
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + HEADER_LIMIT)
    if end < 0:
        return None
    try:
        meta = json.loads(raw[len(MAGIC) : end])
    except ValueError:
        return None
    body = raw[end + 1 :]
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("size") != len(body) or len(body) > max_bytes:
        return None
    if meta.get("sha256") != hashlib.sha256(body).hexdigest():
        return None
    validators = Validators(_valid(meta.get("etag")), _valid(meta.get("last_modified")))
    if (validators.etag, validators.last_modified) != (meta.get("etag"), meta.get("last_modified")) or validators == Validators():
        return None
    return CachedBody(body, validators)
