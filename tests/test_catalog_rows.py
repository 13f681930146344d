"""Rows the importer accepts are rows the database stores, and one bad row costs only that row (issue #20).

The field rules are checked against a real SQLite file and, with ``FF_TEST_POSTGRES_URL``, a real
PostgreSQL database (which refuses a NUL byte in text); bad URLs, deep JSON and a slow image server
go through the real builder, the last on loopback (:class:`~tests.test_fetch.ImageServer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ffengine.build import build_index
from ffengine.catalog import FIELD_LIMITS, Problem, product_problems, read_catalog
from ffengine.config import FETCH_DEADLINE
from ffengine.db import Database
from ffengine.db import models as m
from ffengine.embedder import Embedder
from ffengine.errors import ConfigError
from ffengine.fetch import FetchSettings
from tests.conftest import make_image
from tests.pg_cluster import fresh_database
from tests.test_build import row, write_catalog
from tests.test_catalog import by_line, write
from tests.test_fetch import FAST, ImageServer, image_server  # noqa: F401  (fixture)

PG_URL = os.environ.get("FF_TEST_POSTGRES_URL", "")
GOOD = {"id": "ok", "title": "Fine", "url": "https://shop.example/ok", "image": "a.jpg"}


@contextlib.asynccontextmanager
async def database_url(kind: str, db_path: Path) -> AsyncIterator[str]:
    """An SQLite file at ``db_path``, or a fresh PostgreSQL database (dropped afterwards) when a server is given."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{db_path}"
        return
    if not PG_URL:
        pytest.skip("set FF_TEST_POSTGRES_URL=postgresql+asyncpg://user@127.0.0.1:PORT/postgres to run")
    async with fresh_database(PG_URL) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Database]:
    """The bot's database, migrated, on SQLite and on PostgreSQL (which refuses a NUL byte in text)."""
    async with database_url(request.param, db_path) as url:
        db = await Database.open(url)
        try:
            yield db
        finally:
            await db.close()


