"""Bot settings from the environment (and ``.env``), checked once at start-up.

Every problem becomes a :class:`~ffengine.errors.ConfigError` whose message names the
setting, so ``python -m bot`` can stop with one clear line instead of a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ffengine.config import EngineSettings, database_url, env_str, one_of, read_env, setting
from ffengine.errors import ConfigError

DEFAULT_API_URL = "https://api.telegram.org"

NO_TOKEN = (
    "TELEGRAM_BOT_TOKEN is not set: open Telegram, talk to @BotFather, send /newbot, "
    "and put the token it gives you in TELEGRAM_BOT_TOKEN (environment or .env)."
)


def _http_url(raw: str, name: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL such as https://example.org, got {raw!r}")
    return raw.rstrip("/")


def _api_root(raw: str, name: str) -> str:
    """``TELEGRAM_API_URL`` as the server's root. ``http://host:8081/bot`` is accepted too: the Bot API's own
    URLs start that way, so it is a natural way to write a local server's address (PTB adds ``/bot`` itself)."""
    url = _http_url(raw, name)
    return url.removesuffix("/bot") if urlsplit(url).path.endswith("/bot") else url


def _admin_ids(raw: str, name: str) -> frozenset[int]:
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not part.isdigit():
            raise ConfigError(f"{name} must be comma-separated Telegram user ids (numbers), got {part!r}")
        ids.add(int(part))
    return frozenset(ids)


def _matching(pattern: str, problem: str) -> Callable[[str, str], str]:
    """Accepts what the regular expression ``pattern`` matches; else ``problem`` (a format of ``name``, ``raw``)."""
    regex = re.compile(pattern)

    def parse(raw: str, name: str) -> str:
        if not regex.fullmatch(raw):
            raise ConfigError(problem.format(name=name, raw=raw))
        return raw

    return parse


#: A malformed token may still be a real secret: the message never repeats it.
_token = _matching(r"\d{1,20}:[A-Za-z0-9_-]{8,100}", "{name} does not look like a bot token (123456:ABC-...); copy it again from @BotFather.")
_webhook_secret = _matching(r"[A-Za-z0-9_-]{1,256}", "{name} may only use A-Z, a-z, 0-9, _ and - (1 to 256 characters)")
_replica_name = _matching(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", "{name} must be 1-128 letters, digits or . _ : @ - (starting with a letter or digit), got {raw!r}")


def derived_secret(token: str) -> str:
    """The webhook secret when none is set: derived from the token, so every replica of one bot
    registers and checks the same one (a random one per start would lock the others out), and
    nobody without the token can compute it."""
    digest = hmac.new(token.encode(), b"focusedfashion webhook secret", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def default_replica_name() -> str:
    """``host-pid``: unique among processes sharing a database, readable in /models."""
    return f"{socket.gethostname()}-{os.getpid()}"[:128]


@dataclass(frozen=True)
class BotSettings:
    """Everything ``python -m bot`` needs, each setting with its variable and default in one place;
    the token and the webhook secret are kept out of ``repr``."""

    token: str = setting("TELEGRAM_BOT_TOKEN", parse=_token, repr=False)
    engine: EngineSettings
    database_url: str
    admin_ids: frozenset[int] = setting("ADMIN_IDS", frozenset(), parse=_admin_ids)
    api_url: str = setting("TELEGRAM_API_URL", DEFAULT_API_URL, parse=_api_root)
    mode: Literal["polling", "webhook"] = setting("BOT_MODE", "polling", parse=one_of("polling", "webhook", case=str.lower))
    #: Public https URL Telegram posts updates to (webhook mode); its path is served locally.
    webhook_url: str | None = setting("BOT_WEBHOOK_URL", None, parse=_http_url)
    webhook_listen: str = setting("BOT_WEBHOOK_LISTEN", "127.0.0.1")
    webhook_port: int = setting("BOT_WEBHOOK_PORT", 8443, maximum=65535)
    #: Default: derived from the token (:func:`derived_secret`).
    webhook_secret: str = setting("BOT_WEBHOOK_SECRET", "", parse=_webhook_secret, repr=False)
    #: Largest photo downloaded; Telegram's cloud Bot API allows 20 MB, self-hosted servers lift it.
    max_download_mb: int = setting("BOT_MAX_DOWNLOAD_MB", 20, minimum=1)
    queue_size: int = setting("BOT_QUEUE_SIZE", 64, minimum=1)
    batch_size: int = setting("BOT_BATCH_SIZE", 16, minimum=1)
    batch_wait_ms: int = setting("BOT_BATCH_WAIT_MS", 10)
    concurrent_updates: int = setting("BOT_CONCURRENT_UPDATES", 64, minimum=1)
    #: Threads that decode shoppers' photos, apart from every other worker thread (:mod:`bot.limits`).
    decode_threads: int = setting("BOT_DECODE_THREADS", 2, minimum=1)
    #: Photos one user may send per minute once their burst is spent; 0 turns the limit off.
    user_searches_per_minute: float = setting("BOT_USER_SEARCHES_PER_MINUTE", 20.0)
    #: Photos one user may send back to back before the per-minute rate applies.
    user_search_burst: int = setting("BOT_USER_SEARCH_BURST", 5, minimum=1)
    #: Outgoing requests per second over all chats (Telegram allows about 30); 0 disables.
    rate_limit: float = setting("BOT_RATE_LIMIT", 30.0)
    max_retries: int = setting("BOT_MAX_RETRIES", 3)
    error_notify_interval_s: float = setting("BOT_ERROR_NOTIFY_INTERVAL", 60.0)
    log_level: str = setting("BOT_LOG_LEVEL", "INFO", parse=one_of("DEBUG", "INFO", "WARNING", "ERROR", case=str.upper))
    #: This process among the replicas sharing the database (``/models`` names it).
    replica_name: str = setting("BOT_REPLICA_NAME", default_factory=default_replica_name, parse=_replica_name)
    #: How often a replica writes its heartbeat and checks the active model version (PostgreSQL also notifies at once).
    sync_interval_s: float = setting("BOT_SYNC_INTERVAL", 2.0, minimum=0.05)

    def __post_init__(self) -> None:
        if not self.webhook_secret:
            object.__setattr__(self, "webhook_secret", derived_secret(self.token))
        if self.mode == "webhook" and self.webhook_url is None:
            raise ConfigError("BOT_WEBHOOK_URL is required when BOT_MODE=webhook (the public https URL Telegram posts to)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotSettings:
        env = os.environ if env is None else env
        if env_str(env, "TELEGRAM_BOT_TOKEN") is None:
            raise ConfigError(NO_TOKEN)
        return cls(**read_env(cls, env), engine=EngineSettings.from_env(env), database_url=database_url(env))

    @property
    def max_download_bytes(self) -> int:
        return self.max_download_mb * 1024 * 1024

    @property
    def replica_timeout_s(self) -> float:
        """A replica silent this long is taken for dead (its unfinished updates are taken over)."""
        return 5 * self.sync_interval_s

    @property
    def api_base_url(self) -> str:
        return f"{self.api_url}/bot"

    @property
    def file_base_url(self) -> str:
        return f"{self.api_url}/file/bot"

    @property
    def webhook_path(self) -> str:
        path = urlsplit(self.webhook_url).path if self.webhook_url else ""
        return path if path not in ("", "/") else "/telegram"

    def secrets(self) -> list[str]:
        """Values that must never reach a log line."""
        return [s for s in (self.token, self.webhook_secret) if s]
