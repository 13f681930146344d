"""``index update``: a changed catalogue indexed from the previous index, embedding only new and changed pictures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from ffengine.build import build_index, update_index
from ffengine.embedder import Embedder
from ffengine.errors import FFError
from ffengine.index import MANIFEST_FILE, PQ_MIN_ROWS, Index, sha256_file
from tests.conftest import make_image
from tests.test_build import row, write_catalog

N = PQ_MIN_ROWS + 40  # enough products for a trained shortlist (PCA and codes)
GONE, CHANGED, ADDED = 10, 5, 5


class Counting:
    """The embedder, counting the pictures it embeds."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.pictures = inner, 0
        self.fingerprint, self.dim, self.preprocess = inner.fingerprint, inner.dim, inner.preprocess
        self.source, self.kind_head = inner.source, inner.kind_head

    def prepare(self, images):  # type: ignore[no-untyped-def]
        return self.inner.prepare(images)

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.pictures += len(batch)
        return self.inner.embed_arrays(batch)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, random_embedder: Embedder) -> tuple[Path, Path]:
    """A catalogue of ``N`` generated pictures and its index."""
    root = tmp_path_factory.mktemp("shop")
    (root / "images").mkdir()
    for i in range(N):
        (root / "images" / f"{i}.jpg").write_bytes(make_image(seed=i, size=(40 + i % 50, 56)))
    catalog = write_catalog(root / "products.csv", [shop_row(i) for i in range(N)])
    build_index(catalog, root / "v1", random_embedder, progress=False)
    return root, catalog


def shop_row(i: int) -> dict[str, str]:
    return {**row(f"p{i}", f"images/{i}.jpg"), "category": "Jeans" if i % 2 else "Shirts"}


def changed_catalogue(root: Path) -> Path:
    """The shop a day later: the first ``GONE`` products gone, ``CHANGED`` pictures replaced, ``ADDED`` new
    products, and one product renamed (its picture unchanged)."""
    new = root / "day2"
    shutil.copytree(root / "images", new / "images")
    rows = [shop_row(i) for i in range(GONE, N)]
    for i in range(GONE, GONE + CHANGED):
        (new / "images" / f"{i}.jpg").write_bytes(make_image(seed=10_000 + i, size=(64, 64)))
    for j in range(ADDED):
        (new / "images" / f"new{j}.jpg").write_bytes(make_image(seed=20_000 + j, size=(70, 50)))
        rows.append(row(f"new{j}", f"images/new{j}.jpg"))
    rows[-ADDED - 1]["title"] = "Renamed shirt"
    return write_catalog(new / "products.csv", rows)


def test_an_update_embeds_only_new_and_changed_pictures_and_keeps_the_trained_search(shop: tuple[Path, Path], random_embedder: Embedder) -> None:
    root, _ = shop
    before = {name: sha256_file(root / "v1" / name) for name in json.loads((root / "v1" / MANIFEST_FILE).read_text())["files"]}
    catalog = changed_catalogue(root)
    counting = Counting(random_embedder)
    report = update_index(catalog, root / "v1", root / "v2", counting, progress=False)
    assert counting.pictures == CHANGED + ADDED and report.embedded == CHANGED + ADDED
    assert report.products == N - GONE + ADDED and report.reused == N - GONE - CHANGED
    assert "reused from the previous index" in report.summary()
    assert {name: sha256_file(root / "v1" / name) for name in before} == before  # the old version is untouched

    old, new = Index.load(root / "v1"), Index.load(root / "v2")
    fresh_report = build_index(catalog, root / "fresh", random_embedder, progress=False)
    fresh = Index.load(fresh_report.out_dir)
    ids = [p.id for p in new.products]
    assert sorted(ids) == sorted(p.id for p in fresh.products) and not {f"p{i}" for i in range(GONE)} & set(ids)
    by_id = {p.id: i for i, p in enumerate(fresh.products)}
    np.testing.assert_allclose(new.features.astype(np.float32), fresh.features[[by_id[i] for i in ids]].astype(np.float32), atol=2e-3)
    assert new.products[ids.index(f"p{N - 1}")].title == "Renamed shirt"

    # the PCA and the codebooks are the previous index's (refilled, not trained), the codes of an unchanged picture the same
    assert new.searcher.factory == old.searcher.factory and new.searcher.shortlist is not None

    def trained(index: Index) -> tuple[np.ndarray, np.ndarray]:
        base = faiss.downcast_index(index.searcher.index.base_index)
        return faiss.vector_to_array(faiss.downcast_VectorTransform(base.chain.at(0)).A), faiss.vector_to_array(faiss.downcast_index(base.index).pq.centroids)
    for a, b in zip(trained(old), trained(new), strict=True):
        np.testing.assert_array_equal(a, b)
    row_old, row_new = [p.id for p in old.products].index("p500"), ids.index("p500")
    np.testing.assert_array_equal(new.features[row_new], old.features[row_old])  # the raw features, not embedded again
    assert new.priors.info["category"]["kept"] and new.priors.category_head is not None  # the category fit too
    np.testing.assert_array_equal(new.priors.category_head.weight, old.priors.category_head.weight)
    assert not fresh.priors.info["category"]["kept"]
    base_old, base_new = (faiss.downcast_index(i.searcher.index.base_index) for i in (old, new))
    np.testing.assert_array_equal(base_old.sa_encode(old.vectors[row_old : row_old + 1].astype(np.float32)),
                                  base_new.sa_encode(new.vectors[row_new : row_new + 1].astype(np.float32)))  # fmt: skip

    # a changed picture and a new product are found by their own features
    for pid in (f"p{GONE}", "new0"):
        query = fresh.features[by_id[pid]].astype(np.float32)[None]
        assert new.products[int(new.search(query, 1)[1][0, 0])].id == pid


def test_an_update_refuses_to_overwrite_its_source_and_an_index_without_picture_hashes(shop: tuple[Path, Path], random_embedder: Embedder, tmp_path: Path) -> None:
    root, catalog = shop
    with pytest.raises(FFError, match="writes a new index"):
        update_index(catalog, root / "v1", root / "v1", random_embedder, progress=False)
    legacy = tmp_path / "legacy"
    shutil.copytree(root / "v1", legacy)
    manifest = json.loads((legacy / MANIFEST_FILE).read_text())
    del manifest["files"]["image_sha256.npy"]
    manifest["version"] = 4
    from ffengine.index import manifest_checksum

    manifest["checksum"] = manifest_checksum(manifest)
    (legacy / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert Index.load(legacy).image_sha256 is None  # a version-4 index still loads
    with pytest.raises(FFError, match="rebuild it once"):
        update_index(catalog, legacy, tmp_path / "out", random_embedder, progress=False)
