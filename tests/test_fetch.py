"""Downloading catalogue images from a real aiohttp server on 127.0.0.1.

The server (:class:`ImageServer`, also used by ``test_build.py``) runs in its own thread
and event loop, so both async tests and blocking ``build_index`` calls can use it. Loopback
is refused by default (SSRF), so the tests open it through the setting, as an admin would.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from ffengine.config import FetchAllow
from ffengine.errors import ConfigError
from ffengine.fetch import Fetcher, FetchError, FetchSettings
from ffengine.httpcache import HttpCache, Validators
from tests.conftest import make_image

GOOD = make_image(seed=11)
BIG = b"\xff\xd8" + b"x" * 300_000  # bigger than the 200 kB cap used below
#: The test server's address, which the importer refuses unless the setting opens it.
LOOPBACK = FetchAllow.parse("127.0.0.1/32")
#: Tight limits so failing cases finish in well under a second.
FAST = FetchSettings(concurrency=4, timeout_s=0.5, connect_timeout_s=0.5, max_bytes=200_000, retries=2, backoff_s=0.01, allow=LOOPBACK)
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


class ImageServer:
    """An HTTP server with one route per way a CDN can behave; counts hits per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        #: ``/versioned/<name>`` serves ``versions[name]`` with an ETag (its sha256) and a Last-Modified date.
        self.versions: dict[str, bytes] = {}
        self.bodies_sent: Counter[str] = Counter()  # 200 answers with the body, per path
        self.not_modified: Counter[str] = Counter()  # 304 answers, per path
        self.conditional: dict[str, dict[str, str]] = {}  # the validators of each path's last request
        self.active = 0
        self.max_active = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="image-server", daemon=True)
        self.runner: web.AppRunner | None = None
        self.base = ""

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/good/{name}", self.good)
        app.router.add_get("/missing/{name}", self.missing)
        app.router.add_get("/slow/{name}", self.slow)
        app.router.add_get("/text/{name}", self.text)
        app.router.add_get("/big/{name}", self.big)
        app.router.add_get("/big-stream/{name}", self.big_stream)
        app.router.add_get("/flaky/{name}", self.flaky)
        app.router.add_get("/busy/{name}", self.busy)
        app.router.add_get("/redirect/{name}", self.redirect)
        app.router.add_get("/to", self.redirect_to)
        app.router.add_get("/held/{name}", self.held)
        app.router.add_get("/versioned/{name}", self.versioned)
        app.router.add_get("/dated/{name}", self.dated)
        app.router.add_get("/no-store/{name}", self.no_store)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"

    def _hit(self, request: web.Request) -> int:
        self.hits[request.path] += 1
        return self.hits[request.path]

    async def good(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def missing(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(status=404, text="not here")

    async def slow(self, request: web.Request) -> web.Response:
        self._hit(request)
        await asyncio.sleep(30)  # cancelled when the client gives up
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def text(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(text="<html>Sorry, this product is gone</html>", content_type="text/html")

    async def big(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(body=BIG, content_type="image/jpeg")

    async def big_stream(self, request: web.Request) -> web.StreamResponse:
        """Chunked, no Content-Length: the cap must hold while streaming."""
        self._hit(request)
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(100):
                await resp.write(b"y" * 65536)
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client hung up, as it should
        return resp

    async def flaky(self, request: web.Request) -> web.Response:
        """503 on the first request, the image afterwards."""
        if self._hit(request) == 1:
            return web.Response(status=503, text="try again")
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def busy(self, request: web.Request) -> web.Response:
        """429 with Retry-After: 0 on the first request, the image afterwards."""
        if self._hit(request) == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        return web.Response(body=GOOD, content_type="image/jpeg")

    async def redirect(self, request: web.Request) -> web.Response:
        self._hit(request)
        raise web.HTTPFound(f"/good/{request.match_info['name']}")

    async def redirect_to(self, request: web.Request) -> web.Response:
        """A redirect to wherever ``?url=`` says (an open redirect, as CDNs and shops have)."""
        self._hit(request)
        raise web.HTTPFound(request.query["url"])

    async def versioned(self, request: web.Request) -> web.Response:
        """Like a CDN: ETag + Last-Modified, and 304 when the client's ETag is the current one."""
        body = self.versions[request.match_info["name"]]
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        return self._conditional(request, body, {"ETag": etag, "Last-Modified": LAST_MODIFIED}, request.headers.get("If-None-Match") == etag)

    async def dated(self, request: web.Request) -> web.Response:
        """Only Last-Modified: 304 when If-Modified-Since is that date."""
        headers = {"Last-Modified": LAST_MODIFIED}
        return self._conditional(request, GOOD, headers, request.headers.get("If-Modified-Since") == LAST_MODIFIED)

    async def no_store(self, request: web.Request) -> web.Response:
        """Validators, but ``Cache-Control: no-store``: must never be stored (always 200)."""
        return self._conditional(request, GOOD, {"ETag": '"x"', "Cache-Control": "private, no-store"}, False)

    def _conditional(self, request: web.Request, body: bytes, headers: dict[str, str], unchanged: bool) -> web.Response:
        self._hit(request)
        self.conditional[request.path] = {k: v for k, v in request.headers.items() if k.lower().startswith("if-")}
        if unchanged:
            self.not_modified[request.path] += 1
            return web.Response(status=304, headers=headers)
        self.bodies_sent[request.path] += 1
        return web.Response(body=body, content_type="image/jpeg", headers=headers)

    async def held(self, request: web.Request) -> web.Response:
        """Holds each request a moment and records how many overlap."""
        self._hit(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.active -= 1
        return web.Response(body=GOOD, content_type="image/jpeg")


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.start()
    yield server
    server.stop()


async def fetch(url: str, settings: FetchSettings = FAST) -> bytes:
    async with Fetcher(settings) as fetcher:
        return await fetcher.get(url)


async def test_good_image_is_returned_byte_for_byte(image_server: ImageServer) -> None:
    assert await fetch(image_server.url("/good/a.jpg")) == GOOD
    assert await fetch(image_server.url("/redirect/b.jpg")) == GOOD


async def test_404_fails_at_once_without_retry(image_server: ImageServer) -> None:
    with pytest.raises(FetchError, match="HTTP 404") as err:
        await fetch(image_server.url("/missing/a.jpg"))
    assert err.value.reason == "http_404"
    assert image_server.hits["/missing/a.jpg"] == 1


async def test_slow_server_times_out_after_every_retry(image_server: ImageServer) -> None:
    with pytest.raises(FetchError, match="no complete answer within 0.5 s") as err:
        await fetch(image_server.url("/slow/a.jpg"))
    assert err.value.reason == "timeout"
    assert image_server.hits["/slow/a.jpg"] == FAST.retries + 1


async def test_failing_once_then_succeeding_is_retried(image_server: ImageServer) -> None:
    async with Fetcher(FAST) as fetcher:
        assert await fetcher.get(image_server.url("/flaky/a.jpg")) == GOOD
        assert await fetcher.get(image_server.url("/busy/a.jpg")) == GOOD
        assert fetcher.attempts == 4
    assert image_server.hits["/flaky/a.jpg"] == 2
    assert image_server.hits["/busy/a.jpg"] == 2


async def test_no_retries_means_one_attempt(image_server: ImageServer) -> None:
    with pytest.raises(FetchError, match="HTTP 503") as err:
        await fetch(image_server.url("/flaky/once.jpg"), FetchSettings(retries=0, allow=LOOPBACK))
    assert err.value.reason == "http_503"
    assert image_server.hits["/flaky/once.jpg"] == 1


@pytest.mark.parametrize("route", ["/big/a.jpg", "/big-stream/a.jpg"])
async def test_body_over_the_cap_is_refused(image_server: ImageServer, route: str) -> None:
    with pytest.raises(FetchError, match="too large") as err:
        await fetch(image_server.url(route))
    assert err.value.reason == "too_large"
    assert image_server.hits[route] == 1  # size is final: no retry


async def test_not_an_image_is_returned_for_the_decoder_to_refuse(image_server: ImageServer) -> None:
    from ffengine.errors import ImageRejected
    from ffengine.images import load_image

    body = await fetch(image_server.url("/text/a.jpg"))
    with pytest.raises(ImageRejected) as err:
        load_image(body)
    assert err.value.reason == "not_image"


async def test_concurrency_is_bounded(image_server: ImageServer) -> None:
    image_server.max_active = 0
    settings = FetchSettings(concurrency=3, timeout_s=5, allow=LOOPBACK)
    async with Fetcher(settings) as fetcher:
        bodies = await asyncio.gather(*(fetcher.get(image_server.url(f"/held/{i}.jpg")) for i in range(12)))
    assert bodies == [GOOD] * 12
    assert 2 <= image_server.max_active <= 3


async def test_refused_connection_is_retried_then_reported() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Fetcher(FAST) as fetcher:
        with pytest.raises(FetchError, match="connection failed") as err:
            await fetcher.get(f"http://127.0.0.1:{port}/a.jpg")
        assert fetcher.attempts == FAST.retries + 1
    assert err.value.reason == "connection"


async def test_get_outside_context_is_a_usage_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await Fetcher().get("http://127.0.0.1:9/a.jpg")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        FetchSettings(concurrency=0)
    with pytest.raises(ValueError):
        FetchSettings(retries=-1)


def test_redact_url_drops_credentials_query_and_fragment() -> None:
    from ffengine.fetch import redact_url

    assert redact_url("https://user:pw@cdn.example:8443/a/b.jpg?X-Amz-Signature=abc#f") == "https://cdn.example:8443/a/b.jpg?..."
    assert redact_url("http://cdn.example/a.jpg") == "http://cdn.example/a.jpg"


async def fetch_cached(url: str, cache: HttpCache, settings: FetchSettings = FAST) -> tuple[bytes, Fetcher]:
    async with Fetcher(settings, cache) as fetcher:
        return await fetcher.get(url), fetcher


async def test_http_cache_revalidates_and_reuses_the_stored_body_only_when_unchanged(image_server: ImageServer, tmp_path: Path) -> None:
    cache, path, url = HttpCache(tmp_path), "/versioned/a.jpg", image_server.url("/versioned/a.jpg")
    image_server.versions["a.jpg"] = GOOD
    body, first = await fetch_cached(url, cache)
    assert body == GOOD and (first.downloaded, first.revalidated) == (1, 0)
    assert image_server.conditional[path] == {}  # nothing stored yet: a plain GET

    body, again = await fetch_cached(url, cache)
    assert body == GOOD and (again.downloaded, again.revalidated) == (0, 1)
    sent = image_server.conditional[path]
    assert sent["If-None-Match"].startswith('"') and sent["If-Modified-Since"] == LAST_MODIFIED
    assert (image_server.bodies_sent[path], image_server.not_modified[path]) == (1, 1)

    changed = make_image(seed=12)
    image_server.versions["a.jpg"] = changed  # a new ETag: downloaded again, and that copy is kept
    body, after = await fetch_cached(url, cache)
    assert body == changed and (after.downloaded, after.revalidated) == (1, 0)
    assert (await fetch_cached(url, cache))[0] == changed
    assert (image_server.bodies_sent[path], image_server.not_modified[path]) == (2, 2)
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically: no leftovers


async def test_http_cache_with_last_modified_only_and_no_store(image_server: ImageServer, tmp_path: Path) -> None:
    cache = HttpCache(tmp_path)
    for _ in range(2):
        assert (await fetch_cached(image_server.url("/dated/a.jpg"), cache))[0] == GOOD
        assert (await fetch_cached(image_server.url("/no-store/a.jpg"), cache))[0] == GOOD
    assert image_server.conditional["/dated/a.jpg"] == {"If-Modified-Since": LAST_MODIFIED}
    assert (image_server.bodies_sent["/dated/a.jpg"], image_server.not_modified["/dated/a.jpg"]) == (1, 1)
    assert image_server.bodies_sent["/no-store/a.jpg"] == 2 and image_server.conditional["/no-store/a.jpg"] == {}
    assert not cache.path(image_server.url("/no-store/a.jpg")).exists()


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    key = path.stem.encode()
    damaged = {
        "body": raw[:-1] + bytes([raw[-1] ^ 1]),  # one byte of the image changed: the sha256 no longer matches
        "truncated": raw[:-10],
        "header": raw.replace(b'"etag": "\\"', b'"etag": "\\r\\nX-Evil: 1\\"', 1),  # a validator with a line break
        "moved": raw.replace(key, b"0" * len(key), 1),  # another URL's entry under this URL's name
        "garbage": b"garbage",
    }[how]
    assert damaged != raw
    path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["body", "truncated", "header", "moved", "garbage"])
async def test_a_damaged_cache_entry_is_not_trusted(image_server: ImageServer, tmp_path: Path, how: str) -> None:
    cache, name = HttpCache(tmp_path), f"damaged-{how}.jpg"
    image_server.versions[name] = GOOD
    url, path = image_server.url(f"/versioned/{name}"), f"/versioned/{name}"
    await fetch_cached(url, cache)
    damage(cache.path(url), how)
    assert cache.get(url, FAST.max_bytes) is None
    body, fetcher = await fetch_cached(url, cache)  # an unconditional GET, and the entry repaired
    assert body == GOOD and fetcher.downloaded == 1 and image_server.bodies_sent[path] == 2
    assert image_server.conditional[path] == {}
    assert cache.get(url, FAST.max_bytes) is not None


async def test_the_size_cap_applies_to_stored_bodies(image_server: ImageServer, tmp_path: Path) -> None:
    cache, url = HttpCache(tmp_path), image_server.url("/versioned/capped.jpg")
    image_server.versions["capped.jpg"] = GOOD
    await fetch_cached(url, cache)
    small = FetchSettings(max_bytes=len(GOOD) - 1, retries=0, allow=LOOPBACK)
    assert cache.get(url, small.max_bytes) is None  # bigger than this fetcher accepts: not even read back
    with pytest.raises(FetchError, match="too large"):  # and not slipped in through a 304
        await fetch_cached(url, cache, small)
    assert image_server.conditional["/versioned/capped.jpg"] == {}


def test_validators_come_only_from_clean_headers() -> None:
    assert Validators.from_headers({"ETag": '"a"', "Last-Modified": LAST_MODIFIED}) == Validators('"a"', LAST_MODIFIED)
    assert Validators.from_headers({"ETag": '"a"', "Cache-Control": "No-Store"}) is None
    assert Validators.from_headers({"Content-Type": "image/jpeg"}) is None
    assert Validators.from_headers({"ETag": "bad\r\nvalue"}) is None
    assert Validators('W/"a"', None).conditional_headers() == {"If-None-Match": 'W/"a"'}


async def test_an_unwritable_http_cache_only_costs_the_caching(image_server: ImageServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    cache, url = HttpCache(blocker), image_server.url("/versioned/unwritable.jpg")
    image_server.versions["unwritable.jpg"] = GOOD
    for _ in range(2):
        body, fetcher = await fetch_cached(url, cache)
        assert body == GOOD and fetcher.downloaded == 1
    assert sum("not writable" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------- SSRF: what a catalogue must not reach


async def blocked(url: str, settings: FetchSettings = FetchSettings(retries=0)) -> FetchError:
    with pytest.raises(FetchError) as err:
        await fetch(url, settings)
    return err.value


async def test_loopback_and_private_addresses_are_refused_by_default(image_server: ImageServer) -> None:
    port = image_server.base.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "10.0.0.1", "169.254.169.254", "224.0.0.1"):
        error = await blocked(f"http://{host}:{port}/good/refused.jpg")
        assert error.reason == "blocked_address", (host, error)
        assert "not a public address" in str(error) and "FFENGINE_FETCH_ALLOW" in str(error)
    assert image_server.hits["/good/refused.jpg"] == 0  # refused before connecting


async def test_a_name_that_resolves_to_loopback_is_refused(image_server: ImageServer) -> None:
    port = image_server.base.rsplit(":", 1)[1]
    error = await blocked(f"http://localhost:{port}/good/name.jpg")
    assert error.reason == "blocked_address" and "localhost (" in str(error)
    assert image_server.hits["/good/name.jpg"] == 0


async def test_a_redirect_to_a_refused_address_is_refused(image_server: ImageServer) -> None:
    port = image_server.base.rsplit(":", 1)[1]
    trusted = FetchSettings(retries=0, allow=FetchAllow.parse("localhost"))  # the shop's own host, by name
    hop = f"http://127.0.0.1:{port}/good/hop.jpg"
    assert await fetch(f"http://localhost:{port}/good/direct.jpg", trusted) == GOOD
    error = await blocked(f"http://localhost:{port}/to?url={hop}", trusted)
    assert error.reason == "blocked_address" and image_server.hits["/good/hop.jpg"] == 0
    assert (await blocked(image_server.url("/to?url=file:///etc/passwd"), FAST)).reason == "bad_url"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://ftp.example/a.jpg", "gopher://127.0.0.1:70/x", "//cdn.example/a.jpg"])
async def test_only_http_and_https_are_fetched(url: str) -> None:
    assert (await blocked(url)).reason == "bad_url"


async def test_the_setting_opens_named_hosts_and_networks(image_server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    port = image_server.base.rsplit(":", 1)[1]
    assert await fetch(image_server.url("/redirect/allowed.jpg"), FetchSettings(allow=FetchAllow.parse("10.0.0.0/8, 127.0.0.0/8"))) == GOOD
    assert await fetch(f"http://localhost:{port}/good/a.jpg", FetchSettings(allow=FetchAllow.parse("LocalHost."))) == GOOD
    monkeypatch.setenv("FFENGINE_FETCH_ALLOW", "images.lan,127.0.0.1")
    assert FetchSettings.from_env(retries=0).allow == FetchAllow(frozenset({"images.lan"}), (ipaddress.ip_network("127.0.0.1/32"),))
    assert await fetch(image_server.url("/good/env.jpg"), FetchSettings.from_env()) == GOOD


@pytest.mark.parametrize("value", ["10.0.0.0/33", "10.0.0.1/8", "not a host", "http://images.lan", "1.2.3"])
def test_a_malformed_allow_entry_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="FFENGINE_FETCH_ALLOW"):
        FetchAllow.parse(value)


async def test_the_connector_is_handed_only_the_allowed_addresses_a_name_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check sits in the resolver aiohttp connects with: what is checked is what is connected to."""
    from ffengine import fetch as fetch_module

    answers = {"mixed.example": ["93.184.216.34", "127.0.0.1", "::ffff:10.0.0.1"], "inside.example": ["10.1.2.3"], "images.lan": ["10.1.2.4"]}

    class Stub:
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, object]]:
            return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0} for a in answers[host]]

        async def close(self) -> None:
            pass

    monkeypatch.setattr(fetch_module, "DefaultResolver", Stub)
    resolver = fetch_module._GuardedResolver(FetchAllow.parse("images.lan"))
    assert [r["host"] for r in await resolver.resolve("mixed.example", 80)] == ["93.184.216.34"]
    assert [r["host"] for r in await resolver.resolve("images.lan", 80)] == ["10.1.2.4"]
    with pytest.raises(fetch_module.BlockedAddress, match=r"inside.example \(10.1.2.3\)"):
        await resolver.resolve("inside.example", 80)
