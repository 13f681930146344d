"""Engine settings: a ``.env`` found from any sub-folder, its relative paths taken from its own folder,
weights chosen or left to the index, database URLs shown without their password."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from ffengine.config import DEFAULT_WEIGHTS, EngineSettings, find_dotenv_file, load_dotenv_file, shown_url
from ffengine.errors import ConfigError

SETTINGS = ("FFENGINE_DATA_DIR", "FFENGINE_INDEX", "FFENGINE_CATALOG", "FFENGINE_WEIGHTS", "FFENGINE_IMAGE_ROOTS", "FFENGINE_DEVICE")


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No FFENGINE_* settings, and whatever a test loads into the environment is undone after it."""
    with mock.patch.dict(os.environ):
        for name in [k for k in os.environ if k.startswith("FFENGINE_")]:
            del os.environ[name]
        yield


def test_relative_paths_in_dotenv_are_relative_to_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environ: None) -> None:
    (tmp_path / "w.pth").write_bytes(b"")
    (tmp_path / ".env").write_text(
        "FFENGINE_DATA_DIR=data\nFFENGINE_INDEX=./idx\nFFENGINE_CATALOG=/abs/products.csv\nFFENGINE_WEIGHTS=w.pth\n"
        f"FFENGINE_IMAGE_ROOTS=photos{os.pathsep}{tmp_path}\nFFENGINE_DEVICE=cpu\n"
    )
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert find_dotenv_file() == tmp_path / ".env"
    assert load_dotenv_file() == tmp_path / ".env"
    assert os.environ["FFENGINE_DATA_DIR"] == str(tmp_path / "data")
    assert os.environ["FFENGINE_INDEX"] == str(tmp_path / "idx")
    assert os.environ["FFENGINE_CATALOG"] == "/abs/products.csv"
    assert os.environ["FFENGINE_WEIGHTS"] == str(tmp_path / "w.pth")
    assert os.environ["FFENGINE_IMAGE_ROOTS"] == f"{tmp_path / 'photos'}{os.pathsep}{tmp_path}"
    (tmp_path / "photos").mkdir()
    assert os.environ["FFENGINE_DEVICE"] == "cpu"
    settings = EngineSettings.from_env()
    assert settings.data_dir == tmp_path / "data" and settings.cache_dir == tmp_path / "data" / "cache"


def test_dotenv_leaves_names_and_the_environment_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environ: None) -> None:
    (tmp_path / ".env").write_text("FFENGINE_WEIGHTS=IMAGENET1K_V1\nFFENGINE_DATA_DIR=data\n")
    monkeypatch.chdir(tmp_path)
    os.environ["FFENGINE_DATA_DIR"] = "elsewhere"  # set by the caller: wins, as given
    load_dotenv_file()
    assert os.environ["FFENGINE_WEIGHTS"] == "IMAGENET1K_V1" and os.environ["FFENGINE_DATA_DIR"] == "elsewhere"


def test_weights_are_chosen_only_when_set() -> None:
    unset = EngineSettings.from_env({})
    assert unset.weights == DEFAULT_WEIGHTS and not unset.weights_chosen
    assert unset.with_index_weights(Path("/nonexistent/index")) == unset  # no index: the default stays
    chosen = EngineSettings.from_env({"FFENGINE_WEIGHTS": "IMAGENET1K_V1"})
    assert chosen.weights == "IMAGENET1K_V1" and chosen.weights_chosen and chosen.with_index_weights() is chosen


def test_shown_url_hides_the_password() -> None:
    assert shown_url("postgresql+asyncpg://bot:s3cret@db.lan/ff") == "postgresql+asyncpg://bot:***@db.lan/ff"
    assert shown_url("sqlite+aiosqlite:///data/ff.db") == "sqlite+aiosqlite:///data/ff.db"
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        shown_url("not a url")
