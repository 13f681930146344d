"""The index directory: round trip, refusals (other model, corruption, pickles), atomic replace, exact search."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ffengine.catalog import Product
from ffengine.errors import FFError, IndexLoadError
from ffengine.index import (
    DEFAULT_BACKEND,
    BallTreeSearcher,
    DEFAULT_OPTIONS,
    ExactSearcher,
    manifest_checksum,
    PQSearcher,
    ShortlistSearcher,
    DEFAULT_REDUCTION,
    Index,
    Projection,
    Reduction,
    exact_search,
    sha256_file,
    write_index,
)

DIM = 48


def products(n: int, prefix: str = "p") -> list[Product]:
    cats = ["Shirts", "Jeans", "Dresses"]
    return [
        Product(
            id=f"{prefix}{i}",
            title=f"Product {i} — ünïcode",
            url=f"https://shop.example/{prefix}{i}",
            image=f"/images/{prefix}{i}.jpg",
            price=float(i),
            currency="EUR",
            category=cats[i % 3],
            colour="Blue",
            gender="Women" if i % 2 else "Men",
            extra={"season": "Summer"},
        )
        for i in range(n)
    ]


def features(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, np.ndarray, list[Product]]:
    feats, prods = features(120), products(120)
    out = write_index(tmp_path / "index", feats, prods, fingerprint="model-a", catalog_hash="cat1", projection=Reduction(16, True))
    return out, feats, prods


def rewrite_manifest(index_dir: Path, **changes: object) -> None:
    """Edit the manifest and re-sign every file, as a forger (or a buggy tool) would."""
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest.update(changes)
    manifest["files"] = {name: sha256_file(index_dir / name) for name in manifest["files"]}
    manifest["checksum"] = manifest_checksum(manifest)
    (index_dir / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(index_dir: Path, edit) -> None:
    """Edit the manifest by hand, leaving its checksum alone, as an admin with a text editor would."""
    manifest = json.loads((index_dir / "manifest.json").read_text())
    edit(manifest)
    (index_dir / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_keeps_everything(built: tuple[Path, np.ndarray, list[Product]]) -> None:
    out, feats, prods = built
    index = Index.load(out, expect_fingerprint="model-a")
    assert len(index) == 120
    assert index.products == prods
    np.testing.assert_array_equal(index.features, feats)
    np.testing.assert_allclose(index.vectors, index.projection.apply(feats), rtol=1e-5, atol=1e-6)
    m = index.manifest
    assert (m["fingerprint"], m["dim"], m["vector_dim"], m["backend"], m["catalog_hash"]) == ("model-a", DIM, 16, DEFAULT_BACKEND, "cat1")
    assert m["projection"]["recipe"] == asdict(Reduction(16, True))
    assert m["created"].endswith("Z")
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *m["files"]])
    # the loaded index answers exactly like one built in memory
    fresh = Index(feats, prods, fingerprint="model-a", projection=index.projection)
    q = features(7, seed=5)
    for a, b in zip(index.search(q, 5), fresh.search(q, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(out.parent.glob("index.tmp-*")) and not (out.parent / "index.old").exists()


def test_search_finds_each_catalogue_item_first(built: tuple[Path, np.ndarray, list[Product]]) -> None:
    out, feats, _ = built
    dist, idx = Index.load(out).search(feats[:20], 3)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == (20, 3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(20))
    assert np.all(dist[:, 0] < 1e-3) and np.all(np.diff(dist, axis=1) >= 0)


def test_k_is_capped_and_shape_checked(tmp_path: Path) -> None:
    index = Index(features(3), products(3), fingerprint="m", projection=Projection.identity(DIM), backend="exact")
    dist, idx = index.search(features(2, seed=1), 10)
    assert dist.shape == idx.shape == (2, 3)
    with pytest.raises(ValueError, match=r"shape \(m, 48\)"):
        index.search(np.zeros((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(features(1), 0)


def test_default_reduction_is_used_and_small_catalogues_skip_pca(tmp_path: Path) -> None:
    feats = features(400, dim=300)
    big = Index.load(write_index(tmp_path / "big", feats, products(400), fingerprint="m", catalog_hash="c"))
    assert big.manifest["projection"]["recipe"] == asdict(DEFAULT_REDUCTION)
    assert big.manifest["vector_dim"] == (DEFAULT_REDUCTION.dims or 300)
    assert big.manifest["backend"] == DEFAULT_BACKEND and big.manifest["options"] == DEFAULT_OPTIONS[DEFAULT_BACKEND]
    small = Index.load(write_index(tmp_path / "small", features(5, dim=300), products(5), fingerprint="m", catalog_hash="c"))
    assert small.manifest["vector_dim"] == 300 and small.projection.normalize_input == DEFAULT_REDUCTION.normalize_input
    pca = Index.load(write_index(tmp_path / "pca", features(5, dim=300), products(5), fingerprint="m", catalog_hash="c", projection=Reduction(200)))
    assert pca.manifest["vector_dim"] == 300 and pca.manifest["projection"]["recipe"]["dims"] is None  # 5 rows cannot give 200 axes


def test_backend_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="takes no option 'leafsize'"):
        write_index(tmp_path / "i", features(5), products(5), fingerprint="m", catalog_hash="c", leafsize=3)
    with pytest.raises(ValueError, match="shortlist must be a whole number >= 1"):
        write_index(tmp_path / "i", features(5), products(5), fingerprint="m", catalog_hash="c", shortlist=0)
    with pytest.raises(ValueError, match="unknown index backend 'annoy'"):
        write_index(tmp_path / "i", features(5), products(5), fingerprint="m", catalog_hash="c", backend="annoy")
    assert not (tmp_path / "i").exists()
    plain = write_index(tmp_path / "p", features(50), products(50), fingerprint="m", catalog_hash="c", coarse_dims=None)
    assert isinstance(Index.load(plain).searcher, ExactSearcher)
    short = write_index(tmp_path / "s", features(50), products(50), fingerprint="m", catalog_hash="c", coarse_dims=4, shortlist=9)
    assert isinstance(Index.load(short).searcher, ShortlistSearcher) and Index.load(short).searcher.shortlist == 9


def test_other_model_is_refused_with_a_clear_message(built: tuple[Path, np.ndarray, list[Product]]) -> None:
    out, _, _ = built
    with pytest.raises(IndexLoadError, match="built by another model.*model-a.*model-b"):
        Index.load(out, expect_fingerprint="model-b")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "features.npy").write_bytes((d / "features.npy").read_bytes()[:-100]), "features.npy does not match its checksum"),
        (lambda d: (d / "products.jsonl").unlink(), "products.jsonl is missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not readable JSON"),
        (lambda d: (d / "manifest.json").write_text('{"format": "ffengine-index", "version": 99}'), "format version 99"),
        (lambda d: edit_manifest(d, lambda m: m["options"].update(shortlist=1)), "changed after it was written"),
        (lambda d: edit_manifest(d, lambda m: m["projection"].update(normalize_input=False)), "changed after it was written"),
        (lambda d: rewrite_manifest(d, count=999), "expected float32"),
        (lambda d: rewrite_manifest(d, backend="faiss"), "backend 'faiss'"),
        (lambda d: (np.save(d / "vectors.npy", np.zeros((120, 16), np.float64)), rewrite_manifest(d)), "float64"),
        (lambda d: ((d / "products.jsonl").write_text('{"id": 1}\n' * 120), rewrite_manifest(d)), "line 1 is not a product"),
        (lambda d: ((d / "products.jsonl").write_text('{"id": "x", "title": "t", "url": "u", "image": "i"}\n'), rewrite_manifest(d)), "1 products for 120"),
    ],
)
def test_corrupt_or_missing_files_are_refused(built: tuple[Path, np.ndarray, list[Product]], damage, message: str) -> None:
    out, _, _ = built
    damage(out)
    with pytest.raises(IndexLoadError, match=message):
        Index.load(out)


def test_missing_index_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(IndexLoadError, match="No index at .*ffengine index build"):
        Index.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexLoadError, match="manifest.json is missing"):
        Index.load(tmp_path / "empty")


class Boom:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_arrays_are_never_unpickled(built: tuple[Path, np.ndarray, list[Product]], tmp_path: Path) -> None:
    out, _, _ = built
    marker = tmp_path / "code-ran"
    payload = np.empty(120, dtype=object)
    payload[:] = [Boom(str(marker))] * 120
    np.save(out / "features.npy", payload, allow_pickle=True)
    rewrite_manifest(out)  # even with a valid checksum
    assert pickle.dumps(Boom(str(marker)))  # the payload is a real pickle
    with pytest.raises(IndexLoadError, match="cannot read features.npy"):
        Index.load(out)
    assert not marker.exists()


def test_failure_mid_write_keeps_the_old_index(built: tuple[Path, np.ndarray, list[Product]], monkeypatch: pytest.MonkeyPatch) -> None:
    out, feats, _ = built
    real_save, calls = np.save, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_index(out, features(50, seed=9), products(50, "new"), fingerprint="model-b", catalog_hash="cat2")
    index = Index.load(out, expect_fingerprint="model-a")
    assert len(index) == 120
    assert not list(out.parent.glob("index.tmp-*"))


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import ffengine.index as ix
    from tests.test_index import features, products
    out, where = sys.argv[1], sys.argv[2]
    if where == "writing":
        real, calls = np.save, []
        def save(fh, arr, **kw):
            calls.append(arr.shape)
            if len(calls) == 2:  # about to write vectors.npy; features.npy is already on disk
                os._exit(9)
            real(fh, arr, **kw)
        np.save = save
    elif where == "before-swap":  # the last step: moving the new index into place
        def replace(src, dst):
            os._exit(9)
        os.replace = replace
    else:  # between moving the old index aside and moving the new one in
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if str(dst).endswith(".old"):
                os._exit(9)
        os.replace = replace
    ix.write_index(out, features(40, seed=3), products(40, "new"), fingerprint="model-b", catalog_hash="cat2",
                   projection=ix.Reduction(8, True) if where == "writing" else ix.Reduction(None, False))
    """
)


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_crash_never_leaves_a_half_written_live_index(built: tuple[Path, np.ndarray, list[Product]], where: str) -> None:
    out, _, _ = built
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(out), where], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    # the process died mid-update; whatever is on disk, the old index loads in full
    index = Index.load(out, expect_fingerprint="model-a")
    assert len(index) == 120
    if where == "swapping":
        assert not out.exists() and (out.parent / "index.old" / "manifest.json").is_file()
    else:
        assert list(out.parent.glob("index.tmp-*")), "the crash should have left its temp dir behind"
    # and the next update succeeds
    write_index(out, features(30, seed=4), products(30, "next"), fingerprint="model-c", catalog_hash="cat3")
    assert len(Index.load(out, expect_fingerprint="model-c")) == 30
    assert not (out.parent / "index.old").exists()


