"""Bot settings: defaults, every malformed setting named in one line, and no token in any log line."""

from __future__ import annotations

import io
import logging

import pytest

from bot.config import BotSettings
from bot.logs import REDACTED, install_redaction
from ffengine.errors import ConfigError

TOKEN = "123456789:AAHfakeTokenForTests_only-0123456789"


def settings(**env: str) -> BotSettings:
    return BotSettings.from_env({"TELEGRAM_BOT_TOKEN": TOKEN, **env})


def test_defaults() -> None:
    s = settings()
    assert s.api_base_url == "https://api.telegram.org/bot"
    assert s.file_base_url == "https://api.telegram.org/file/bot"
    assert s.mode == "polling" and s.admin_ids == frozenset()
    assert s.max_download_bytes == 20 * 1024 * 1024
    assert s.database_url.endswith("data/focusedfashion.db")
    assert TOKEN not in repr(s) and s.webhook_secret not in repr(s)


def test_values_are_read() -> None:
    s = settings(
        TELEGRAM_API_URL="http://127.0.0.1:8081/",
        ADMIN_IDS=" 5, 7 ,",
        BOT_MAX_DOWNLOAD_MB="2000",
        BOT_MODE="webhook",
        BOT_WEBHOOK_URL="https://bot.example/hook/abc",
        BOT_WEBHOOK_SECRET="s3cret_-X",
        FFENGINE_DEVICE="cpu",
        FFENGINE_RUNTIME="onnx",
    )
    assert s.api_base_url == "http://127.0.0.1:8081/bot" and s.file_base_url == "http://127.0.0.1:8081/file/bot"
    assert s.admin_ids == {5, 7}
    assert s.max_download_bytes == 2000 * 1024 * 1024
    assert s.webhook_path == "/hook/abc" and s.webhook_secret == "s3cret_-X"
    assert s.engine.device == "cpu" and s.engine.runtime == "onnx"
    assert settings().engine.runtime == "auto"
    assert s.secrets() == [TOKEN, "s3cret_-X"]


@pytest.mark.parametrize(
    ("written", "root"),
    [
        ("http://127.0.0.1:8081/bot", "http://127.0.0.1:8081"),  # as the Bot API's own URLs start
        ("http://127.0.0.1:8081/bot/", "http://127.0.0.1:8081"),
        ("https://proxy.example/telegram/bot", "https://proxy.example/telegram"),
        ("http://bot:8081", "http://bot:8081"),  # a host named bot is left alone
        ("http://127.0.0.1:8081/robot", "http://127.0.0.1:8081/robot"),
    ],
)
def test_api_url_is_the_root_with_or_without_bot(written: str, root: str) -> None:
    s = settings(TELEGRAM_API_URL=written)
    assert s.api_url == root and s.api_base_url == f"{root}/bot" and s.file_base_url == f"{root}/file/bot"


def test_missing_token_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError) as err:
        BotSettings.from_env({"TELEGRAM_BOT_TOKEN": "  "})
    assert "TELEGRAM_BOT_TOKEN" in str(err.value) and "@BotFather" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TELEGRAM_BOT_TOKEN": "not a token"}, "TELEGRAM_BOT_TOKEN"),
        ({"TELEGRAM_API_URL": "api.telegram.org"}, "TELEGRAM_API_URL"),
        ({"ADMIN_IDS": "5,alice"}, "ADMIN_IDS"),
        ({"BOT_MODE": "push"}, "BOT_MODE"),
        ({"BOT_MODE": "webhook"}, "BOT_WEBHOOK_URL"),
        ({"BOT_WEBHOOK_SECRET": "has space"}, "BOT_WEBHOOK_SECRET"),
        ({"BOT_WEBHOOK_PORT": "70000"}, "BOT_WEBHOOK_PORT"),
        ({"BOT_MAX_DOWNLOAD_MB": "0"}, "BOT_MAX_DOWNLOAD_MB"),
        ({"BOT_QUEUE_SIZE": "many"}, "BOT_QUEUE_SIZE"),
        ({"BOT_RATE_LIMIT": "-1"}, "BOT_RATE_LIMIT"),
        ({"BOT_LOG_LEVEL": "LOUD"}, "BOT_LOG_LEVEL"),
        ({"FFENGINE_DEVICE": "tpu"}, "FFENGINE_DEVICE"),
        ({"FFENGINE_RUNTIME": "tensorrt"}, "FFENGINE_RUNTIME"),
        ({"DATABASE_URL": "focusedfashion.db"}, "DATABASE_URL"),
    ],
)
def test_bad_setting_is_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(**env)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_malformed_token_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        settings(TELEGRAM_BOT_TOKEN="123:short secret")
    assert "short secret" not in str(err.value)


def test_webhook_secret_when_unset_is_the_same_for_every_replica_of_a_bot() -> None:
    """Derived from the token: each replica's setWebhook registers the one the others check."""
    a, b = settings(), settings()
    other = settings(TELEGRAM_BOT_TOKEN="987654321:AAHanotherTokenForTheBotTests-xyz")
    assert len(a.webhook_secret) >= 32 and a.webhook_secret == b.webhook_secret != other.webhook_secret
    assert TOKEN.split(":")[1] not in a.webhook_secret


def test_token_never_reaches_a_log_line() -> None:
    """httpx-style URL lines, %-args and tracebacks are all scrubbed by the handler filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_bot_config.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    install_redaction([TOKEN, "hook-secret"], logger)
    try:
        logger.warning("HTTP Request: POST https://api.telegram.org/bot%s/getUpdates", TOKEN)
        logger.warning(f"secret is hook-secret and url /bot{TOKEN}/x")
        try:
            raise RuntimeError(f"failed https://api.telegram.org/file/bot{TOKEN}/photos/1.jpg")
        except RuntimeError:
            logger.exception("download failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert TOKEN not in out and "hook-secret" not in out
    assert out.count(REDACTED) == 4
    assert "RuntimeError: failed https://api.telegram.org/file/bot<redacted>/photos/1.jpg" in out


def test_env_example_documents_every_setting_with_its_default() -> None:
    """The table on the dataclasses is the one place of names and defaults; .env.example must agree with it."""
    from dataclasses import fields
    from pathlib import Path

    from ffengine.config import EngineSettings, read_env

    lines = (Path(__file__).parents[1] / ".env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    for cls in (EngineSettings, BotSettings):
        table = {f.name: f for f in fields(cls) if "env" in f.metadata}
        assert {f.metadata["env"] for f in table.values()} <= set(example)
        for name, value in read_env(cls, {**example, "TELEGRAM_BOT_TOKEN": ""}).items():
            assert value == table[name].default, table[name].metadata["env"]


def test_derived_defaults_follow_what_they_derive_from() -> None:
    from pathlib import Path

    from ffengine.config import EngineSettings

    assert settings(FFENGINE_DATA_DIR="/srv/ff").engine.index_dir == Path("/srv/ff/index")
    assert settings(FFENGINE_DATA_DIR="/srv/ff").database_url == "sqlite+aiosqlite:////srv/ff/focusedfashion.db"
    assert EngineSettings(data_dir=Path("w")).index_dir == Path("w/index")
    assert settings(FFENGINE_INDEX="elsewhere").engine.index_dir == Path("elsewhere")
    assert settings(BOT_MAX_DOWNLOAD_MB=" ").max_download_bytes == 20 * 1024 * 1024  # blank: the default
