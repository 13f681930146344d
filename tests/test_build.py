"""Catalogue -> features -> index: skipped rows, remote images, the embedding cache, real data."""

from __future__ import annotations

import asyncio
import csv
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ffengine.build import BuildReport, aembed_catalog, build_index, catalog_hash, colour_cache_name, embed_catalog
from ffengine.cache import EmbeddingCache, content_hash, fingerprint_dir_name
from ffengine.catalog import read_catalog
from ffengine.embedder import Embedder
from ffengine.errors import CatalogError
from ffengine.fetch import FetchSettings
from ffengine.images import load_image
from tests.conftest import make_image
from tests.test_fetch import FAST, GOOD, ImageServer, image_server  # noqa: F401  (fixture)

FIELDS = ["id", "title", "url", "image", "category"]


def write_catalog(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(pid: str, image: str, title: str | None = None) -> dict[str, str]:
    return {"id": pid, "title": title or f"Product {pid}", "url": f"https://shop.example/{pid}", "image": image, "category": "Shirts"}


def make_shop(root: Path, n: int, *, first_seed: int = 0) -> Path:
    """``n`` distinct generated photos under ``root/images`` and a CSV naming them relatively."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (root / "images" / f"{i}.jpg").write_bytes(make_image(seed=first_seed + i, size=(60 + i, 80)))
        rows.append(row(f"p{i}", f"images/{i}.jpg"))
    return write_catalog(root / "products.csv", rows)


def reference(embedder: Embedder, paths: list[str]) -> np.ndarray:
    """The features one would get by embedding the files one by one."""
    return np.concatenate([embedder.embed([load_image(p)]) for p in paths])


class Renamed:
    """The same network under another fingerprint (what a fine-tuned model looks like to the cache)."""

    def __init__(self, inner: Embedder, fingerprint: str) -> None:
        self.inner = inner
        self.fingerprint = fingerprint
        self.dim = inner.dim
        self.preprocess = inner.preprocess
        self.calls = 0

    def prepare(self, images):  # type: ignore[no-untyped-def]
        return self.inner.prepare(images)

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.inner.embed_arrays(batch)


def test_bad_images_are_skipped_with_line_numbers_and_rows_stay_aligned(tmp_path: Path, random_embedder: Embedder) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"ok{i}.jpg").write_bytes(make_image(seed=i, size=(50 + 10 * i, 90)))
    (images / "notes.jpg").write_text("this is not a photo")
    (images / "cut.jpg").write_bytes(make_image(seed=9, size=(200, 260))[:700])
    (images / "empty.jpg").write_bytes(b"")
    rows = [
        row("a", "images/ok0.jpg"),  # line 2
        row("gone", "images/missing.jpg"),  # 3
        row("b", "images/ok1.jpg"),  # 4
        row("text", "images/notes.jpg"),  # 5
        {**row("", "images/ok2.jpg"), "id": ""},  # 6: bad row, reported by the reader
        row("cut", "images/cut.jpg"),  # 7
        row("c", "images/ok2.jpg"),  # 8
        row("nothing", "images/empty.jpg"),  # 9
        row("d", "images/ok3.jpg"),  # 10
        row("e", "images/ok4.jpg"),  # 11
        row("a", "images/ok4.jpg"),  # 12: duplicate id
    ]
    cat = write_catalog(tmp_path / "products.csv", rows)

    result = embed_catalog(cat, random_embedder, progress=False, batch_size=2, workers=2)

    assert [p.id for p in result.products] == ["a", "b", "c", "d", "e"]
    reasons = {p.line: (p.product_id, p.reason) for p in result.report.skipped}
    assert sorted(reasons) == [3, 5, 6, 7, 9, 12]
    assert reasons[3] == ("gone", f"image file not found: {images / 'missing.jpg'}")
    assert reasons[5] == ("text", f"not an image: {images / 'notes.jpg'}")
    assert reasons[6] == (None, "missing id")
    assert reasons[7][0] == "cut" and reasons[7][1] in (f"truncated image: {images / 'cut.jpg'}", f"damaged image: {images / 'cut.jpg'}")
    assert reasons[9] == ("nothing", f"image file is empty: {images / 'empty.jpg'}")
    assert reasons[12][1].startswith("duplicate id")
    report = result.report
    assert (report.products, report.embedded, report.cached) == (5, 5, 0)
    assert result.features.shape == (5, 1280) and result.features.dtype == np.float32 and result.features.flags.c_contiguous
    expected = reference(random_embedder, [p.image for p in result.products])
    np.testing.assert_allclose(result.features, expected, rtol=1e-4, atol=1e-4)
    assert result.image_hashes == [content_hash(Path(p.image).read_bytes()) for p in result.products]
    assert report.catalog_hash == catalog_hash(result.products, result.image_hashes)
    assert "5 products indexed (5 embedded, 0 from cache), 6 skipped" in report.summary()
    assert "skipped line 3 (id gone): image file not found" in report.summary()


def test_catalogue_whose_images_all_fail_is_an_error(tmp_path: Path, random_embedder: Embedder) -> None:
    cat = write_catalog(tmp_path / "p.csv", [row("a", "nope.jpg"), row("b", "nope2.jpg")])
    with pytest.raises(CatalogError, match=r"no usable product; 2 row\(s\) skipped: line 2 \(id a\): image file not found"):
        embed_catalog(cat, random_embedder, progress=False)


def test_cache_reuse_change_one_image_other_model_and_corrupt_entry(tmp_path: Path, random_embedder: Embedder) -> None:
    cat = make_shop(tmp_path / "shop", 6)
    cache_dir = tmp_path / "cache"

    first = embed_catalog(cat, random_embedder, cache_dir=cache_dir, progress=False, batch_size=4)
    assert (first.report.embedded, first.report.cached) == (6, 0)

    again = embed_catalog(cat, random_embedder, cache_dir=cache_dir, progress=False, batch_size=4)
    assert (again.report.embedded, again.report.cached) == (0, 6)
    np.testing.assert_array_equal(again.features, first.features)
    assert again.report.catalog_hash == first.report.catalog_hash

    (tmp_path / "shop" / "images" / "3.jpg").write_bytes(make_image(seed=99, size=(70, 90)))
    changed = embed_catalog(cat, random_embedder, cache_dir=cache_dir, progress=False, batch_size=4)
    assert (changed.report.embedded, changed.report.cached) == (1, 5)
    assert changed.report.catalog_hash != first.report.catalog_hash
    np.testing.assert_array_equal(np.delete(changed.features, 3, 0), np.delete(first.features, 3, 0))
    np.testing.assert_allclose(changed.features[3], reference(random_embedder, [changed.products[3].image])[0], rtol=1e-4, atol=1e-4)

    other = Renamed(random_embedder, "fine-tuned-0001")
    retrained = embed_catalog(cat, other, cache_dir=cache_dir, progress=False, batch_size=4)
    assert (retrained.report.embedded, retrained.report.cached) == (6, 0)
    assert retrained.report.fingerprint == "fine-tuned-0001" and other.calls == 2
    models = {"fine-tuned-0001", fingerprint_dir_name(random_embedder.fingerprint)}
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted({*models, colour_cache_name(random_embedder.preprocess)})  # colours: per preprocessing

    # A damaged entry is ignored, recomputed and repaired.
    cache = EmbeddingCache(cache_dir, random_embedder.fingerprint, random_embedder.dim)
    victim = cache.path(changed.image_hashes[0])
    victim.write_bytes(victim.read_bytes()[:60])
    repaired = embed_catalog(cat, random_embedder, cache_dir=cache_dir, progress=False)
    assert (repaired.report.embedded, repaired.report.cached) == (1, 5)
    np.testing.assert_array_equal(repaired.features, changed.features)
    np.testing.assert_array_equal(cache.get(changed.image_hashes[0]), changed.features[0])


def test_cache_ignores_every_kind_of_bad_entry(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "model-a", 4)
    good = np.arange(4, dtype=np.float32)
    digest = content_hash(b"photo")
    assert cache.get(digest) is None
    assert cache.put(digest, good)
    np.testing.assert_array_equal(cache.get(digest), good)
    assert len(cache) == 1 and not list(cache.root.rglob("*.tmp"))
    path = cache.path(digest)

    def bad(write: Callable[[Path], object]) -> None:
        write(path)
        assert cache.get(digest) is None

    bad(lambda p: p.write_bytes(b"garbage"))
    bad(lambda p: p.write_bytes(b""))
    bad(lambda p: np.save(p, good.astype(np.float64)))
    bad(lambda p: np.save(p, np.zeros(5, np.float32)))
    bad(lambda p: np.save(p, np.array([1, np.nan, 0, 0], np.float32)))
    bad(lambda p: np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True))  # never unpickled

    def npz(p: Path) -> None:  # an .npz archive under the .npy name
        with p.open("wb") as fh:
            np.savez(fh, a=good)

    bad(npz)
    assert cache.put(digest, good)  # overwritten in place
    np.testing.assert_array_equal(cache.get(digest), good)

    assert EmbeddingCache(tmp_path, "model-b", 4).get(digest) is None  # another model never sees it
    odd = EmbeddingCache(tmp_path, "../../etc/passwd", 4)
    assert odd.root.parent == tmp_path and odd.root.name.startswith("fp-")
    with pytest.raises(ValueError):
        cache.path("../../x")
    with pytest.raises(ValueError):
        cache.put(digest, np.zeros(3, np.float32))


def test_unwritable_cache_still_builds(tmp_path: Path, random_embedder: Embedder) -> None:
    cat = make_shop(tmp_path / "shop", 2)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    result = embed_catalog(cat, random_embedder, cache_dir=blocker, progress=False)
    assert (result.report.products, result.report.embedded) == (2, 2)


def test_remote_images_good_404_slow_text_big_and_flaky(tmp_path: Path, random_embedder: Embedder, image_server: ImageServer) -> None:
    u = image_server.url
    rows = [
        row("good", u("/good/b1.jpg")),  # line 2
        row("gone", u("/missing/b.jpg")),  # 3
        row("slow", u("/slow/b.jpg")),  # 4
        row("html", u("/text/b.jpg")),  # 5
        row("huge", u("/big/b.jpg")),  # 6
        row("flaky", u("/flaky/b.jpg")),  # 7
        row("local", "images/0.jpg"),  # 8
        row("signed", u("/missing/c.jpg?signature=SECRET")),  # 9: tokens stay out of reports
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.jpg").write_bytes(make_image(seed=5))
    cat = write_catalog(tmp_path / "remote.csv", rows)

    report = build_index(cat, tmp_path / "index", random_embedder, progress=False, fetch=FAST)

    assert isinstance(report, BuildReport)
    assert (report.products, report.embedded, report.downloaded) == (3, 3, 3)  # the HTML page downloads fine
    reasons = {p.line: p.reason for p in report.skipped}
    assert reasons == {
        3: f"download failed (HTTP 404 Not Found): {u('/missing/b.jpg')}",
        4: f"download failed (no complete answer within 0.5 s): {u('/slow/b.jpg')}",
        5: f"not an image: {u('/text/b.jpg')}",
        6: f"download failed (image too large (0.3 MiB; the limit is 0.2 MiB)): {u('/big/b.jpg')}",
        9: f"download failed (HTTP 404 Not Found): {u('/missing/c.jpg')}?...",
    }
    assert image_server.hits["/flaky/b.jpg"] == 2
    from ffengine.index import Index

    index = Index.load(tmp_path / "index", expect_fingerprint=random_embedder.fingerprint)
    assert [p.id for p in index.products] == ["good", "flaky", "local"]
    assert index.manifest["catalog_hash"] == report.catalog_hash
    np.testing.assert_allclose(index.features[0], index.features[1])  # both served the same photo
    np.testing.assert_allclose(index.features[0], random_embedder.embed([load_image(GOOD)])[0], rtol=1e-4, atol=1e-4)


def test_rebuilds_revalidate_remote_images_instead_of_downloading_them(tmp_path: Path, random_embedder: Embedder, image_server: ImageServer) -> None:
    from ffengine.index import Index

    names = [f"rebuild-{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        image_server.versions[name] = make_image(seed=40 + i)
    cat = write_catalog(tmp_path / "remote.csv", [row(f"r{i}", image_server.url(f"/versioned/{n}")) for i, n in enumerate(names)])

    def build(cache: Path | None = tmp_path / "cache") -> BuildReport:
        return build_index(cat, tmp_path / "index", random_embedder, cache_dir=cache, progress=False, fetch=FAST, backend="exact")

    def bodies_sent() -> list[int]:
        return [image_server.bodies_sent[f"/versioned/{n}"] for n in names]

    first = build()
    assert (first.downloaded, first.revalidated, first.embedded) == (3, 0, 3)
    assert (tmp_path / "cache" / "http").is_dir()  # beside the embedding cache
    again = build()
    assert (again.downloaded, again.revalidated, again.embedded, again.cached) == (0, 3, 0, 3)
    assert bodies_sent() == [1, 1, 1] and again.catalog_hash == first.catalog_hash
    assert "3 unchanged on the server" in again.summary() and again.to_json()["revalidated"] == 3

    image_server.versions[names[1]] = changed = make_image(seed=99)  # a new ETag
    third = build()
    assert (third.downloaded, third.revalidated, third.embedded, third.cached) == (1, 2, 1, 2)
    assert bodies_sent() == [1, 2, 1] and third.catalog_hash != first.catalog_hash
    index = Index.load(tmp_path / "index", expect_fingerprint=random_embedder.fingerprint)
    np.testing.assert_allclose(index.features[1], random_embedder.embed([load_image(changed)])[0], rtol=1e-4, atol=1e-4)

    uncached = build(cache=None)  # --no-cache: no HTTP cache either
    assert (uncached.downloaded, uncached.revalidated) == (3, 0) and bodies_sent() == [2, 3, 2]


def test_build_index_writes_a_searchable_index(tmp_path: Path, random_embedder: Embedder) -> None:
    from ffengine.index import Index

    cat = make_shop(tmp_path / "shop", 5, first_seed=20)
    report = build_index(cat, tmp_path / "idx", random_embedder, cache_dir=tmp_path / "cache", progress=False, backend="exact")
    assert report.out_dir == tmp_path / "idx" and report.products == 5 and report.images_per_s > 0
    assert 0 < report.embed_seconds and 0 < report.index_seconds and report.embed_seconds + report.index_seconds <= report.seconds
    as_json = json.loads(json.dumps(report.to_json()))
    assert as_json["products"] == 5 and as_json["out_dir"] == str(tmp_path / "idx") and as_json["skipped"] == []
    index = Index.load(tmp_path / "idx", expect_fingerprint=random_embedder.fingerprint)
    assert len(index) == 5 and index.manifest["catalog_hash"] == report.catalog_hash
    dist, rows = index.search(index.features, k=1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # every photo finds itself first
    np.testing.assert_allclose(dist[:, 0], 0, atol=1e-3)
    rebuilt = build_index(cat, tmp_path / "idx", random_embedder, cache_dir=tmp_path / "cache", progress=False, backend="exact")
    assert (rebuilt.embedded, rebuilt.cached, rebuilt.catalog_hash) == (0, 5, report.catalog_hash)


def test_progress_bar_goes_to_stderr_only_when_asked(tmp_path: Path, random_embedder: Embedder, capsys: pytest.CaptureFixture[str]) -> None:
    cat = make_shop(tmp_path / "shop", 2)
    cache = tmp_path / "cache"
    embed_catalog(cat, random_embedder, cache_dir=cache, progress=False)
    assert capsys.readouterr() == ("", "")
    embed_catalog(cat, random_embedder, cache_dir=cache, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "embedding" in err and "2/2" in err


async def test_async_embedding_leaves_the_event_loop_free(tmp_path: Path, random_embedder: Embedder) -> None:
    cat = make_shop(tmp_path / "shop", 12, first_seed=40)
    ticks = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    beat = asyncio.create_task(heartbeat())
    result = await aembed_catalog(cat, random_embedder, progress=False, batch_size=12)
    done.set()
    await beat
    assert result.report.embedded == 12
    # One forward pass of 12 photos runs while the loop keeps ticking; a blocked loop ticks once.
    assert ticks >= 5
    with pytest.raises(RuntimeError, match="await aembed_catalog"):
        embed_catalog(cat, random_embedder, progress=False)


def test_an_already_read_catalogue_and_limit(tmp_path: Path, random_embedder: Embedder) -> None:
    cat = make_shop(tmp_path / "shop", 4)
    with cat.open("a", encoding="utf-8") as fh:
        fh.write(",no id,https://shop.example/x,images/0.jpg,Shirts\n")  # line 6, after the limit
    read = read_catalog(cat)
    assert [p.line for p in read.problems] == [6]
    result = embed_catalog(read, random_embedder, progress=False, limit=2)
    assert [p.id for p in result.products] == ["p0", "p1"] and result.report.skipped == []
    assert embed_catalog(read, random_embedder, progress=False, limit=9).report.skipped == read.problems
    assert embed_catalog(cat, random_embedder, progress=False, limit=3).report.products == 3


@pytest.fixture(scope="module")
def catalog_subset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The first 48 rows of the real catalog-10k, pointing at the shared photos (nothing copied)."""
    from tests.conftest import shared_path

    source = shared_path("datasets", "catalog-10k", "products.csv")
    folder = tmp_path_factory.mktemp("catalog10k-subset")
    with source.open(newline="", encoding="utf-8") as fh:
        lines = fh.readlines()[:49]
    images = source.parent
    rows = list(csv.reader(lines))
    header = rows[0]
    col = header.index("image")
    for r in rows[1:]:
        r[col] = os.path.relpath(images / r[col], folder)
    path = folder / "products.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    yield path


@pytest.mark.shared
def test_real_catalogue_subset_with_random_embedder(catalog_subset: Path, random_embedder: Embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import shared_path

    monkeypatch.setenv("FFENGINE_IMAGE_ROOTS", str(shared_path("datasets", "catalog-10k", "images")))  # the photos are not copied
    result = embed_catalog(catalog_subset, random_embedder, cache_dir=tmp_path / "cache", progress=False, batch_size=16)
    assert result.report.products == 48 and result.report.skipped == []
    assert np.isfinite(result.features).all() and result.features.std() > 0
    assert result.products[0].category == "Skirts" and result.products[0].extra["master_category"] == "Apparel"
    assert Path(result.products[0].image).is_file()
    picks = [0, 17, 47]
    expected = reference(random_embedder, [result.products[i].image for i in picks])
    np.testing.assert_allclose(result.features[picks], expected, rtol=1e-4, atol=1e-4)
    again = embed_catalog(catalog_subset, random_embedder, cache_dir=tmp_path / "cache", progress=False)
    assert (again.report.embedded, again.report.cached) == (0, 48)
    assert again.report.catalog_hash == result.report.catalog_hash


def test_fetch_settings_are_used_for_remote_only(tmp_path: Path, random_embedder: Embedder) -> None:
    # A local-only catalogue never opens an HTTP session, so even absurd fetch limits do not matter.
    cat = make_shop(tmp_path / "shop", 2)
    result = embed_catalog(cat, random_embedder, progress=False, fetch=FetchSettings(concurrency=1, retries=0, timeout_s=0.001))
    assert result.report.products == 2 and result.report.downloaded == 0


def test_an_image_the_embedder_cannot_prepare_is_skipped_not_fatal(tmp_path: Path, random_embedder: Embedder) -> None:
    class Picky(Renamed):
        def prepare(self, images):  # type: ignore[no-untyped-def]
            if images[0].size[0] == 61:
                raise ValueError("odd width")
            return super().prepare(images)

    cat = make_shop(tmp_path / "shop", 3)  # widths 60, 61, 62
    result = embed_catalog(cat, Picky(random_embedder, "picky"), progress=False)
    assert [p.id for p in result.products] == ["p0", "p2"]
    [problem] = result.report.skipped
    assert problem.line == 3 and problem.reason.startswith("cannot prepare the image (ValueError: odd width)")


def test_inline_and_batched_embedding_agree(tmp_path: Path, random_embedder: Embedder) -> None:
    """ONNX Runtime on CPU embeds each picture on its decode thread; any other runtime batches on a model thread."""
    assert random_embedder.wants_one_picture_per_thread  # the ONNX Runtime CPU path: inline
    cat = make_shop(tmp_path / "shop", 9, first_seed=40)
    paths = [str(tmp_path / "shop" / "images" / f"{i}.jpg") for i in range(9)]
    inline = embed_catalog(cat, random_embedder, cache_dir=tmp_path / "c1", progress=False)
    renamed = Renamed(random_embedder, random_embedder.fingerprint)  # no such property: batches
    batched = embed_catalog(cat, renamed, cache_dir=tmp_path / "c2", progress=False, batch_size=4)
    assert renamed.calls >= 3  # 9 pictures in batches of at most 4
    assert (inline.report.embedded, inline.report.cached) == (batched.report.embedded, batched.report.cached) == (9, 0)
    want = reference(random_embedder, paths)
    for got in (inline.features, batched.features):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    again = embed_catalog(cat, random_embedder, cache_dir=tmp_path / "c1", progress=False)  # inline results were cached
    assert (again.report.embedded, again.report.cached) == (0, 9)
    np.testing.assert_array_equal(again.features, inline.features)


def test_photos_outside_the_allowed_folders_and_refused_downloads_are_skipped_and_bad_links_warned(
    tmp_path: Path, random_embedder: Embedder, image_server: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = tmp_path / "shop"
    make_shop(shop, 2)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id.jpg").write_bytes(make_image(seed=77))  # an image, so only the path check stops it
    (shop / "images" / "link.jpg").symlink_to(tmp_path / "private" / "id.jpg")
    loopback = image_server.url("/good/build-refused.jpg")
    rows = [
        row("p0", "images/0.jpg"),  # line 2
        row("abs", str(tmp_path / "private" / "id.jpg")),  # 3
        row("up", "../private/id.jpg"),  # 4
        row("link", "images/link.jpg"),  # 5
        row("loop", loopback),  # 6: the importer's own machine
        {**row("nolink", "images/1.jpg"), "url": "http://localhost:8080/p"},  # 7: kept, without its link
    ]
    cat = write_catalog(shop / "products.csv", rows)
    monkeypatch.delenv("FFENGINE_IMAGE_ROOTS", raising=False)
    monkeypatch.delenv("FFENGINE_FETCH_ALLOW", raising=False)

    report = build_index(cat, tmp_path / "index", random_embedder, progress=False)

    assert report.products == 2 and report.downloaded == 0 and image_server.hits["/good/build-refused.jpg"] == 0
    reasons = {p.line: p.reason for p in report.skipped}
    assert sorted(reasons) == [3, 4, 5, 6]
    assert all("leads outside the catalogue folder" in reasons[line] and "FFENGINE_IMAGE_ROOTS" in reasons[line] for line in (3, 4, 5))
    assert reasons[6].startswith("download failed (refused to download from 127.0.0.1") and "FFENGINE_FETCH_ALLOW" in reasons[6]
    assert [(w.line, w.product_id) for w in report.warnings] == [(7, "nolink")]
    assert "2 products indexed (2 embedded, 0 from cache), 4 skipped, 1 with warnings" in report.summary()
    assert "warning line 7 (id nolink): url host 'localhost' is not a public address; imported without a link" in report.summary()
    assert report.to_json()["warnings"] == [{"line": 7, "product_id": "nolink", "reason": report.warnings[0].reason}]

    # The settings open a folder and the shop's own image server; the build reads them from the environment.
    monkeypatch.setenv("FFENGINE_IMAGE_ROOTS", str(tmp_path / "private"))
    monkeypatch.setenv("FFENGINE_FETCH_ALLOW", "127.0.0.1/32")
    opened = build_index(cat, tmp_path / "index", random_embedder, progress=False)
    assert (opened.products, opened.downloaded, opened.skipped) == (6, 1, [])
