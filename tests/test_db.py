"""ffengine.db on real SQLite files: the search log, ratings, privacy, stats and export.

Row counts are checked through a separate plain ``sqlite3`` connection to the file, so
a test sees what is really on disk, not what the session believes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from ffengine.db import UNVERSIONED, Database, Erased, FeedbackRefused, FeedbackSearch
from ffengine.db.models import EMBEDDING_BYTES, EMBEDDING_DIM

ALICE, BOB = 111_222_333, 444_555_666


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ff.db"


@pytest.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(f"sqlite+aiosqlite:///{db_path}")
    yield database
    await database.close()


@pytest.fixture
def count(db_path: Path) -> Callable[..., int]:
    """Rows on disk: ``count("feedback")`` or ``count("feedback", "value = ?", 1)``."""

    def rows(table: str, where: str = "1 = 1", *params: object) -> int:
        with sqlite3.connect(db_path) as conn:
            return conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]

    return rows


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(EMBEDDING_DIM).astype(np.float32)


def five(prefix: str = "p") -> list[tuple[str, float]]:
    return [(f"{prefix}{rank}", 0.1 * rank) for rank in range(1, 6)]


async def search(db: Database, user: int, seed: int = 0, **overrides: object):
    args: dict[str, object] = {
        "user_id": user,
        "file_unique_id": f"AQAD{seed}",
        "embedding": vector(seed),
        "model_version_id": None,
        "latency_ms": 100.0 + seed,
        "outcome": "ok",
        "results": five(),
    }
    args.update(overrides)
    return await db.record_search(**args)  # type: ignore[arg-type]


# --- the search log -------------------------------------------------------------------


async def test_record_search_keeps_results_in_rank_order(db: Database, db_path: Path, count) -> None:
    results = [("shirt-9", 0.05), ("shirt-2", 0.25), ("dress-7", 0.5)]
    record = await search(db, ALICE, results=results)
    assert len(record.recommendation_ids) == 3
    with sqlite3.connect(db_path) as conn:
        on_disk = conn.execute(
            "SELECT id, rank, product_id, distance FROM recommendations WHERE search_id = ? ORDER BY rank",
            (record.search_id,),
        ).fetchall()
    assert on_disk == [(record.recommendation_ids[0], 1, "shirt-9", 0.05), (record.recommendation_ids[1], 2, "shirt-2", 0.25), (record.recommendation_ids[2], 3, "dress-7", 0.5)]
    assert count("users", "id = ?", ALICE) == 1  # created although touch_user was never called


async def test_failed_search_is_logged_without_results(db: Database, count) -> None:
    record = await search(db, ALICE, embedding=None, outcome="not_image", results=[], file_unique_id=None)
    assert record.recommendation_ids == []
    assert count("searches", "outcome = 'not_image' AND embedding IS NULL") == 1


async def test_embedding_is_stored_as_float32_bytes_and_read_back_exactly(db: Database, db_path: Path) -> None:
    original = vector(3)
    await search(db, ALICE, embedding=original.astype(np.float64)[None, :])  # (1, 1280) float64 is accepted
    with sqlite3.connect(db_path) as conn:
        (blob,) = conn.execute("SELECT embedding FROM searches").fetchone()
    assert len(blob) == EMBEDDING_BYTES
    assert np.array_equal(np.frombuffer(blob, dtype="<f4"), original)
    (exported,) = await db.export_feedback()
    assert exported.embedding.dtype == np.float32 and exported.embedding.shape == (EMBEDDING_DIM,)
    assert np.array_equal(exported.embedding, original)
    exported.embedding[0] = 1.0  # a fresh, writable array


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embedding": np.zeros(512, np.float32)}, "shape"),
        ({"embedding": np.zeros((2, 640), np.float32)}, "shape"),
        ({"embedding": np.full(EMBEDDING_DIM, np.nan, np.float32)}, "NaN"),
        ({"latency_ms": -1.0}, "latency_ms"),
        ({"latency_ms": float("inf")}, "latency_ms"),
        ({"outcome": ""}, "outcome"),
        ({"results": [("", 0.1)]}, "product id"),
        ({"results": [("p1", float("nan"))]}, "distance"),
        ({"user_id": -5}, "user_id"),
        ({"user_id": "111"}, "user_id"),
    ],
)
async def test_bad_search_input_is_refused_and_writes_nothing(db: Database, count, overrides, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        await search(db, ALICE, **overrides)
    assert count("searches") == 0 and count("users") == 0


async def test_timestamps_are_utc_aware(db: Database) -> None:
    before = datetime.now(UTC)
    await db.touch_user(ALICE, "de")
    await search(db, ALICE)
    summary = await db.user_summary(ALICE)
    (exported,) = await db.export_feedback()
    for stamp in (summary.first_seen, summary.last_seen, exported.created_at):
        assert stamp is not None and stamp.tzinfo is not None
        assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


async def test_touch_user_updates_last_seen_and_language(db: Database) -> None:
    await db.touch_user(ALICE, "en")
    first = await db.user_summary(ALICE)
    await db.touch_user(ALICE, None)  # unknown language keeps the old one
    second = await db.user_summary(ALICE)
    await db.touch_user(ALICE, "uk")
    third = await db.user_summary(ALICE)
    assert (first.language, second.language, third.language) == ("en", "en", "uk")
    assert first.first_seen == third.first_seen
    assert first.last_seen <= second.last_seen <= third.last_seen  # type: ignore[operator]


# --- ratings ----------------------------------------------------------------------------


async def test_same_button_twice_records_one_rating_and_the_other_changes_it(db: Database, count) -> None:
    record = await search(db, ALICE)
    rec = record.recommendation_ids[1]
    first = await db.rate(ALICE, rec, 1)
    again = await db.rate(ALICE, rec, 1)
    flipped = await db.rate(ALICE, rec, -1)
    assert (first.changed, first.previous, first.value) == (True, None, 1)
    assert (again.changed, again.previous, again.value) == (False, 1, 1)
    assert (flipped.changed, flipped.previous, flipped.value) == (True, 1, -1)
    assert first.search_id == record.search_id
    assert count("feedback") == 1 and count("feedback", "value = -1") == 1
    assert await db.ratings_for_search(ALICE, record.search_id) == {rec: -1}


async def test_rating_updates_keep_created_and_move_updated(db: Database, db_path: Path) -> None:
    record = await search(db, ALICE)
    await db.rate(ALICE, record.recommendation_ids[0], 1)
    await db.rate(ALICE, record.recommendation_ids[0], -1)
    with sqlite3.connect(db_path) as conn:
        created, updated = conn.execute("SELECT created_at, updated_at FROM feedback").fetchone()
    assert updated > created


async def test_rating_someone_elses_recommendation_is_refused(db: Database, count) -> None:
    record = await search(db, ALICE)
    with pytest.raises(FeedbackRefused) as refused:
        await db.rate(BOB, record.recommendation_ids[0], 1)
    assert refused.value.reason == "not_yours" and "you" in str(refused.value)
    assert count("feedback") == 0
    assert count("users", "id = ?", BOB) == 0  # a refused press leaves no trace


@pytest.mark.parametrize(
    "recommendation_id, value, reason",
    [
        (999_999, 1, "not_found"),
        ("1", 1, "not_found"),  # callback data is never trusted to be an int
        (None, 1, "not_found"),
        (1, 0, "bad_value"),
        (1, 2, "bad_value"),
        (1, True, "bad_value"),
        (1, "1", "bad_value"),
    ],
)
async def test_malformed_ratings_are_refused(db: Database, count, recommendation_id, value, reason) -> None:
    await search(db, ALICE)
    with pytest.raises(FeedbackRefused) as refused:
        await db.rate(ALICE, recommendation_id, value)
    assert refused.value.reason == reason
    assert count("feedback") == 0


async def test_ratings_for_search_is_per_user_and_per_search(db: Database) -> None:
    a1, a2 = await search(db, ALICE, 1), await search(db, ALICE, 2)
    await db.rate(ALICE, a1.recommendation_ids[0], 1)
    await db.rate(ALICE, a1.recommendation_ids[4], -1)
    await db.rate(ALICE, a2.recommendation_ids[2], 1)
    assert await db.ratings_for_search(ALICE, a1.search_id) == {
        a1.recommendation_ids[0]: 1,
        a1.recommendation_ids[4]: -1,
    }
    assert await db.ratings_for_search(BOB, a1.search_id) == {}


async def test_the_database_itself_rejects_impossible_rows(db: Database) -> None:
    """Constraints hold even for SQL that bypasses the query layer (foreign keys are on)."""
    record = await search(db, ALICE)
    bad = [
        f"INSERT INTO feedback (user_id, recommendation_id, value, created_at, updated_at) "
        f"VALUES ({ALICE}, {record.recommendation_ids[0]}, 2, '2026-01-01', '2026-01-01')",
        "INSERT INTO searches (user_id, created_at, latency_ms, outcome) VALUES (424242, '2026-01-01', 1, 'ok')",
        f"INSERT INTO recommendations (search_id, rank, product_id, distance) VALUES ({record.search_id}, 1, 'x', 0)",
        f"INSERT INTO searches (user_id, created_at, latency_ms, outcome, embedding) "
        f"VALUES ({ALICE}, '2026-01-01', 1, 'ok', x'00')",
    ]
    for statement in bad:
        with pytest.raises(IntegrityError):
            async with db._engine.begin() as conn:
                await conn.exec_driver_sql(statement)


# --- stats and export -----------------------------------------------------------------------


async def test_stats_counts_rates_and_latency(db: Database) -> None:
    base = await db.create_model_version("base", "IMAGENET1K_V2", "data/index")
    tuned = await db.create_model_version(
        "tuned", "data/models/tuned/weights.pth", "data/models/tuned/index", activate=True
    )
    latencies = [40.0, 55.0, 70.0, 90.0, 300.0]
    ok = [await search(db, ALICE, i, latency_ms=ms, model_version_id=base.id) for i, ms in enumerate(latencies[:3])]
    ok += [
        await search(db, BOB, 10 + i, latency_ms=ms, model_version_id=tuned.id) for i, ms in enumerate(latencies[3:])
    ]
    ok.append(await search(db, BOB, 20, latency_ms=65.0))  # answered without a model version
    latencies.append(65.0)
    await search(db, BOB, 30, outcome="timeout", latency_ms=30_000.0, results=[], embedding=None)
    # base: 2 likes 1 dislike; tuned: 3 likes; unversioned: 1 dislike
    await db.rate(ALICE, ok[0].recommendation_ids[0], 1)
    await db.rate(ALICE, ok[0].recommendation_ids[1], -1)
    await db.rate(ALICE, ok[1].recommendation_ids[0], 1)
    for rec in ok[3].recommendation_ids[:2] + ok[4].recommendation_ids[:1]:
        await db.rate(BOB, rec, 1)
    await db.rate(BOB, ok[5].recommendation_ids[0], -1)

    stats = await db.stats()
    assert (stats.users, stats.searches, stats.searches_ok) == (2, 7, 6)
    assert (stats.ratings, stats.likes, stats.dislikes) == (7, 5, 2)
    assert stats.like_rate["base"].ratings == 3 and stats.like_rate["base"].rate == pytest.approx(2 / 3)
    assert stats.like_rate["tuned"].ratings == 3 and stats.like_rate["tuned"].rate == 1.0
    assert stats.like_rate[UNVERSIONED].ratings == 1 and stats.like_rate[UNVERSIONED].rate == 0.0
    assert stats.latency_p50_ms == pytest.approx(np.percentile(latencies, 50))  # the timeout is not a latency
    assert stats.latency_p95_ms == pytest.approx(np.percentile(latencies, 95))
    assert stats.active_model_version == "tuned"
    assert stats.products == 0


async def test_stats_of_an_empty_database(db: Database) -> None:
    stats = await db.stats()
    assert (stats.users, stats.searches, stats.ratings, stats.like_rate) == (0, 0, 0, {})
    assert stats.latency_p50_ms is None and stats.active_model_version is None


async def test_export_feedback_pages_and_filters(db: Database) -> None:
    searches = [await search(db, ALICE if i % 2 else BOB, i) for i in range(6)]
    await search(db, ALICE, 99, embedding=None)  # no embedding: never exported
    await db.rate(BOB, searches[0].recommendation_ids[2], -1)
    await db.rate(ALICE, searches[3].recommendation_ids[0], 1)

    everything = await db.export_feedback()
    assert [s.search_id for s in everything] == [s.search_id for s in searches]
    first: FeedbackSearch = everything[0]
    assert first.user_id == BOB and [i.rank for i in first.items] == [1, 2, 3, 4, 5]
    assert [i.rating for i in first.items] == [None, None, -1, None, None]
    assert [i.product_id for i in first.items] == [p for p, _ in five()]
    assert np.array_equal(first.embedding, vector(0))

    rated = await db.export_feedback(rated_only=True)
    assert [s.search_id for s in rated] == [searches[0].search_id, searches[3].search_id]
    page = await db.export_feedback(since_id=searches[1].search_id, limit=2)
    assert [s.search_id for s in page] == [searches[2].search_id, searches[3].search_id]
    assert await db.export_feedback(since_id=searches[-1].search_id) == []


async def test_real_embedding_round_trips_through_the_log(db: Database, random_embedder, image_bytes) -> None:
    """What the embedder makes is exactly what the retraining reads back."""
    from ffengine.embedder import FEATURE_DIM
    from ffengine.images import load_image

    assert FEATURE_DIM == EMBEDDING_DIM
    feats = random_embedder.embed([load_image(image_bytes(seed)) for seed in (1, 2)])
    for row in feats:
        await search(db, ALICE, embedding=row)
    exported = await db.export_feedback()
    assert np.array_equal(np.stack([s.embedding for s in exported]), feats)


# --- privacy ---------------------------------------------------------------------------------


async def test_user_summary_shows_what_is_kept(db: Database) -> None:
    await db.touch_user(ALICE, "fr")
    one = await search(db, ALICE, 1)
    await search(db, ALICE, 2, embedding=None, outcome="not_image", results=[])
    await db.rate(ALICE, one.recommendation_ids[0], 1)
    await db.rate(ALICE, one.recommendation_ids[1], -1)
    await db.rate(ALICE, one.recommendation_ids[2], -1)
    summary = await db.user_summary(ALICE)
    assert summary.known and summary.language == "fr"
    assert (summary.searches, summary.searches_with_embedding, summary.recommendations) == (2, 1, 5)
    assert (summary.ratings, summary.likes, summary.dislikes) == (3, 1, 2)
    nobody = await db.user_summary(BOB)
    assert not nobody.known and nobody.searches == 0 and nobody.first_seen is None


async def test_forget_user_erases_everything_about_them_and_nothing_else(db: Database, db_path: Path, count) -> None:
    await db.touch_user(ALICE, "en")
    alice = [await search(db, ALICE, i, file_unique_id=f"alice-photo-{i}") for i in range(3)]
    bob = await search(db, BOB, 7)
    for rec in alice[0].recommendation_ids + alice[2].recommendation_ids[:2]:
        await db.rate(ALICE, rec, 1)
    await db.rate(BOB, bob.recommendation_ids[0], -1)

    deleted = await db.forget_user(ALICE)
    assert deleted == 1 + 3 + 15 + 7  # user, searches, recommendations, ratings
    with sqlite3.connect(db_path) as conn:
        dump = "\n".join(conn.iterdump())
    assert str(ALICE) not in dump and "alice-photo" not in dump
    assert count("users") == 1 and count("searches") == 1 and count("recommendations") == 5 and count("feedback") == 1
    assert await db.ratings_for_search(BOB, bob.search_id) == {bob.recommendation_ids[0]: -1}
    assert not (await db.user_summary(ALICE)).known
    assert await db.forget_user(ALICE) == 0


async def test_a_search_of_an_update_before_the_forget_is_refused_after_it(db: Database, count) -> None:
    await search(db, ALICE, 1, update_id=100)
    assert await db.forget_user(ALICE, update_id=120) == 1 + 1 + 5
    assert await db.forget_user(ALICE, update_id=110) == 0  # an older /forget delivered late keeps the newer mark
    with pytest.raises(Erased):
        await search(db, ALICE, 2, update_id=119)  # received before the /forget, logged after it (another replica)
    assert count("users") == 0 and count("searches") == 0  # nothing of it, not even the user row
    await search(db, ALICE, 3, update_id=121)  # sent after the /forget: kept
    await search(db, BOB, 4, update_id=99)  # someone else: kept
    assert count("searches") == 2 and count("erasures") == 1
    assert await db.prune_replicas_and_updates(older_than=timedelta(0)) == 1  # the note goes with the update claims
    assert count("erasures") == 0


async def test_a_forget_before_any_search_still_refuses_an_earlier_updates_search(db: Database, count) -> None:
    assert await db.forget_user(BOB, update_id=50) == 0  # nothing kept yet; the note is all
    with pytest.raises(Erased):
        await search(db, BOB, 1, update_id=49)
    assert count("users") == 0 and count("searches") == 0


async def test_no_column_can_hold_a_photo(db_path: Path, db: Database) -> None:
    """Only the Telegram file_unique_id and the 5120-byte embedding describe a user's photo."""
    with sqlite3.connect(db_path) as conn:
        columns = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(searches)")}
        blobs = [
            (table, row[1])
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            for row in conn.execute(f"PRAGMA table_info({table})")
            if row[2].upper() == "BLOB"
        ]
    assert "embedding" in columns and blobs == [("searches", "embedding")]
    with pytest.raises(ValueError):
        await search(db, ALICE, embedding=np.zeros(EMBEDDING_DIM * 4, np.float32))  # no smuggling bytes in


