"""``python -m bot`` / ``focusedfashion-bot``: read settings, prepare, serve until Ctrl-C.

A missing or malformed setting, unreadable weights or index, or a token Telegram refuses
stops start-up with one line naming the problem (exit status 2), never a traceback. A fatal
signal (SIGBUS from a database file cut short under the bot, SIGSEGV) still writes the
Python stack of every thread to stderr before the process dies, rather than nothing.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys

from bot.config import BotSettings
from bot.logs import setup_logging
from ffengine.config import load_dotenv_file
from ffengine.errors import FFError

log = logging.getLogger("bot")
EXIT_CONFIG = 2


def fail(message: str) -> int:
    print(f"focusedfashion-bot: {message}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable(file=sys.__stderr__)
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nSettings are read from the environment and .env; see README.md.")
        return 0
    load_dotenv_file()
    try:
        settings = BotSettings.from_env()
    except FFError as exc:
        return fail(str(exc))
    scrub = setup_logging(settings.secrets(), settings.log_level).scrub
    # Heavy imports (torch, PTB, SQLAlchemy) only once the settings are known to be good.
    from sqlalchemy.exc import SQLAlchemyError
    from telegram.error import InvalidToken, NetworkError

    from bot.app import build_application
    from bot.runner import serve_until_signal

    try:
        asyncio.run(serve_until_signal(build_application(settings), settings))
    except InvalidToken:
        return fail("Telegram refused TELEGRAM_BOT_TOKEN (unauthorized); copy it again from @BotFather.")
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
