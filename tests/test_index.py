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

import faiss
import numpy as np
import pytest

from ffengine.catalog import Product
from ffengine.errors import FFError, IndexLoadError
from ffengine.files import write_atomic
from ffengine.index import (
    DEFAULT_BACKEND,
    DEFAULT_OPTIONS,
    DEFAULT_REDUCTION,
    PQ_MIN_ROWS,
    Index,
    Projection,
    Reduction,
    manifest_checksum,
    sha256_file,
    write_index,
)
from ffengine.search import Searcher

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
    assert list(index.products) == prods and index.products[-1] == prods[-1] and index.products[5:7] == prods[5:7]
    np.testing.assert_array_equal(index.features, feats.astype(np.float16))  # stored in float16 since version 4
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
    with pytest.raises(ValueError, match="coarse_dims must be a whole number >= 1"):
        write_index(tmp_path / "i", features(5), products(5), fingerprint="m", catalog_hash="c", coarse_dims=None)
    assert not (tmp_path / "i").exists()
    plain = write_index(tmp_path / "p", features(50), products(50), fingerprint="m", catalog_hash="c", backend="exact")
    assert Index.load(plain).searcher.shortlist is None
    n = PQ_MIN_ROWS
    short = Index.load(write_index(tmp_path / "s", features(n), products(n), fingerprint="m", catalog_hash="c", coarse_dims=4, shortlist=9))
    assert short.searcher.shortlist == 9 and short.searcher.describe() == "9 candidates from 2 4-bit codes of a 4-d PCA copy, re-ranked by their float16 copies"
    small = write_index(tmp_path / "x", features(n - 1), products(n - 1), fingerprint="m", catalog_hash="c", coarse_dims=4)
    assert Index.load(small).searcher.describe() == "an exact scan of every vector"  # too few rows to train codes on


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
        (lambda d: (np.save(d / "projection_mean.npy", np.zeros(DIM, np.float64)), rewrite_manifest(d)), "float64"),
        (lambda d: (d / "search.faiss").unlink(), "search.faiss is missing"),
        (lambda d: ((d / "products.jsonl").write_text('{"id": 1}\n' * 120), rewrite_manifest(d)), "line 1 is not a product"),
        (lambda d: ((d / "products.jsonl").write_text('{"id": "x", "title": "t", "url": "u", "image": "i"}\n'), rewrite_manifest(d)), "1 products for 120"),
    ],
)
def test_corrupt_or_missing_files_are_refused(built: tuple[Path, np.ndarray, list[Product]], damage, message: str) -> None:
    out, _, _ = built
    damage(out)
    with pytest.raises(IndexLoadError, match=message):
        Index.load(out)