async def test_heartbeats_and_update_claims(db: Database) -> None:
    """One claim per update; only an unfinished claim of the named replica can be taken over; old rows go."""
    base = await db.create_model_version("base", "w", "i", activate=True)
    await db.heartbeat("bot-1", base.id)
    await db.heartbeat("bot-2", None)
    await db.heartbeat("bot-1", base.id)  # an upsert, not a second row
    assert [(r.name, r.model_version) for r in await db.list_replicas()] == [("bot-1", "base"), ("bot-2", None)]
    assert await db.list_replicas(timedelta(0)) == []  # nobody seen within no time at all
    claim = await db.claim_update(7, "bot-1")
    assert claim.mine and not claim.finished
    again = await db.claim_update(7, "bot-2")
    assert (again.mine, again.replica, again.finished) == (False, "bot-1", False)
    assert not await db.take_over_update(7, "bot-2", "bot-3")  # not the claimer
    assert await db.take_over_update(7, "bot-2", "bot-1")
    await db.finish_update(7)
    assert not await db.take_over_update(7, "bot-3", "bot-2")  # finished: nothing to take over
    assert (await db.claim_update(7, "bot-3")).finished
    await db.forget_replica("bot-2")
    assert await db.replica_last_seen("bot-2") is None and await db.replica_last_seen("bot-1") is not None
    assert await db.prune_replicas_and_updates() == 0
    assert await db.prune_replicas_and_updates(timedelta(0)) == 2  # the claim and bot-1's heartbeat
    with pytest.raises(ValueError, match="update_id"):
        await db.claim_update(-1, "bot-1")