def test_double_crash_keeps_the_last_good_copy(built: tuple[Path, np.ndarray, list[Product]]) -> None:
    """A crash left only ``index.old``; a second write that dies before its swap must not have deleted it."""
    out, _, _ = built
    repo = Path(__file__).resolve().parents[1]
    for where in ("swapping", "before-swap"):
        proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(out), where], cwd=repo, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 9, proc.stderr
        assert not out.exists() and (out.parent / "index.old" / "manifest.json").is_file()
        assert len(Index.load(out, expect_fingerprint="model-a")) == 120


def test_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path: Path) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FFError, match="not an index"):
        write_index(precious, features(5), products(5), fingerprint="m", catalog_hash="c")
    assert (precious / "holiday.jpg").exists()


@pytest.mark.parametrize("reduction", [Reduction(None, False), Reduction(None, True), Reduction(12, True), Reduction(12, False, whiten=True)])
def test_balltree_matches_exact_search(reduction: Reduction) -> None:
    feats, prods = features(600, seed=1), products(600)
    proj = reduction.fit(feats)
    tree = Index(feats, prods, fingerprint="m", projection=proj, backend="balltree", options={"leaf_size": 8})
    exact = Index(feats, prods, fingerprint="m", projection=proj, backend="exact")
    q = features(40, seed=2)
    d1, i1 = tree.search(q, 10)
    d2, i2 = exact.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backend", "block_rows"), [("shortlist", None), ("balltree", None), ("shortlist", 3)])
