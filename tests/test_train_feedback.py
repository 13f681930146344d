"""Retraining from feedback on a real SQLite database with synthetic shoppers.

The synthetic world: catalogue features are a strong "nuisance" part (lighting, background:
shared across categories) plus a weaker category part. The current metric is fooled by the
nuisance, the shoppers like a result exactly when its category is the one they wanted, and
only their 👍/👎 tell the trainer so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from ffengine.catalog import Product
from ffengine.config import EngineSettings
from ffengine.db import Database, Origin
from ffengine.errors import IndexLoadError
from ffengine.images import load_image
from ffengine.index import Index, Reduction, write_index
from tests.conftest import make_image
from train.errors import TrainingError, TrainingLocked
from train.evaluation import Benchmark, LabelledPhotos
from train.feedback import FeedbackOptions, retrain_from_feedback, retrain_from_feedback_async
from train.lock import training_lock
from train.metric import MetricOptions
from train.versions import rollback

DIM = 1280
CATEGORIES = ("Shirts", "Jeans", "Dresses", "Caps")
FAST = FeedbackOptions(metric=MetricOptions(steps=60, batch=512))
NUISANCE = 1.0  # how loud lighting/background is next to the category
REPO = Path(__file__).resolve().parents[1]


class World:
    """A catalogue whose features mix a loud nuisance with a quiet category signal."""

    def __init__(self, seed: int = 0, n_products: int = 240) -> None:
        self.rng = np.random.default_rng(seed)
        self.category_dirs = self.rng.normal(size=(len(CATEGORIES), DIM)).astype(np.float32)
        self.nuisance_dirs = self.rng.normal(size=(6, DIM)).astype(np.float32) * NUISANCE
        cats = np.arange(n_products) % len(CATEGORIES)
        self.features = np.stack([self.sample(c) for c in cats])
        self.products = [
            Product(id=f"p{i}", title=f"product {i}", url=f"https://shop.example/p{i}", image=f"/catalogue/p{i}.jpg", category=CATEGORIES[c])
            for i, c in enumerate(cats)
        ]

    def sample(self, category: int) -> np.ndarray:
        nuisance = self.rng.normal(size=len(self.nuisance_dirs)) @ self.nuisance_dirs
        noise = self.rng.normal(size=DIM) * 0.3
        return np.abs(self.category_dirs[category] + nuisance + noise).astype(np.float32)  # like ReLU features

    def write(self, index_dir: Path) -> World:
        """Write the base index (32-d PCA of L2-normalised features, exact search) and keep it loaded."""
        write_index(
            index_dir, self.features, self.products, fingerprint="synthetic-fp", catalog_hash="synthetic", backend="exact",
            projection=Reduction(dims=32, normalize_input=True),
        )
        self.index = Index.load(index_dir)
        return self


def photos(world: World, index: Index, n: int, seed: int) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray, list[tuple[str, float]]]]:
    """``n`` shoppers' photos: (number, user, wanted category, query features, rows shown, (product id, distance) shown)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        wanted = int(rng.integers(0, len(CATEGORIES)))
        query = world.sample(wanted)
        dist, idx = index.search(query[None, :], 5)
        yield i, 1 + i % 7, wanted, query, idx[0], [(index.products[j].id, float(d)) for j, d in zip(idx[0], dist[0], strict=True)]


async def shoppers(db: Database, world: World, index: Index, version_id: int, n: int, seed: int = 1) -> None:
    """``n`` searches, each rated on all five results: 👍 when the category is the wanted one."""
    for i, user, wanted, query, rows, shown in photos(world, index, n, seed):
        record = await db.record_search(user, f"photo-{seed}-{i}", query, version_id, 5.0, "ok", shown)
        for rec_id, j in zip(record.recommendation_ids, rows, strict=True):
            await db.rate(user, rec_id, 1 if index.products[j].category == CATEGORIES[wanted] else -1)


