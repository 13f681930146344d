"""Download catalogue images over HTTP(S) politely and defensively.

A store's image CDN is someone else's server: it may be slow, flaky, rate-limited or
send an HTML error page with status 200. :class:`Fetcher` bounds concurrency, gives
every attempt a timeout, caps the body size while streaming (before it is all in
memory), and retries only what can succeed on a second try (timeouts, dropped
connections, 408/429/5xx) with exponential backoff and jitter, honouring a short
``Retry-After``. A deadline for all downloads together (:data:`~ffengine.config.FETCH_DEADLINE`)
bounds what a slow server can cost an import: past it, every image not yet downloaded fails at once.
With an :class:`~ffengine.httpcache.HttpCache` it asks only for images
that changed since the last download. It returns the raw bytes; whether they are a usable
image is decided by :func:`ffengine.images.load_image`, the one place images are decoded.

A catalogue comes from outside, so its URLs must not make the importer reach the machine it
runs on or its network (SSRF): only http(s) is fetched, and only from public addresses unless
:data:`~ffengine.config.FETCH_ALLOW` opens a host or network. Names are checked in the
connector's resolver (:class:`_GuardedResolver`), so the address checked is the address
connected to, whatever a name resolves to next time (DNS rebinding); redirects are followed
here, one hop at a time, so that every hop is checked like the first URL.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ffengine.catalog import is_public_address
from ffengine.config import FETCH_ALLOW, FETCH_DEADLINE, FetchAllow, env_fetch_allow, env_fetch_deadline, normalise_host
from ffengine.errors import FFError
from ffengine.httpcache import CachedBody, HttpCache, Validators
from ffengine.images import MAX_BYTES, format_mib

log = logging.getLogger(__name__)

#: Statuses worth another try; everything else (404, 403, 410, ...) is final.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Redirects followed per download (aiohttp's own default).
MAX_REDIRECTS = 10
CHUNK = 64 * 1024
_BAD_URL = "invalid or non-HTTP URL (or redirect)"


class FetchError(FFError):
    """An image could not be downloaded; ``reason`` is a short kind for reports and metrics.

    Kinds: ``http_<status>``, ``timeout``, ``connection``, ``too_large``, ``bad_url``,
    ``redirects``, ``blocked_address``, ``deadline``.
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


class BlockedAddress(OSError):
    """Raised inside aiohttp's connector when a name resolves only to refused addresses."""


def address_allowed(address: str, allow: FetchAllow) -> bool:
    """Whether the importer may connect to ``address``: a public one, or one in a network ``allow`` opens."""
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    candidates = [ip, ip.ipv4_mapped] if isinstance(ip, IPv6Address) and ip.ipv4_mapped else [ip]
    return is_public_address(ip) or any(a in net for a in candidates for net in allow.networks)


def blocked_message(host: str, addresses: list[str]) -> str:
    """What an admin reads for a refused host, naming the setting that opens it."""
    shown = ", ".join(dict.fromkeys(addresses))
    where = host if shown == host else f"{host} ({shown})"
    return f"refused to download from {where}: not a public address; list the host or its network in {FETCH_ALLOW} to allow it"


def check_url(url: URL, allow: FetchAllow) -> None:
    """Refuse (:class:`FetchError`) a URL that is not http(s) or names a refused address literally.

    Host names pass here: :class:`_GuardedResolver` checks the addresses they resolve to. What
    counts as a literal address is aiohttp's own test, since those hosts never reach the resolver.
    """
    if url.scheme not in ("http", "https"):
        raise FetchError(f"only http(s) URLs are downloaded, not {url.scheme + ':' if url.scheme else 'a relative link'}", "bad_url")
    host = url.raw_host
    if not host:
        raise FetchError("URL without a host", "bad_url")
    if normalise_host(host) in allow.hosts or not is_ip_address(host):
        return
    if not address_allowed(host, allow):
        raise FetchError(blocked_message(host, [host]), "blocked_address")