def test_pca_shortlist_reranks_exactly(backend: str, block_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if block_rows:  # score and re-rank candidates 3 gathered rows at a time: same answer
        monkeypatch.setattr("ffengine.index.RERANK_BLOCK_BYTES", 4 * DIM * block_rows)
    rng = np.random.default_rng(8)
    # intrinsically 8-d data in 48 dims: an 8-d PCA shortlist holds the true neighbours
    feats = (rng.normal(size=(800, 8)) @ rng.normal(size=(8, DIM)) + 0.01 * rng.normal(size=(800, DIM))).astype(np.float32)
    q = (rng.normal(size=(30, 8)) @ rng.normal(size=(8, DIM))).astype(np.float32)
    ident = Projection.identity(DIM)
    exact = Index(feats, products(800), fingerprint="m", projection=ident, backend="exact")
    short = Index(feats, products(800), fingerprint="m", projection=ident, backend=backend, options={"coarse_dims": 8, "shortlist": 20})
    assert isinstance(short.searcher, ShortlistSearcher) and short.searcher.coarse.out_dim == 8
    assert isinstance(short.searcher.inner, BallTreeSearcher if backend == "balltree" else ExactSearcher)
    (d1, i1), (d2, i2) = short.search(q, 5), exact.search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)  # distances are the full-space ones
    # on full-rank noise a 2-d shortlist misses neighbours, but a shortlist of everything cannot
    noise, q2 = features(300, seed=9), features(30, seed=10)
    narrow = Index(noise, products(300), fingerprint="m", projection=ident, backend=backend, options={"coarse_dims": 2, "shortlist": 5})
    wide = Index(noise, products(300), fingerprint="m", projection=ident, backend=backend, options={"coarse_dims": 2, "shortlist": 300})
    truth = exact_search(noise, q2, 5)[1]
    assert not np.array_equal(narrow.search(q2, 5)[1], truth)
    np.testing.assert_array_equal(wide.search(q2, 5)[1], truth)