def db_url(root: Path) -> str:
    return f"sqlite+aiosqlite:///{root / 'ff.db'}"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EngineSettings:
    """Paths relative to the test's own folder (the working directory), so a seeded folder can be copied."""
    monkeypatch.delenv("FFENGINE_EVAL_QUERIES", raising=False)
    monkeypatch.chdir(tmp_path)
    return EngineSettings(weights="IMAGENET1K_V2", index_dir=Path("data/index"), device="cpu", data_dir=Path("data"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, World]:
    """Once per module: a base index and a database where 150 shoppers rated all their results."""
    root = tmp_path_factory.mktemp("feedback-template")
    world = World().write(root / "data" / "index")

    async def seed() -> None:
        db = await Database.open(db_url(root))
        try:
            base = await db.create_model_version("base", "IMAGENET1K_V2", "data/index", activate=True)
            await shoppers(db, world, world.index, base.id, n=150)
        finally:
            await db.close()

    asyncio.run(seed())
    return root, world


@pytest.fixture
def seeded(template: tuple[Path, World], settings: EngineSettings, tmp_path: Path) -> World:
    """This test's copy of the template (index + database with base and 150 rated searches)."""
    shutil.copytree(template[0], tmp_path, dirs_exist_ok=True)
    return template[1]


@pytest.fixture
async def sdb(seeded: World, tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(db_url(tmp_path))
    yield database
    await database.close()


@pytest.fixture
def world(settings: EngineSettings, tmp_path: Path) -> World:
    """A fresh index and no feedback yet."""
    return World().write(tmp_path / "data" / "index")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(db_url(tmp_path))
    yield database
    await database.close()


async def base_version(db: Database, settings: EngineSettings) -> int:
    version = await db.create_model_version("base", settings.weights, str(settings.index_dir), activate=True)
    return version.id


@dataclass(frozen=True)
class SeenItem:
    """An item the engine saw in an outfit photo (shaped like ``ffengine.items.Item``)."""

    category: str
    probability: float = 0.5
    box: tuple[int, int, int, int] = (0, 0, 10, 10)


async def outfit_shoppers(db: Database, world: World, index: Index, version_id: int, n: int, seed: int = 4) -> list[tuple[int, int, int]]:
    """``n`` outfit photos (every category seen in each) whose shoppers only ever press 👎, on results of
    a category they did not want; returns (user, photo search, wanted item) for each."""
    seen = [SeenItem(c) for c in CATEGORIES]
    searches = []
    for i, user, wanted, query, rows, shown in photos(world, index, n, seed):
        record = await db.record_search(user, f"outfit-{seed}-{i}", query, version_id, 5.0, "ok", shown, file_id=f"file-{i}", items=seen)
        for rec_id, j in zip(record.recommendation_ids, rows, strict=True):
            if index.products[j].category != CATEGORIES[wanted]:
                await db.rate(user, rec_id, -1)
        searches.append((user, record.search_id, wanted))
    return searches


async def test_a_chosen_item_is_the_like_the_retraining_learns_from(db: Database, settings: EngineSettings, world: World) -> None:
    """Shoppers who never press 👍 but pick the item they meant: without the picks there is nothing to
    learn (no liked product), with them the taste is learnt and the new version promoted."""
    base = await base_version(db, settings)
    await db.upsert_products(world.products)  # the catalogue's categories, as the bot stores them
    searches = await outfit_shoppers(db, world, world.index, base, n=150)
    before = await retrain_from_feedback_async(db, settings, options=FAST)
    assert before.status == "insufficient" and (before.metrics["likes"], before.metrics["pairs"], before.metrics["chosen_item_likes"]) == (0, 0, 0)

    for user, search_id, wanted in searches:
        await db.record_search(user, None, world.sample(wanted), base, 5.0, "ok", [], origin=Origin.item(search_id, wanted))
    exported = await db.export_feedback(rated_only=True)
    implied = [i for s in exported for i in s.items if i.implicit]
    assert implied and all(i.rating == 1 for i in implied)
    category = {p.id: p.category for p in world.products}
    wanted_of = {search_id: CATEGORIES[wanted] for _, search_id, wanted in searches}
    assert all(category[i.product_id] == wanted_of[s.search_id] for s in exported for i in s.items if i.implicit)

    after = await retrain_from_feedback_async(db, settings, options=FAST)
    assert after.metrics["likes"] == after.metrics["chosen_item_likes"] == len(implied) and after.metrics["pairs"] >= FAST.min_pairs
    assert after.status == "promoted", after.reason
    assert after.metrics["holdout_pairwise_after"] > after.metrics["holdout_pairwise_before"]


async def test_too_little_feedback_stops_with_what_is_needed(db: Database, settings: EngineSettings, world: World) -> None:
    base = await base_version(db, settings)
    await shoppers(db, world, world.index, base, n=8)
    result = await retrain_from_feedback_async(db, settings, options=FAST)
    assert result.status == "insufficient" and not result.promoted and result.version is None
    assert "Not enough feedback" in result.reason and f"at least {FAST.min_searches} rated searches" in result.reason
    assert result.metrics["searches"] == 8
    assert [v.name for v in await db.list_model_versions()] == ["base"]
    assert not settings.models_dir.exists() or not any(settings.models_dir.iterdir())
    run = (await db.list_training_runs())[0]
    assert run.status == "rejected" and "Not enough feedback" in run.log


async def test_enough_feedback_makes_a_better_version_and_activates_it(sdb: Database, settings: EngineSettings, seeded: World) -> None:
    db, world = sdb, seeded
    base = (await db.get_model_version("base")).id  # type: ignore[union-attr]
    seen: list[tuple[float, str]] = []
    result = await retrain_from_feedback_async(db, settings, options=FAST, progress=lambda f, t: seen.append((f, t)))
    m = result.metrics
    assert result.status == "promoted", result.reason
    assert m["holdout_pairwise_after"] > m["holdout_pairwise_before"] + 0.05  # the taste was learnt
    assert m["holdout_searches"] == 30 and m["train_searches"] == 120
    active = await db.active_model_version()
    assert active is not None and active.name == result.version and active.parent_id == base
    assert active.weights == settings.weights  # same backbone: only the projection changed
    new = Index.load(Path(active.index_dir), expect_fingerprint="synthetic-fp")
    old = world.index
    assert np.array_equal(new.features, old.features)  # re-projected from stored features, no image read
    assert new.projection.matrix.shape == old.projection.matrix.shape
    assert not np.allclose(new.projection.matrix, old.projection.matrix)
    assert (settings.models_dir / result.version / "metrics.json").is_file()
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    run = (await db.list_training_runs())[0]
    assert run.status == "succeeded" and run.model_version_id == active.id and run.progress == 1.0

    # a second retrain builds on the first (composes with its projection) and the feedback accumulates
    await shoppers(db, world, new, active.id, n=40, seed=2)
    second = await retrain_from_feedback_async(db, settings, options=FAST)
    assert second.metrics["searches"] == 190 and second.version != result.version
    child = await db.get_model_version(second.version)  # type: ignore[arg-type]
    assert child is not None and child.parent_id == active.id


async def test_a_worse_model_is_registered_but_not_activated(sdb: Database, settings: EngineSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    db = sdb
    # shoppers whose taste flips between the old searches and the newest (held-out) ones:
    # whatever is learnt from the old ones is wrong on the new ones
    await flip_taste_of_newest(db, share=0.2)
    monkeypatch.delenv("TRAIN_KEEP_REJECTED", raising=False)
    result = await retrain_from_feedback_async(db, settings, options=FAST)
    assert result.status == "rejected" and "kept base" in result.reason
    assert (await db.active_model_version()).name == "base"  # type: ignore[union-attr]
    version = await db.get_model_version(result.version)  # type: ignore[arg-type]
    assert version is not None and version.notes.startswith("rejected")  # type: ignore[union-attr]
    assert version.metrics["holdout_pairwise_after"] < version.metrics["holdout_pairwise_before"]  # type: ignore[index]
    run = (await db.list_training_runs())[0]
    assert run.status == "rejected" and f"removed the files of {result.version}" in run.log
    assert not (settings.models_dir / result.version).exists()  # type: ignore[operator]  # its metrics are in the database

    monkeypatch.setenv("TRAIN_KEEP_REJECTED", "1")
    kept = await retrain_from_feedback_async(db, settings, options=FAST)
    assert kept.status == "rejected"
    Index.load(settings.models_dir / kept.version / "index", expect_fingerprint="synthetic-fp")  # type: ignore[operator]


async def test_a_malformed_keep_rejected_setting_stops_the_run_before_it_starts(sdb: Database, settings: EngineSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    from ffengine.errors import ConfigError

    monkeypatch.setenv("TRAIN_KEEP_REJECTED", "maybe")
    with pytest.raises(ConfigError, match="TRAIN_KEEP_REJECTED must be 1 or 0"):
        await retrain_from_feedback_async(sdb, settings, options=FAST)
    assert await sdb.list_training_runs() == []


async def flip_taste_of_newest(db: Database, share: float) -> None:
    searches = await db.export_feedback(rated_only=True)
    for s in searches[int(len(searches) * (1 - share)) :]:
        for item in s.items:
            await db.rate(s.user_id, item.recommendation_id, -item.rating)  # type: ignore[operator]


async def test_a_run_failing_midway_leaves_the_active_version_untouched(
    sdb: Database, settings: EngineSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = sdb
    import train.feedback

    def disk_full(folder: Path, *args: object) -> None:
        (folder / "index").mkdir(parents=True)
        (folder / "index" / "features.npy").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    real_write = train.feedback._write_version
    monkeypatch.setattr(train.feedback, "_write_version", disk_full)
    with pytest.raises(OSError, match="No space"):
        await retrain_from_feedback_async(db, settings, options=FAST)
    assert (await db.active_model_version()).name == "base"  # type: ignore[union-attr]
    assert [v.name for v in await db.list_model_versions()] == ["base"]
    assert not any(settings.models_dir.iterdir())  # the half-written folder is gone
    run = (await db.list_training_runs())[0]
    assert run.status == "failed" and "No space left" in run.log
    Index.load(settings.index_dir, expect_fingerprint="synthetic-fp")  # the live index is intact

    monkeypatch.setattr(train.feedback, "_write_version", real_write)  # and the next run works
    assert (await retrain_from_feedback_async(db, settings, options=FAST)).promoted


async def test_a_killed_run_leaves_everything_usable(tmp_path: Path, settings: EngineSettings, seeded: World) -> None:
    url = db_url(tmp_path)
    marker = tmp_path / "learning"
    script = textwrap.dedent(
        f"""
        import pathlib, time
        from ffengine.config import EngineSettings
        from train.feedback import retrain_from_feedback
        def progress(fraction, text):
            if text.startswith("learning"):
                pathlib.Path({str(marker)!r}).write_text("x")
                time.sleep(120)  # killed here, in the middle of training
        settings = EngineSettings(weights="IMAGENET1K_V2", index_dir=pathlib.Path("data/index"), device="cpu", data_dir=pathlib.Path("data"))
        retrain_from_feedback({url!r}, settings, progress=progress)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for _ in range(600):
            if marker.exists() or child.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert marker.exists(), "the child never reached training"
        with pytest.raises(TrainingLocked, match=f"pid {child.pid}"):
            with training_lock(settings.data_dir, "feedback"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    db = await Database.open(url)
    try:
        assert (await db.active_model_version()).name == "base"  # type: ignore[union-attr]
        assert (await db.list_training_runs())[0].status == "running"  # the dead process could not close it
        result = await retrain_from_feedback_async(db, settings, options=FAST)  # takes over the lock
        assert result.promoted
        runs = await db.list_training_runs()
        assert [r.status for r in runs] == ["succeeded", "failed"] and "died" in runs[1].log
    finally:
        await db.close()


async def test_start_up_closes_a_killed_run_and_removes_its_half_written_index(sdb: Database, settings: EngineSettings) -> None:
    """What a run killed while writing its index leaves: a ``running`` row and ``models/<name>/index.tmp-*``."""
    from train.runs import recover_interrupted

    db = sdb
    killed = await db.start_training_run("feedback", {}, progress_message={"chat_id": 5, "message_id": 9})
    await db.update_training_run(killed, progress=0.9, log_line="writing the index of feedback-x")
    half = settings.models_dir / "feedback-x" / "index.tmp-abc123"
    half.mkdir(parents=True)
    (half / "features.npy").write_bytes(bytes(1024))
    kept = settings.models_dir / "feedback-kept" / "index"
    kept.mkdir(parents=True)  # a finished version's index is not a leftover

    with training_lock(settings.data_dir, "feedback"):  # a live run elsewhere: nothing is touched
        assert await recover_interrupted(db, settings) == []
    assert half.is_dir() and (await db.list_training_runs(1))[0].status == "running"

    [closed] = await recover_interrupted(db, settings)
    assert (closed.id, closed.status, closed.progress) == (killed, "failed", 0.9)
    assert closed.progress_message == {"chat_id": 5, "message_id": 9} and "died" in closed.log
    assert not (settings.models_dir / "feedback-x").exists() and kept.is_dir()
    assert await recover_interrupted(db, settings) == []


async def test_the_lock_refuses_a_second_run_and_records_nothing(sdb: Database, settings: EngineSettings) -> None:
    db = sdb
    with training_lock(settings.data_dir, "finetune"):
        with pytest.raises(TrainingLocked, match="a finetune run"):
            await retrain_from_feedback_async(db, settings, options=FAST)
    assert await db.list_training_runs() == []


async def test_rollback_switches_back_and_refuses_broken_versions(sdb: Database, settings: EngineSettings) -> None:
    db = sdb
    result = await retrain_from_feedback_async(db, settings, options=FAST)
    assert (await db.active_model_version()).name == result.version  # type: ignore[union-attr]

    assert (await rollback(db, "base")).name == "base"
    assert (await db.active_model_version()).name == "base"  # type: ignore[union-attr]
    assert (await rollback(db, result.version)).active  # type: ignore[arg-type]

    with pytest.raises(TrainingError, match="no model version 'nope'"):
        await rollback(db, "nope")
    (settings.index_dir / "features.npy").write_bytes(b"broken")
    with pytest.raises(IndexLoadError, match="corrupt"):
        await rollback(db, "base")
    assert (await db.active_model_version()).name == result.version  # type: ignore[union-attr]


async def test_feedback_from_another_backbone_is_left_out(db: Database, settings: EngineSettings, world: World) -> None:
    base = await base_version(db, settings)
    other = await db.create_model_version("finetuned", "/models/other.pth", str(settings.index_dir))
    await shoppers(db, world, world.index, other.id, n=45)
    await shoppers(db, world, world.index, base, n=5, seed=3)
    result = await retrain_from_feedback_async(db, settings, options=FAST)
    assert result.status == "insufficient" and result.metrics["searches"] == 5


def test_blocking_variant_runs_in_a_worker_thread(tmp_path: Path, settings: EngineSettings, seeded: World) -> None:
    url = db_url(tmp_path)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(retrain_from_feedback, url, settings, options=replace(FAST, name="from-thread")).result()
    assert result.promoted and result.version == "from-thread" and result.run_id is not None


def test_the_benchmark_drops_unreadable_photos_and_keeps_labels_aligned(random_embedder, tmp_path: Path) -> None:
    good = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for seed, path in enumerate(good):
        path.write_bytes(make_image(seed))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a photo")
    cmap = {"shirt": frozenset({"Shirts"}), "cap": frozenset({"Caps"}), "dress": frozenset({"Dresses"})}
    photos = LabelledPhotos([good[0], bad, good[1]], ["shirt", "cap", "dress"], cmap)
    bench = Benchmark.prepare(photos, random_embedder, tmp_path / "cache")
    assert bench.photos.paths == good and bench.photos.labels == ["shirt", "dress"]
    np.testing.assert_allclose(bench.feats, random_embedder.embed([load_image(p) for p in good]), rtol=1e-4, atol=1e-4)
    with pytest.raises(TrainingError, match="none of the labelled photos could be read"):
        Benchmark.prepare(LabelledPhotos([bad], ["cap"], cmap), random_embedder, None)
