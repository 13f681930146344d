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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from ffengine.config import EngineSettings, database_url, env_float, env_int, env_str
from ffengine.errors import ConfigError

DEFAULT_API_URL = "https://api.telegram.org"
#: What Telegram's cloud Bot API lets a bot download; self-hosted servers lift it.
TELEGRAM_DOWNLOAD_LIMIT_MB = 20
TOKEN_RE = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{8,100}$")
SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
REPLICA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

NO_TOKEN = (
    "TELEGRAM_BOT_TOKEN is not set: open Telegram, talk to @BotFather, send /newbot, "
    "and put the token it gives you in TELEGRAM_BOT_TOKEN (environment or .env)."
)

Mode = Literal["polling", "webhook"]


def _http_url(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    raw = env_str(env, name, default)
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL such as https://example.org, got {raw!r}")
    return raw.rstrip("/")


def _api_root(env: Mapping[str, str]) -> str:
    """``TELEGRAM_API_URL`` as the server's root. ``http://host:8081/bot`` is accepted too: the Bot API's own
    URLs start that way, so it is a natural way to write a local server's address (PTB adds ``/bot`` itself)."""
    url = _http_url(env, "TELEGRAM_API_URL", DEFAULT_API_URL) or DEFAULT_API_URL
    return url.removesuffix("/bot") if urlsplit(url).path.endswith("/bot") else url


def _admin_ids(env: Mapping[str, str]) -> frozenset[int]:
    raw = env_str(env, "ADMIN_IDS", "") or ""
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not part.isdigit():
            raise ConfigError(f"ADMIN_IDS must be comma-separated Telegram user ids (numbers), got {part!r}")
        ids.add(int(part))
    return frozenset(ids)


def derived_secret(token: str) -> str:
    """The webhook secret when none is set: derived from the token, so every replica of one bot
    registers and checks the same one (a random one per start would lock the others out), and
    nobody without the token can compute it."""
    digest = hmac.new(token.encode(), b"focusedfashion webhook secret", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def default_replica_name() -> str:
    """``host-pid``: unique among processes sharing a database, readable in /models."""
    return f"{socket.gethostname()}-{os.getpid()}"[:128]


def _replica_name(env: Mapping[str, str]) -> str:
    name = env_str(env, "BOT_REPLICA_NAME") or default_replica_name()
    if not REPLICA_RE.match(name):
        raise ConfigError(f"BOT_REPLICA_NAME must be 1-128 letters, digits or . _ : @ - (starting with a letter or digit), got {name!r}")
    return name


def _log_level(env: Mapping[str, str]) -> str:
    level = (env_str(env, "BOT_LOG_LEVEL", "INFO") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"BOT_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level


@dataclass(frozen=True)
class BotSettings:
    """Everything ``python -m bot`` needs; the token is kept out of ``repr``."""

    token: str = field(repr=False)
    engine: EngineSettings
    database_url: str
    admin_ids: frozenset[int] = frozenset()
    api_url: str = DEFAULT_API_URL
    mode: Mode = "polling"
    #: Public https URL Telegram posts updates to (webhook mode); its path is served locally.
    webhook_url: str | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    webhook_secret: str = field(default="", repr=False)
    max_download_bytes: int = TELEGRAM_DOWNLOAD_LIMIT_MB * 1024 * 1024
    queue_size: int = 64
    batch_size: int = 16
    batch_wait_ms: int = 10
    concurrent_updates: int = 64
    #: Outgoing requests per second over all chats (Telegram allows about 30); 0 disables.
    rate_limit: float = 30.0
    max_retries: int = 3
    error_notify_interval_s: float = 60.0
    log_level: str = "INFO"
    #: This process among the replicas sharing the database (``/models`` names it).
    replica_name: str = field(default_factory=default_replica_name)
    #: How often a replica writes its heartbeat and checks the active model version (PostgreSQL also notifies at once).
    sync_interval_s: float = 2.0

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotSettings:
        env = os.environ if env is None else env
        token = env_str(env, "TELEGRAM_BOT_TOKEN")
        if token is None:
            raise ConfigError(NO_TOKEN)
        if not TOKEN_RE.match(token):
            # Never echo the value: a malformed token may still be a real secret.
            raise ConfigError("TELEGRAM_BOT_TOKEN does not look like a bot token (123456:ABC-...); copy it again from @BotFather.")
        mode = (env_str(env, "BOT_MODE", "polling") or "polling").lower()
        if mode not in ("polling", "webhook"):
            raise ConfigError(f"BOT_MODE must be polling or webhook, got {mode!r}")
        webhook_url = _http_url(env, "BOT_WEBHOOK_URL")
        if mode == "webhook" and webhook_url is None:
            raise ConfigError("BOT_WEBHOOK_URL is required when BOT_MODE=webhook (the public https URL Telegram posts to)")
        port = env_int(env, "BOT_WEBHOOK_PORT", 8443)
        if port > 65535:
            raise ConfigError(f"BOT_WEBHOOK_PORT must be a TCP port (0 to 65535), got {port}")
        secret = env_str(env, "BOT_WEBHOOK_SECRET") or derived_secret(token)
        if not SECRET_RE.match(secret):
            raise ConfigError("BOT_WEBHOOK_SECRET may only use A-Z, a-z, 0-9, _ and - (1 to 256 characters)")
        return cls(
            token=token,
            engine=EngineSettings.from_env(env),
            database_url=database_url(env),
            admin_ids=_admin_ids(env),
            api_url=_api_root(env),
            mode=mode,  # type: ignore[arg-type]
            webhook_url=webhook_url,
            webhook_listen=env_str(env, "BOT_WEBHOOK_LISTEN", "127.0.0.1"),  # type: ignore[arg-type]
            webhook_port=port,
            webhook_secret=secret,
            max_download_bytes=env_int(env, "BOT_MAX_DOWNLOAD_MB", TELEGRAM_DOWNLOAD_LIMIT_MB, minimum=1) * 1024 * 1024,
            queue_size=env_int(env, "BOT_QUEUE_SIZE", 64, minimum=1),
            batch_size=env_int(env, "BOT_BATCH_SIZE", 16, minimum=1),
            batch_wait_ms=env_int(env, "BOT_BATCH_WAIT_MS", 10),
            concurrent_updates=env_int(env, "BOT_CONCURRENT_UPDATES", 64, minimum=1),
            rate_limit=env_float(env, "BOT_RATE_LIMIT", 30.0),
            max_retries=env_int(env, "BOT_MAX_RETRIES", 3),
            error_notify_interval_s=env_float(env, "BOT_ERROR_NOTIFY_INTERVAL", 60.0),
            log_level=_log_level(env),
            replica_name=_replica_name(env),
            sync_interval_s=env_float(env, "BOT_SYNC_INTERVAL", 2.0, minimum=0.05),
        )
