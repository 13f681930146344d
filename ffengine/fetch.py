"""Download catalogue images over HTTP(S) politely and defensively.

A store's image CDN is someone else's server: it may be slow, flaky, rate-limited or
send an HTML error page with status 200. :class:`Fetcher` bounds concurrency, gives
every attempt a timeout, caps the body size while streaming (before it is all in
memory), and retries only what can succeed on a second try (timeouts, dropped
connections, 408/429/5xx) with exponential backoff and jitter, honouring a short
``Retry-After``. It returns the raw bytes; whether they are a usable image is decided
by :func:`ffengine.images.load_image`, the one place images are decoded.
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
    ``attempts`` counts HTTP attempts made (for reports).
    """

    def __init__(self, settings: FetchSettings | None = None) -> None:
        self.settings = settings or FetchSettings()
        self.attempts = 0
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
        for attempt in range(s.retries + 1):
            try:
                async with self._slots:
                    return await self._attempt(url)
            except _Retryable as failure:
                if attempt == s.retries:
                    raise failure.error from None
                delay = min(s.max_backoff_s, s.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
                if failure.delay_hint is not None:
                    delay = max(delay, min(failure.delay_hint, s.max_backoff_s))
                log.debug("retrying %s in %.2fs after: %s", redact_url(url), delay, failure.error)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, url: str) -> bytes:
        assert self._session is not None
        s = self.settings
        self.attempts += 1
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    error = FetchError(f"HTTP {resp.status} {resp.reason or ''}".strip(), f"http_{resp.status}")
                    if resp.status in RETRY_STATUSES:
                        raise _Retryable(error, _retry_after(resp.headers.get("Retry-After")))
                    raise error
                if resp.content_length is not None and resp.content_length > s.max_bytes:
                    raise _too_large(resp.content_length, s.max_bytes)
                body = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    body += chunk
                    if len(body) > s.max_bytes:
                        raise _too_large(None, s.max_bytes)
                return bytes(body)
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
