"""Download catalogue images over HTTP(S) politely and defensively.

A store's image CDN is someone else's server: it may be slow, flaky, rate-limited or
send an HTML error page with status 200. :class:`Fetcher` bounds concurrency, gives
every attempt a timeout, caps the body size while streaming (before it is all in
memory), and retries only what can succeed on a second try (timeouts, dropped
connections, 408/429/5xx) with exponential backoff and jitter, honouring a short
``Retry-After``. With an :class:`~ffengine.httpcache.HttpCache` it asks only for images
that changed since the last download. It returns the raw bytes; whether they are a usable
image is decided by :func:`ffengine.images.load_image`, the one place images are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ffengine.errors import FFError
from ffengine.httpcache import CachedBody, HttpCache, Validators
from ffengine.images import MAX_BYTES

log = logging.getLogger(__name__)

#: Statuses worth another try; everything else (404, 403, 410, ...) is final.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 64 * 1024


class FetchError(FFError):
    """An image could not be downloaded; ``reason`` is a short kind for reports and metrics.

    Kinds: ``http_<status>``, ``timeout``, ``connection``, ``too_large``, ``bad_url``,
    ``redirects``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Retryable(Exception):
    """One attempt failed in a way that may pass on a later attempt."""

    def __init__(self, error: FetchError, delay_hint: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay_hint = delay_hint


@dataclass(frozen=True)
class FetchSettings:
    """Limits for downloading catalogue images (defaults suit a public CDN)."""

    concurrency: int = 16
    #: Whole attempt (connect + headers + body), seconds.
    timeout_s: float = 20.0
    connect_timeout_s: float = 10.0
    max_bytes: int = MAX_BYTES
    #: Extra attempts after the first one.
    retries: int = 3
    #: Delay before the first retry; doubles each time, with +-50 % jitter.
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    user_agent: str = "FocusedFashion/0.1 (catalogue import)"

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.max_bytes < 1 or self.timeout_s <= 0:
            raise ValueError(f"invalid fetch settings: {self}")


class Fetcher:
    """``async with Fetcher(settings) as f: data = await f.get(url)``.

    At most ``settings.concurrency`` downloads run at once, however many callers wait.
    With a ``cache``, a stored copy is revalidated instead of downloaded again
    (see :mod:`ffengine.httpcache`). For reports: ``attempts`` counts HTTP attempts made,
    ``downloaded`` the bodies received, ``revalidated`` the stored bodies the server
    confirmed unchanged (``304 Not Modified``).
    """

    def __init__(self, settings: FetchSettings | None = None, cache: HttpCache | None = None) -> None:
        self.settings = settings or FetchSettings()
        self.cache = cache
        self.attempts = self.downloaded = self.revalidated = 0
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.settings.concurrency)

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.timeout_s, connect=s.connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=s.concurrency),
            headers={"User-Agent": s.user_agent, "Accept": "image/*,*/*;q=0.5"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, url: str) -> bytes:
        """The body of ``url``; raises :class:`FetchError` once retries are used up."""
        if self._session is None:
            raise RuntimeError("use 'async with Fetcher(...)' before calling get()")
        s = self.settings
        stored = await asyncio.to_thread(self.cache.get, url, s.max_bytes) if self.cache is not None else None
        for attempt in range(s.retries + 1):
            try:
                async with self._slots:
                    return await self._attempt(url, stored)
            except _Retryable as failure:
                if attempt == s.retries:
                    raise failure.error from None
                delay = min(s.max_backoff_s, s.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
                if failure.delay_hint is not None:
                    delay = max(delay, min(failure.delay_hint, s.max_backoff_s))
                log.debug("retrying %s in %.2fs after: %s", redact_url(url), delay, failure.error)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, url: str, stored: CachedBody | None) -> bytes:
        """One request: conditional when a copy is ``stored``, which a 304 answer returns."""
        assert self._session is not None
        s = self.settings
        self.attempts += 1
        try:
            async with self._session.get(url, headers=stored.validators.conditional_headers() if stored else None) as resp:
                if resp.status == 304 and stored is not None:
                    self.revalidated += 1
                    return stored.body
                if resp.status != 200:
                    error = FetchError(f"HTTP {resp.status} {resp.reason or ''}".strip(), f"http_{resp.status}")
                    if resp.status in RETRY_STATUSES:
                        raise _Retryable(error, _retry_after(resp.headers.get("Retry-After")))
                    raise error
                body = await self._read_body(resp)
                validators = Validators.from_headers(resp.headers)
        except (FetchError, _Retryable):
            raise
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError):
            raise FetchError("invalid or non-HTTP URL (or redirect)", "bad_url") from None
        except aiohttp.TooManyRedirects:
            raise FetchError("too many redirects", "redirects") from None
        except TimeoutError:
            raise _Retryable(FetchError(f"no complete answer within {s.timeout_s:g} s", "timeout")) from None
        except aiohttp.ClientError as exc:
            raise _Retryable(FetchError(f"connection failed ({type(exc).__name__}: {str(exc)[:120]})", "connection")) from None
        self.downloaded += 1
        if self.cache is not None:  # replaces the stored copy (or drops it: the new answer cannot be revalidated)
            await asyncio.to_thread(self.cache.store, url, body, validators)
        return body

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, refused as soon as it is known to exceed ``max_bytes``."""
        limit = self.settings.max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise _too_large(resp.content_length, limit)
        body = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK):
            body += chunk
            if len(body) > limit:
                raise _too_large(None, limit)
        return bytes(body)


def redact_url(url: str) -> str:
    """``url`` without credentials, query or fragment (signed CDN links carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    tail = "?..." if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + tail


def _too_large(size: int | None, limit: int) -> FetchError:
    got = f"{size / 1e6:.1f} MB" if size is not None else f"more than {limit / 1e6:.1f} MB"
    return FetchError(f"image too large ({got}; the limit is {limit / 1e6:.1f} MB)", "too_large")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a numeric ``Retry-After`` header (HTTP dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
