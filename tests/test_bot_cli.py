"""``python -m bot`` start-up failures: one line on stderr naming the problem, exit status 2, no token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_bot_api import FakeBotAPI

TOKEN = "123456789:AAHtestTokenForTheBotTests-abcdefgh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def run_bot_cli(tmp_path: Path, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "BOT_", "FFENGINE_", "ADMIN_", "DATABASE_"))}
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def test_cli_without_token_says_how_to_get_one(tmp_path: Path) -> None:
    code, err = run_bot_cli(tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and "TELEGRAM_BOT_TOKEN" in err and "@BotFather" in err and "Traceback" not in err


def test_cli_reads_dotenv_and_names_a_bad_setting(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nADMIN_IDS=5,bob\n")
    code, err = run_bot_cli(tmp_path)
    assert code == 2 and err.count("\n") == 1 and "ADMIN_IDS" in err and "Traceback" not in err
    assert TOKEN not in err


@contextlib.contextmanager
def fake_in_a_thread() -> Iterator[FakeBotAPI]:
    """The fake on its own loop and thread, for code that runs ``asyncio.run`` itself (``bot.__main__.main``)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeBotAPI(token=TOKEN)
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("problem", ["unreachable", "refused token"])
def test_main_start_up_failures_are_one_line_without_the_token(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.__main__ import main

    monkeypatch.chdir(tmp_path)  # no .env here
    other_token = "987654321:AAHsomeoneElsesTokenNotKnownHere-xy"
    with fake_in_a_thread() as fake:
        root = f"http://127.0.0.1:{free_port()}" if problem == "unreachable" else fake.root
        monkeypatch.setenv("TELEGRAM_BOT_TOKEN", other_token)
        monkeypatch.setenv("TELEGRAM_API_URL", root)
        monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'ff.db'}")
        assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and other_token not in err
    expected = "cannot reach the Bot API" if problem == "unreachable" else "Telegram refused TELEGRAM_BOT_TOKEN"
    assert err.startswith("focusedfashion-bot: ") and expected in err
