"""``python -m bot`` start-up failures: one line on stderr naming the problem, exit status 2, no token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.fake_bot_api import FakeBotAPI

TOKEN = "123456789:AAHtestTokenForTheBotTests-abcdefgh"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without any bot or engine setting, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "BOT_", "FFENGINE_", "ADMIN_", "DATABASE_"))}
    return {**clean, **env}


def run_bot_cli(tmp_path: Path, **env: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=clean_env(**env), capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def test_help_version_and_unknown_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.__main__ import main

    for argv, status in ((["--help"], 0), (["--version"], 0), (["--verbose"], 2)):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == status, argv
    out, err = capsys.readouterr()
    assert out.startswith("usage: ") and "--version" in out and ".env.example" in out and "``" not in out
    assert out.rstrip().endswith(version("focusedfashion"))
    assert "unrecognized arguments: --verbose" in err


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


EXPECTED = {
    "unreachable": "cannot reach the Bot API",
    "refused token": "Telegram refused TELEGRAM_BOT_TOKEN",
    "refused token, URL written with /bot": "Telegram refused TELEGRAM_BOT_TOKEN",
    "404: not a Bot API root": "is not the root of a Bot API server",
}


@pytest.mark.parametrize("problem", list(EXPECTED))
def test_main_start_up_failures_are_one_line_without_the_token(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.__main__ import main

    monkeypatch.chdir(tmp_path)  # no .env here
    other_token = "987654321:AAHsomeoneElsesTokenNotKnownHere-xy"
    token = TOKEN if problem.startswith("404") else other_token  # a 404 must not be blamed on a good token
    with fake_in_a_thread() as fake:
        root = {"unreachable": f"http://127.0.0.1:{free_port()}", "404: not a Bot API root": f"{fake.root}/api"}.get(problem, fake.root)
        monkeypatch.setenv("TELEGRAM_BOT_TOKEN", token)
        monkeypatch.setenv("TELEGRAM_API_URL", root + ("/bot" if "/bot" in problem else ""))
        monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'ff.db'}")
        assert main([]) == 2
        getme = [call for call in fake.calls if call.method == "getMe"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and token not in err, err
    assert err.startswith("focusedfashion-bot: ") and EXPECTED[problem] in err, err
    assert problem.startswith("refused") or "TELEGRAM_BOT_TOKEN" not in err
    assert len(getme) == problem.startswith("refused")  # "/bot" written into the URL is not doubled


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init weights (a real file + sidecar) and an index built from them, which records them."""
    import torch
    from torchvision.models import mobilenet_v2

    from ffengine.build import build_index
    from ffengine.embedder import Embedder
    from ffengine.weights import Preprocess, save_weights

    from tests.test_bot import write_catalog

    root = tmp_path_factory.mktemp("bot-start")
    torch.manual_seed(7)
    weights = save_weights(mobilenet_v2(weights=None).state_dict(), root / "w.pth", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))
    build_index(write_catalog(root / "shop", 4), root / "index", Embedder.load(str(weights), "cpu", runtime="torch"), progress=False)
    return root


def test_start_up_says_what_matters_with_the_index_weights_and_the_project_data(shop: Path, tmp_path: Path) -> None:
    """Run from a sub-folder, with FFENGINE_DATA_DIR=data in the project's .env, no FFENGINE_WEIGHTS and the API
    URL written with /bot: the data folder is the project's, the weights the index's; a few lines, no Alembic."""
    shutil.copytree(shop / "index", tmp_path / "data" / "index")
    (tmp_path / "sub").mkdir()
    with fake_in_a_thread() as fake:
        (tmp_path / ".env").write_text(
            f"TELEGRAM_BOT_TOKEN={TOKEN}\nTELEGRAM_API_URL={fake.root}/bot\nFFENGINE_DATA_DIR=data\nFFENGINE_DEVICE=cpu\nFFENGINE_RUNTIME=torch\n"
        )
        env = clean_env(PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "bot"], cwd=tmp_path / "sub", env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline and not any(c.method == "setMyCommands" for c in fake.calls):
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=60)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    data = tmp_path / "data"
    assert f"FocusedFashion {version('focusedfashion')}, polling; database sqlite+aiosqlite:///{data / 'focusedfashion.db'}; data folder {data}" in err
    assert f"ready: model base, 4 products (index {data / 'index'}; weights {shop / 'w.pth'}, torch on cpu)" in err
    assert (data / "focusedfashion.db").is_file() and "alembic" not in err and TOKEN not in err
    lines = err.splitlines()
    start_up = lines[: next(i for i, line in enumerate(lines) if " ready: model " in line) + 1]
    assert len(start_up) <= 5, err  # first run: schema created, version registered, then what runs
