"""Shared fixtures: generated images, a random-init embedder, and ``../shared`` data.

Tests that need real weights or data use the ``shared`` fixture and skip with a
clear reason when ``../shared`` (or ``FF_SHARED_DIR``) is absent.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the calling test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (real weights/data from ../shared); not present on this machine")
    return path


@pytest.fixture
def shared() -> Callable[..., Path]:
    return shared_path


@pytest.fixture(scope="session")
def real_weights() -> Path:
    return shared_path("models", "mobilenet_v2_imagenet.pth")


def make_image(seed: int = 0, size: tuple[int, int] = (96, 128), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small, deterministic, textured picture encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(3,), dtype=np.uint8)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([(base[c] + (xx * (c + 1) + yy * (3 - c)) * (seed % 7 + 1)) % 256 for c in range(3)], axis=-1)
    img = Image.fromarray(arr.astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    return make_image


@pytest.fixture(scope="session")
def random_embedder():
    """A random-initialised MobileNetV2 on CPU: fast tests without real weights."""
    import torch

    from ffengine.embedder import Embedder

    torch.manual_seed(0)
    return Embedder(None, "cpu")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A fresh SQLite file for one test."""
    return tmp_path / "ff.db"


@pytest.fixture
async def db(db_path: Path):
    """A real, migrated SQLite database in ``db_path``, closed after the test."""
    from ffengine.db import Database

    database = await Database.open(f"sqlite+aiosqlite:///{db_path}")
    yield database
    await database.close()