class _GuardedResolver(AbstractResolver):
    """aiohttp's resolver without the addresses the importer must not connect to.

    The connector connects only to what this returns, so a name cannot be checked against
    one address and then connect to another.
    """

    def __init__(self, allow: FetchAllow) -> None:
        self._inner = DefaultResolver()
        self._allow = allow

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if normalise_host(host) in self._allow.hosts:
            return found
        usable = [r for r in found if address_allowed(r["host"], self._allow)]
        if not usable:
            raise BlockedAddress(blocked_message(host, [r["host"] for r in found]))
        return usable

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True)
class FetchSettings:
    """Limits for downloading catalogue images (defaults suit a public CDN; private addresses are refused)."""

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
    #: Hosts and networks that may be fetched from although they are not public (a store's LAN image server).
    allow: FetchAllow = FetchAllow()
    #: Seconds for all downloads of one :class:`Fetcher` together, retries and waits included; ``None``: no deadline.
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        bad_deadline = self.deadline_s is not None and self.deadline_s <= 0
        if self.concurrency < 1 or self.retries < 0 or self.max_bytes < 1 or self.timeout_s <= 0 or bad_deadline:
            raise ValueError(f"invalid fetch settings: {self}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **limits: Any) -> FetchSettings:
        """``limits`` (or the defaults) with ``allow`` read from :data:`~ffengine.config.FETCH_ALLOW` and, unless
        ``limits`` sets it, ``deadline_s`` from :data:`~ffengine.config.FETCH_DEADLINE`."""
        return cls(allow=env_fetch_allow(env), **{"deadline_s": env_fetch_deadline(env), **limits})


class Fetcher:
    """``async with Fetcher(settings) as f: data = await f.get(url)``.

    At most ``settings.concurrency`` downloads run at once, however many callers wait; the
    ``settings.deadline_s`` clock starts when the fetcher is entered.
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
        self._resolver: _GuardedResolver | None = None
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._deadline: float | None = None

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        if s.deadline_s is not None:
            self._deadline = asyncio.get_running_loop().time() + s.deadline_s
        self._resolver = _GuardedResolver(s.allow)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.timeout_s, connect=s.connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=s.concurrency, resolver=self._resolver),
            headers={"User-Agent": s.user_agent, "Accept": "image/*,*/*;q=0.5"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # ours, so the connector leaves it open
            await self._resolver.close()
            self._resolver = None

    async def get(self, url: str) -> bytes:
        """The body of ``url``; raises :class:`FetchError` once retries are used up or the deadline has passed."""
        if self._session is None:
            raise RuntimeError("use 'async with Fetcher(...)' before calling get()")
        deadline = asyncio.timeout_at(self._deadline)
        try:
            async with deadline:
                return await self._get(url)
        except TimeoutError:
            if not deadline.expired():
                raise
            late = f"not downloaded within the import's deadline ({FETCH_DEADLINE}={self.settings.deadline_s:g} s)"
            raise FetchError(late, "deadline") from None

    async def _get(self, url: str) -> bytes:
        """:meth:`get` without the deadline: attempts with backoff until one succeeds or none is left."""
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
            async with await self._follow(url, stored.validators.conditional_headers() if stored else None) as resp:
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
            raise FetchError(_BAD_URL, "bad_url") from None
        except UnicodeError:  # the resolver's IDNA encoding refuses the host name (an empty label: "a..com")
            raise FetchError("the host name is not a valid domain name", "bad_url") from None
        except TimeoutError:
            raise _Retryable(FetchError(f"no complete answer within {s.timeout_s:g} s", "timeout")) from None
        except aiohttp.ClientError as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, BlockedAddress):
                raise FetchError(str(exc.os_error), "blocked_address") from None
            raise _Retryable(FetchError(f"connection failed ({type(exc).__name__}: {str(exc)[:120]})", "connection")) from None
        self.downloaded += 1
        if self.cache is not None:  # replaces the stored copy (or drops it: the new answer cannot be revalidated)
            await asyncio.to_thread(self.cache.store, url, body, validators)
        return body

    async def _follow(self, url: str, headers: dict[str, str] | None) -> aiohttp.ClientResponse:
        """The response to GET ``url`` after redirects, followed here so that :func:`check_url` sees every hop."""
        assert self._session is not None
        target = _parse_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            check_url(target, self.settings.allow)
            resp = await self._session.get(target, headers=headers, allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or location is None:
                return resp
            resp.release()
            target = resp.url.join(_parse_url(location))
        raise FetchError("too many redirects", "redirects")

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


def _parse_url(text: str) -> URL:
    try:
        return URL(text)
    except ValueError:
        raise FetchError(_BAD_URL, "bad_url") from None


def redact_url(url: str) -> str:
    """``url`` without credentials, query or fragment (signed CDN links carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    tail = "?..." if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + tail


def _too_large(size: int | None, limit: int) -> FetchError:
    got = format_mib(size) if size is not None else f"more than {format_mib(limit)}"
    return FetchError(f"image too large ({got}; the limit is {format_mib(limit)})", "too_large")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a numeric ``Retry-After`` header (HTTP dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