@pytest.fixture
def shortlisted(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """An index big enough for the shortlist's trained codes."""
    feats = features(PQ_MIN_ROWS, seed=12)
    out = write_index(tmp_path / "index", feats, products(PQ_MIN_ROWS), fingerprint="m", catalog_hash="c", coarse_dims=8, shortlist=50)
    return out, feats


def test_the_faiss_file_is_checksummed_and_refused_when_corrupt(shortlisted: tuple[Path, np.ndarray]) -> None:
    out, _ = shortlisted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["search.faiss"] == sha256_file(out / "search.faiss") and manifest["version"] == 5
    data = bytearray((out / "search.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "search.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="search.faiss does not match its checksum"):
        Index.load(out)
    (out / "search.faiss").write_bytes(b"not a FAISS index")
    rewrite_manifest(out)  # even when the manifest vouches for it
    with pytest.raises(IndexLoadError, match="corrupt: search.faiss is not a FAISS index.*Rebuild it"):
        Index.load(out)


def test_a_faiss_file_of_other_vectors_is_refused(shortlisted: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    out, _ = shortlisted
    other = write_index(tmp_path / "other", features(PQ_MIN_ROWS + 1), products(PQ_MIN_ROWS + 1), fingerprint="m", catalog_hash="c")
    (out / "search.faiss").write_bytes((other / "search.faiss").read_bytes())
    rewrite_manifest(out)
    with pytest.raises(IndexLoadError, match=r"search.faiss holds \(1001, 48\) vectors, expected \(1000, 48\)"):
        Index.load(out)


def test_load_reads_the_trained_search_instead_of_training_it(shortlisted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    out, feats = shortlisted
    ident = Projection.identity(DIM, normalize_input=True)  # the default reduction, fitted on these features
    built = Index(feats, products(len(feats)), fingerprint="m", projection=ident, options={"coarse_dims": 8, "shortlist": 50})

    def no_training(*args, **kwargs):
        raise AssertionError("load trained the search again")

    monkeypatch.setattr(Searcher, "build", no_training)
    index = Index.load(out)
    assert index.searcher.describe() == "50 candidates from 4 4-bit codes of a 8-d PCA copy, re-ranked by their float16 copies"
    np.testing.assert_array_equal(index.vectors, built.vectors)
    assert not index.vectors.flags.writeable  # a view of FAISS's copy: one copy of the vectors in memory
    q = features(20, seed=13)
    for a, b in zip(index.search(q, 5), built.search(q, 5), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("backend", "options", "searched_as"),
    [
        ("shortlist", {"coarse_dims": 8, "shortlist": 50, "pq_subspaces": None}, ("shortlist", {"coarse_dims": 8, "shortlist": 50})),
        ("shortlist", {"coarse_dims": None, "shortlist": 400, "pq_subspaces": 0}, ("exact", {})),
        ("balltree", {"leaf_size": 40, "coarse_dims": None, "shortlist": 400}, ("exact", {})),
    ],
)
def test_version_2_indexes_still_load(shortlisted: tuple[Path, np.ndarray], backend: str, options: dict, searched_as: tuple) -> None:
    """Version 2 had vectors.npy and no FAISS file: its search is trained at load, with what its options meant."""
    out, feats = shortlisted
    (out / "search.faiss").unlink()
    np.save(out / "vectors.npy", Projection.identity(DIM, normalize_input=True).apply(feats))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["search.faiss"]
    manifest["files"]["vectors.npy"] = ""
    manifest["projection"]["normalize_output"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    rewrite_manifest(out, version=2, backend=backend, options=options)
    index = Index.load(out)
    assert (index.backend, index.options) == searched_as
    q = features(10, seed=14)
    np.testing.assert_array_equal(index.search(q, 3)[1], Index(feats, products(len(feats)), fingerprint="m", projection=index.projection, backend=searched_as[0], options=searched_as[1]).search(q, 3)[1])
    rewrite_manifest(out, version=3, backend="exact", options={})  # version 3 has no vectors.npy: its FAISS file is missing
    with pytest.raises(IndexLoadError, match="search.faiss is missing"):
        Index.load(out)


def test_version_3_indexes_of_float32_still_load(shortlisted: tuple[Path, np.ndarray]) -> None:
    """Version 3 kept features.npy and the re-ranked vectors (FAISS's RFlat) in float32: read as they are."""
    out, feats = shortlisted
    ident = Projection.identity(DIM, normalize_input=True)
    old = faiss.index_factory(DIM, "PCA8,PQ4x4fs,RFlat")
    old.train(ident.apply(feats))
    old.add(ident.apply(feats))
    faiss.write_index(old, str(out / "search.faiss"))
    np.save(out / "features.npy", feats)
    rewrite_manifest(out, version=3)
    index = Index.load(out)
    assert index.features.dtype == np.float32 and index.vectors.dtype == np.float32
    assert index.searcher.describe() == "50 candidates from 4 4-bit codes of a 8-d PCA copy, re-ranked exactly"
    q = features(10, seed=15)
    want_dist, want_idx = old.search(ident.apply(q), 50)  # the shortlist FAISS re-ranks in float32
    dist, idx = index.search(q, 3)
    np.testing.assert_array_equal(idx, want_idx[:, :3])
    np.testing.assert_allclose(dist, np.sqrt(want_dist[:, :3]), rtol=1e-6)
    rows = np.arange(0, len(feats), 7)
    np.testing.assert_array_equal(index.search_rows(q, rows, 4)[1], rows[exact_rows(ident.apply(feats[rows]), ident.apply(q), 4)[1]])


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    write_atomic(target, b"old")

    def failing(fh) -> None:
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, failing, durable=True)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["file.bin"]
    write_atomic(target, lambda fh: fh.write(b"new"), durable=True)
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["file.bin"]


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
            if len(calls) == 2:  # about to write the projection; features.npy is already on disk
                os._exit(9)
            real(fh, arr, **kw)
        np.save = save
    elif where == "before-swap":  # the last step: moving the new index into place
        real_replace = os.replace
        def replace(src, dst):
            if os.path.isdir(src):
                os._exit(9)
            real_replace(src, dst)  # the files inside the new index are written atomically too
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


def exact_rows(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The yardstick: every distance computed, sorted by (distance, row)."""
    dist = np.linalg.norm(vectors[None, :, :] - queries[:, None, :], axis=2)
    order = np.lexsort((np.broadcast_to(np.arange(len(vectors)), dist.shape), dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), order


@pytest.mark.parametrize(("n", "options"), [(300, {}), (PQ_MIN_ROWS, {"coarse_dims": 8, "shortlist": PQ_MIN_ROWS})])
@pytest.mark.parametrize("reduction", [Reduction(None, False), Reduction(None, True), Reduction(12, True)])
def test_search_equals_exact_search_on_small_indexes(n: int, options: dict[str, int], reduction: Reduction) -> None:
    """Below PQ_MIN_ROWS the default backend scans every vector; a shortlist of every row re-ranks them all."""
    feats, q = features(n, seed=1), features(40, seed=2)
    proj = reduction.fit(feats)
    index = Index(feats, products(n), fingerprint="m", projection=proj, options=options)
    assert (index.searcher.shortlist is None) == (n < PQ_MIN_ROWS)
    for k in (1, 10):
        dist, idx = index.search(q, k)
        want_dist, want_idx = exact_rows(proj.apply(feats), proj.apply(q), k)
        np.testing.assert_array_equal(idx, want_idx)
        # a flat scan is float32; a shortlist re-ranks by float16 copies of the vectors (rounding ~5e-4)
        np.testing.assert_allclose(dist, want_dist, rtol=1e-5 if index.searcher.shortlist is None else 2e-3, atol=1e-6)


@pytest.mark.parametrize(("backend", "n"), [("exact", 60), ("shortlist", PQ_MIN_ROWS)])
def test_ties_resolve_by_row(backend: str, n: int, blas: bool) -> None:
    """Identical catalogue pictures are equally near: the lower row comes first, in search and search_rows."""
    feats = features(n, seed=4)
    twins = [7, 3, 41, 19]
    feats[twins] = feats[3]
    index = Index(feats, products(n), fingerprint="m", projection=Projection.identity(DIM), backend=backend)
    dist, idx = index.search(np.repeat(feats[3:4], 25, axis=0), 6)
    assert (idx[:, :4] == sorted(twins)).all() and (dist[:, :4] == 0).all()
    dist, idx = index.search_rows(feats[3:4], np.array([41, 2, 19, 7, 5]), 3)
    assert idx.tolist() == [[7, 19, 41]] and (dist == 0).all()


def test_search_rows_is_exact_within_the_rows() -> None:
    n = PQ_MIN_ROWS
    feats, q = features(n, seed=5), features(30, seed=6)
    index = Index(feats, products(n), fingerprint="m", projection=Projection.identity(DIM), options={"coarse_dims": 4, "shortlist": 5})
    rows = np.random.default_rng(7).choice(n, 50, replace=False)  # unordered, index-wide row numbers
    dist, idx = index.search_rows(q, rows, 8)
    want_dist, want_pos = exact_rows(feats[np.sort(rows)], q, 8)
    np.testing.assert_array_equal(idx, np.sort(rows)[want_pos])
    np.testing.assert_allclose(dist, want_dist, rtol=2e-3)  # from the float16 vectors a shortlist keeps
    assert index.search_rows(q[:2], np.array([9, 9, 4]), 5)[1].shape == (2, 2)  # k capped at the rows there are
    dist, idx = index.search_rows(q[:2], np.array([], np.int64), 5)
    assert dist.shape == idx.shape == (2, 0)


def test_shortlist_scans_product_quantised_codes_and_reranks_by_float16_vectors() -> None:
    rng = np.random.default_rng(11)
    # intrinsically 16-d data in 48 dims, enough rows for product quantisation
    basis = rng.normal(size=(16, DIM))
    feats = (rng.normal(size=(3000, 16)) @ basis + 0.01 * rng.normal(size=(3000, DIM))).astype(np.float32)
    q = (rng.normal(size=(40, 16)) @ basis).astype(np.float32)
    ident = Projection.identity(DIM)
    truth = exact_rows(feats, q, 5)
    index = Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 16, "shortlist": 150})
    assert index.searcher.describe() == "150 candidates from 8 4-bit codes of a 16-d PCA copy, re-ranked by their float16 copies"
    dist, idx = index.search(q, 5)
    hits = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, truth[1])])
    assert hits >= 0.95, hits  # approximate codes only pick candidates ...
    found = np.isin(idx, truth[1]).all(axis=1)
    np.testing.assert_allclose(dist[found], truth[0][found], rtol=2e-3)  # ... distances are exact to float16's rounding
    # a shortlist of 5 misses neighbours a shortlist of 150 finds; one of every row finds them all
    narrow = Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 2, "shortlist": 5})
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(narrow.search(q, 5)[1], truth[1])]) < hits
    wide = Index(feats, products(3000), fingerprint="m", projection=ident, options={"coarse_dims": 2, "shortlist": 3000})
    np.testing.assert_array_equal(wide.search(q, 5)[1], truth[1])


@pytest.fixture(params=[False, True], ids=["scan", "blas"])
def blas(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """FAISS scans few queries one by one and computes many at once with BLAS (|x|²+|y|²-2x·y, blurring
    near-duplicates); ``True`` makes every search take the BLAS path."""
    if request.param:
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1)
    return bool(request.param)


@pytest.mark.parametrize("queries", [1, 30])
def test_exact_backend_matches_a_plain_loop(queries: int, blas: bool) -> None:
    v, q = features(300, dim=10, seed=1), features(queries, dim=10, seed=2)
    v[50] = q[0] + 1e-6  # a near-duplicate keeps its tiny exact distance
    index = Index(v, products(300), fingerprint="m", projection=Projection.identity(10), backend="exact")
    for k in (4, 300):
        dist, idx = index.search(q, k)
        for row in range(queries):
            d = np.linalg.norm(v - q[row], axis=1)
            np.testing.assert_array_equal(idx[row], np.argsort(d, kind="stable")[:k])
            np.testing.assert_allclose(dist[row], np.sort(d)[:k], rtol=1e-5)
    assert index.search(q[:1], 1)[0][0, 0] < 1e-5


def test_pca_projection_is_orthonormal_and_reproducible() -> None:
    feats = features(500, seed=3) * np.linspace(0.1, 3, DIM, dtype=np.float32)
    a, b = Reduction(10, True).fit(feats), Reduction(10, True).fit(feats)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_allclose(a.matrix.T @ a.matrix, np.eye(10), atol=1e-5)
    # the first axis carries the most variance
    var = a.apply(feats).var(axis=0)
    assert var[0] == var.max() and np.all(np.diff(var) <= 1e-6)
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


def test_features_float16_cannot_hold_stay_float32(tmp_path: Path) -> None:
    """Rows so short (or values so large) that float16 would round them away are stored and re-ranked in float32."""
    tiny = features(PQ_MIN_ROWS, seed=16) * np.float32(1e-9)  # e.g. a random-init backbone's outputs
    index = Index.load(write_index(tmp_path / "t", tiny, products(PQ_MIN_ROWS), fingerprint="m", catalog_hash="c", projection=Reduction(None, False), coarse_dims=8))
    assert index.features.dtype == np.float32 and index.vectors.dtype == np.float32
    np.testing.assert_array_equal(index.features, tiny)
    assert index.searcher.describe().endswith("re-ranked exactly")
    normal = Index.load(write_index(tmp_path / "n", tiny * np.float32(1e9), products(PQ_MIN_ROWS), fingerprint="m", catalog_hash="c", coarse_dims=8))
    assert normal.features.dtype == np.float16 and normal.vectors.dtype == np.float16


def test_a_large_catalogue_scans_its_nearest_lists_and_searches_a_large_subset_through_them(tmp_path: Path) -> None:
    from ffengine.search import IVF_MIN_ROWS, effective_options

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(400, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 400, IVF_MIN_ROWS)] + 0.3 * rng.normal(size=(IVF_MIN_ROWS, 32)).astype(np.float32)
    options = effective_options("shortlist", {"coarse_dims": 16}, IVF_MIN_ROWS)
    assert options == {"coarse_dims": 16, "shortlist": 500, "nprobe": 128}  # a large catalogue's defaults, but the named one
    searcher = Searcher.build(vectors, "shortlist", options)
    assert searcher.factory == "PCA16,IVF2048,PQ16x4fs,Refine(SQfp16)" and searcher.lists.nprobe == 128
    assert searcher.describe() == "500 candidates from 16 4-bit codes of a 16-d PCA copy in the 128 nearest of 2048 lists, re-ranked by their float16 copies"
    queries = vectors[:50] + 0.1
    exact = np.sort(np.linalg.norm(vectors[None] - queries[:, None], axis=2), axis=1)[:, :5]
    dist, _ = searcher.search(queries, 5)
    assert np.mean(dist[:, 4] <= exact[:, 4] * (1 + 1e-3)) >= 0.9  # the 5th found is as near as the exact 5th

    rows = np.arange(0, IVF_MIN_ROWS, 2)  # half the catalogue: through the lists
    near, found = searcher.search_rows(queries, rows, 5)
    flat_d, flat_rows = searcher.search_rows(queries, rows, 5, exact_rows=len(rows))  # the same, scanned
    assert (found % 2 == 0).all() and (flat_rows % 2 == 0).all() and (np.diff(near, axis=1) >= 0).all()
    assert np.mean(near[:, 4] <= flat_d[:, 4] * (1 + 1e-3)) >= 0.9
    few = searcher.search_rows(queries[:1], np.array([7, 70_001, 150_003]), 5)[1]  # fewer rows than asked for: all of them
    assert sorted(few[0].tolist()) == [7, 70_001, 150_003]