def jsonl(path: Path, rows: list[dict[str, object] | str]) -> Path:
    """One line per row: a dict as JSON, a string as it is."""
    return write(path, "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def reasons(problems: list[Problem]) -> dict[int, str]:
    return {line: p.reason for line, p in by_line(problems).items()}


async def test_every_row_the_importer_keeps_is_stored_and_the_bad_fields_are_named_by_line(
    tmp_path: Path, database: Database
) -> None:
    long = {name: "x" * (FIELD_LIMITS[name] + 1) for name in ("title", "category", "colour", "gender")}
    cat = jsonl(
        tmp_path / "shop.jsonl",
        [
            GOOD,  # line 1
            {**GOOD, "id": "cat", "category": long["category"]},  # 2
            {**GOOD, "id": "col", "colour": long["colour"], "gender": long["gender"]},  # 3
            {**GOOD, "id": "long-title", "title": long["title"]},  # 4
            {**GOOD, "id": "nul-title", "title": "Blue\x00shirt\x07"},  # 5
            {**GOOD, "id": "nul-id\x00"},  # 6
            {**GOOD, "id": "nul-image", "image": "a\x00.jpg"},  # 7
            {**GOOD, "id": "nul-label", "category": "Shirts\x00", "gender": "Men\x1b"},  # 8
            {**GOOD, "id": "nul-extra", "material": "cot\x00ton", "care": "wash\ncold"},  # 9
        ],
    )
    read = read_catalog(cat)

    assert [p.id for p in read.products] == ["ok", "cat", "col", "nul-title", "nul-label", "nul-extra"]
    assert reasons(read.problems) == {
        4: f"title is longer than {FIELD_LIMITS['title']} characters ({FIELD_LIMITS['title'] + 1})",
        6: "id contains a NUL byte",
        7: "image contains a NUL byte",
    }
    assert [str(w) for w in read.warnings] == [
        f"line 2 (id cat): category is longer than {FIELD_LIMITS['category']} characters (129); imported without it",
        f"line 3 (id col): colour is longer than {FIELD_LIMITS['colour']} characters (65); imported without it",
        f"line 3 (id col): gender is longer than {FIELD_LIMITS['gender']} characters (65); imported without it",
        "line 5 (id nul-title): title contains a NUL byte; replaced by spaces",
        "line 8 (id nul-label): category contains a NUL byte; imported without it",
        "line 8 (id nul-label): gender contains the control character '\\x1b'; imported without it",
        "line 9 (id nul-extra): material contains a NUL byte; replaced by spaces",
    ]
    kept = {p.id: p for p in read.products}
    assert (kept["cat"].category, kept["col"].colour, kept["col"].gender) == (None, None, None)
    assert kept["nul-title"].title == "Blue shirt"
    assert kept["nul-extra"].extra == {"material": "cot ton", "care": "wash\ncold"}  # line breaks stay in free text
    assert all(product_problems(p) == [] for p in read.products)

    stored = await database.upsert_products(read.products)  # what the bot does at start-up and on every switch
    assert stored.inserted == len(read.products)
    assert (await database.upsert_products(read.products)).unchanged == len(read.products)


def test_the_products_columns_are_as_wide_as_the_importer_allows() -> None:
    columns = m.Product.__table__.c
    for name in ("category", "colour", "gender", "currency"):
        assert columns[name].type.length == FIELD_LIMITS[name], name
    assert m.SearchItem.__table__.c.category.type.length == FIELD_LIMITS["category"]
    assert columns.id.type.length >= FIELD_LIMITS["id"]


def test_a_csv_row_with_a_nul_byte_is_imported_by_the_same_rules(tmp_path: Path) -> None:
    rows = ["id,title,url,image,colour", "c1,Red\x00cap,https://s.example/1,a.jpg,Red\x00", "c2,Ok,,b.jpg,Blue"]
    cat = write(tmp_path / "p.csv", "\n".join(rows) + "\n")
    read = read_catalog(cat)
    assert [(p.id, p.title, p.colour) for p in read.products] == [("c1", "Red cap", None), ("c2", "Ok", "Blue")]
    assert [w.line for w in read.warnings] == [2, 2, 3]  # title cleaned, colour cleared; c2 has no link


class FailsOnOnePicture:
    """The random embedder, embedding each picture in its decode thread, failing on the picture ``bad_width``
    wide in a way no one planned for (not an ``ImageRejected``)."""

    wants_one_picture_per_thread = True

    def __init__(self, inner: Embedder, bad_width: int) -> None:
        self.inner, self.bad_width, self.seen = inner, bad_width, threading.local()
        self.fingerprint, self.dim, self.preprocess = inner.fingerprint, inner.dim, inner.preprocess
        self.source, self.kind_head = inner.source, inner.kind_head

    def prepare(self, images):  # type: ignore[no-untyped-def]
        self.seen.bad = any(image.width == self.bad_width for image in images)  # the same thread embeds it next
        return self.inner.prepare(images)

    def embed_arrays(self, batch: np.ndarray, on_caller_thread: bool = False) -> np.ndarray:
        if getattr(self.seen, "bad", False):
            raise RuntimeError("the runtime refused the input")
        return self.inner.embed_arrays(batch)


def test_a_url_that_breaks_idna_deep_json_and_an_unforeseen_error_cost_only_their_rows(
    tmp_path: Path, random_embedder: Embedder
) -> None:
    (tmp_path / "a.jpg").write_bytes(make_image(seed=1))
    (tmp_path / "b.jpg").write_bytes(make_image(seed=2, size=(77, 128)))
    nested = json.dumps({**GOOD, "id": "deep"})[:-1] + ', "details": ' + "[" * 3000 + "]" * 3000 + "}"
    cat = jsonl(
        tmp_path / "shop.jsonl",
        [
            GOOD,  # line 1
            nested,  # 2
            {**GOOD, "id": "idna", "image": "http://example..com/x.jpg"},  # 3
            {**GOOD, "id": "ipv6", "url": "http://[broken/x", "image": "http://[broken/x.jpg"},  # 4
            {**GOOD, "id": "odd", "image": "b.jpg"},  # 5
            {**GOOD, "id": "last", "url": "http://[broken/x"},  # 6
        ],
    )
    report = build_index(cat, tmp_path / "index", FailsOnOnePicture(random_embedder, bad_width=77), progress=False)

    assert report.products == 2
    assert reasons(report.skipped) == {
        2: "not valid JSON (nested too deeply)",
        3: "download failed (the host name is not a valid domain name): http://example..com/x.jpg",
        4: "image must be an http(s) URL or a local path, got 'http://[broken/x.jpg'",
        5: f"cannot use the picture (RuntimeError: the runtime refused the input): {tmp_path / 'b.jpg'}",
    }
    assert [str(w) for w in report.warnings] == [
        "line 6 (id last): url cannot be parsed: 'http://[broken/x'; imported without a link"
    ]


def test_the_fetch_deadline_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FETCH_DEADLINE, raising=False)
    assert FetchSettings.from_env().deadline_s == 3600
    assert FetchSettings.from_env({FETCH_DEADLINE: "2.5"}).deadline_s == 2.5
    assert FetchSettings.from_env({FETCH_DEADLINE: "0"}).deadline_s is None  # no deadline
    assert FetchSettings.from_env({FETCH_DEADLINE: "9"}, deadline_s=1.0).deadline_s == 1.0  # an explicit limit wins
    with pytest.raises(ConfigError, match=FETCH_DEADLINE):
        FetchSettings.from_env({FETCH_DEADLINE: "-1"})
    with pytest.raises(ValueError):
        FetchSettings(deadline_s=0)


def test_past_the_fetch_deadline_the_remaining_images_are_skipped_rows_and_the_rest_builds(
    tmp_path: Path, random_embedder: Embedder, image_server: ImageServer
) -> None:
    """A server that answers nothing (``/slow/`` waits 30 s, then gives up by itself) cannot hold the import
    past its deadline: one download at a time, the first is cut off and the queued ones never start."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.jpg").write_bytes(make_image(seed=3))
    slow = [image_server.url(f"/slow/deadline-{i}.jpg") for i in range(3)]
    rows = [row("local", "images/0.jpg"), *(row(f"slow{i}", url) for i, url in enumerate(slow))]
    cat = write_catalog(tmp_path / "shop.csv", rows)
    settings = replace(FAST, concurrency=1, timeout_s=20.0, retries=3, deadline_s=0.5)

    report = build_index(cat, tmp_path / "index", random_embedder, progress=False, fetch=settings)

    assert report.products == 1 and report.out_dir is not None
    late = f"download failed (not downloaded within the import's deadline ({FETCH_DEADLINE}=0.5 s))"
    assert reasons(report.skipped) == {3 + i: f"{late}: {url}" for i, url in enumerate(slow)}
    assert sum(image_server.hits[f"/slow/deadline-{i}.jpg"] for i in range(3)) == 1  # no retry, no queued download