def test_default_shortlist_scans_product_quantised_codes() -> None:
    rng = np.random.default_rng(11)
    # intrinsically 16-d data in 48 dims, enough rows for product quantisation
    basis = rng.normal(size=(16, DIM))
    feats = (rng.normal(size=(3000, 16)) @ basis + 0.01 * rng.normal(size=(3000, DIM))).astype(np.float32)
    q = (rng.normal(size=(40, 16)) @ basis).astype(np.float32)
    ident = Projection.identity(DIM)
    truth = exact_search(feats, q, 5)
    index = Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 16, "shortlist": 150})
    assert isinstance(index.searcher, ShortlistSearcher) and isinstance(index.searcher.inner, PQSearcher)
    assert index.searcher.inner.index.pq.M == 8  # one 4-bit code per two PCA dimensions
    dist, idx = index.search(q, 5)
    hits = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, truth[1])])
    assert hits >= 0.95, hits  # approximate codes only pick candidates ...
    found = np.isin(idx, truth[1]).all(axis=1)
    np.testing.assert_allclose(dist[found], truth[0][found], rtol=1e-5)  # ... distances are exact
    # codes that coarse cannot rank well: a shortlist of 5 misses neighbours a shortlist of 150 finds
    narrow = Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 16, "shortlist": 5, "pq_subspaces": 2})
    narrow_hits = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(narrow.search(q, 5)[1], truth[1])])
    assert narrow_hits < hits
    # pq_subspaces=0 scans the PCA copy as floats; too few rows for codes does the same
    floats = Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 16, "pq_subspaces": 0})
    small = Index(feats[:500], products(500), fingerprint="m", projection=ident, options={"coarse_dims": 16})
    assert isinstance(floats.searcher.inner, ExactSearcher) and isinstance(small.searcher.inner, ExactSearcher)
    with pytest.raises(ValueError, match="pq_subspaces \\(5\\) must divide coarse_dims \\(16\\)"):
        Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 16, "pq_subspaces": 5})


@pytest.mark.parametrize("block_rows", [None, 7])
def test_exact_search_matches_a_plain_loop(block_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if block_rows:  # re-rank in blocks of 7 gathered rows: same answer, bounded memory
        monkeypatch.setattr("ffengine.index.RERANK_BLOCK_BYTES", 4 * 10 * block_rows)
    v, q = features(300, dim=10, seed=1), features(5, dim=10, seed=2)
    for k in (4, 300):
        dist, idx = exact_search(v, q, k)
        for row in range(5):
            d = np.linalg.norm(v - q[row], axis=1)
            np.testing.assert_array_equal(idx[row], np.argsort(d)[:k])
            np.testing.assert_allclose(dist[row], np.sort(d)[:k], rtol=1e-5)


def test_pca_projection_is_orthonormal_and_reproducible() -> None:
    feats = features(500, seed=3) * np.linspace(0.1, 3, DIM, dtype=np.float32)
    a, b = Reduction(10, True).fit(feats), Reduction(10, True).fit(feats)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_allclose(a.matrix.T @ a.matrix, np.eye(10), atol=1e-5)
    # the first axis carries the most variance
    var = a.apply(feats).var(axis=0)
    assert var[0] == var.max() and np.all(np.diff(var) <= 1e-6)
    white = Reduction(10, False, whiten=True).fit(feats).apply(feats)
    np.testing.assert_allclose(white.var(axis=0), 1.0, rtol=0.02)
    ident = Projection.identity(DIM)
    assert ident.is_identity
    np.testing.assert_array_equal(ident.apply(feats), feats)
    np.testing.assert_allclose(np.linalg.norm(Projection.identity(DIM, normalize_input=True).apply(feats), axis=1), 1.0, rtol=1e-5)


def test_temp_dirs_are_siblings_and_hidden_from_load(built: tuple[Path, np.ndarray, list[Product]]) -> None:
    out, _, _ = built
    stray = out.parent / "index.tmp-stray"
    stray.mkdir()
    (stray / "features.npy").write_bytes(b"half")
    assert len(Index.load(out)) == 120
    assert os.path.isdir(stray)


def test_leftovers_of_crashed_writes_are_removed_but_not_a_write_in_progress(tmp_path: Path) -> None:
    stale = tmp_path / "idx.tmp-crashed"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "vectors.npy").write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    live = tmp_path / "idx.tmp-writing"  # another process's write, minutes old at most
    live.mkdir()
    other = tmp_path / "other.tmp-crashed"  # another index's leftover: not ours to judge
    other.mkdir()
    os.utime(other, (old, old))
    out = write_index(tmp_path / "idx", features(5), products(5), fingerprint="m", catalog_hash="c")
    assert Index.load(out).fingerprint == "m"
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "idx.tmp-writing", "other.tmp-crashed"]
