"""``python -m bot`` / ``focusedfashion-bot``: read settings, prepare, serve until Ctrl-C.

A missing or malformed setting, unreadable weights or index, or a token Telegram refuses
stops start-up with one line naming the problem (exit status 2), never a traceback. A fatal
signal (SIGBUS from a database file cut short under the bot, SIGSEGV) still writes the
Python stack of every thread to stderr before the process dies, rather than nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import sys

from bot.config import DEFAULT_API_URL, BotSettings
from bot.logs import setup_logging
from ffengine.cli import add_version_flag, program_name
from ffengine.config import load_dotenv_file
from ffengine.errors import FFError

log = logging.getLogger("bot")
EXIT_CONFIG = 2


def fail(message: str) -> int:
    print(f"focusedfashion-bot: {message}", file=sys.stderr)
    return EXIT_CONFIG


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The bot takes no arguments (settings come from the environment): only ``--help`` and ``--version``."""
    parser = argparse.ArgumentParser(
        prog=program_name("bot"),
        description="Run the FocusedFashion Telegram bot until Ctrl-C: shoppers send a photo of clothing, "
        "the bot answers with the most similar products of the store's catalogue.",
        epilog="Settings are read from the environment and a .env file (the nearest one, from this folder up); "
        "every setting is documented in .env.example. A missing or malformed setting stops start-up with one "
        "line naming it (exit status 2).",
    )
    add_version_flag(parser)
    return parser.parse_args(argv)


def server_answer(exc: BaseException) -> str:
    """The innermost message of an exception chain: for a PTB error, what the Bot API server said."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable(file=sys.__stderr__)
    parse_args(argv)
    load_dotenv_file()
    try:
        settings = BotSettings.from_env()
    except FFError as exc:
        return fail(str(exc))
    scrub = setup_logging(settings.secrets(), settings.log_level).scrub
    if settings.log_level != "DEBUG":  # Alembic logs each of its plugins, FAISS which CPU build it tried, at every start
        for chatty in ("alembic", "faiss.loader"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    # Heavy imports (torch, PTB, SQLAlchemy) only once the settings are known to be good.
    from sqlalchemy.exc import SQLAlchemyError
    from telegram.error import InvalidToken, NetworkError

    from bot.app import build_application
    from bot.runner import serve_until_signal

    try:
        asyncio.run(serve_until_signal(build_application(settings), settings))
    except InvalidToken as exc:  # PTB says this for a 404 (a wrong address) as for a 401 (a wrong token)
        answer = scrub(server_answer(exc))
        if "unauthorized" in answer.lower():
            return fail("Telegram refused TELEGRAM_BOT_TOKEN (unauthorized); copy it again from @BotFather.")
        return fail(
            f"TELEGRAM_API_URL={settings.api_url} is not the root of a Bot API server: it answered {answer[:200]!r} to getMe. "
            f"Set it to the server's root, such as {DEFAULT_API_URL} or http://127.0.0.1:8081 for a local server."
        )
    except NetworkError as exc:
        return fail(scrub(f"cannot reach the Bot API at TELEGRAM_API_URL={settings.api_url} ({exc.message})."))
    except FFError as exc:
        return fail(scrub(str(exc)))
    except SQLAlchemyError as exc:
        reason = scrub(str(getattr(exc, "orig", None) or exc))[:300]
        return fail(f"cannot open the database at DATABASE_URL ({type(exc).__name__}: {reason}).")
    except OSError as exc:  # e.g. BOT_WEBHOOK_PORT already in use, an unwritable FFENGINE_DATA_DIR
        return fail(scrub(f"start-up failed: {exc}"))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
