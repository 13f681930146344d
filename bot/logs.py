"""Logging set-up that never writes the bot token (or webhook secret) anywhere.

httpx logs every request URL at INFO, and Bot API URLs contain the token
(``/bot<token>/getUpdates``), so httpx is held at WARNING and a filter on every
root handler scrubs the secrets from messages, arguments and tracebacks alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

REDACTED = "<redacted>"


class RedactSecrets(logging.Filter):
    """Replace each secret with ``<redacted>`` in the fully formatted record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


def install_redaction(secrets: Iterable[str], logger: logging.Logger | None = None) -> RedactSecrets:
    """Attach one redacting filter to every handler of ``logger`` (root by default)."""
    logger = logger or logging.getLogger()
    redact = RedactSecrets(secrets)
    for handler in logger.handlers:
        handler.addFilter(redact)
    return redact


def setup_logging(secrets: Iterable[str], level: str = "INFO") -> RedactSecrets:
    """Console logging for ``python -m bot``: timestamps, quiet HTTP client, no secrets."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    return install_redaction(secrets)
