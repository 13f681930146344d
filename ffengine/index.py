"""The product index: catalogue features on disk, searched by Euclidean distance.

An index is a directory (see docs/ARCHITECTURE.md)::

    manifest.json          what made it: model fingerprint, dims, backend, catalogue hash, sha256 of every file
    features.npy           raw backbone features (n, 1280), so train/ can re-project without re-reading images
    vectors.npy            the searched vectors: ``projection.apply(features)`` (n, d)
    projection_mean.npy    (1280,)   } the reduction applied to catalogue and query features alike
    projection_matrix.npy  (1280, d) }
    products.jsonl         one ``Product.to_json()`` per line, row order = vector order

Nothing in it is executable: arrays load with ``np.load(allow_pickle=False)``, the rest is JSON,
and search structures are rebuilt at load instead of being unpickled. Writes are atomic: the new
index is written to a sibling ``<out>.tmp-XXXX`` directory, fsynced, then swapped in by rename,
so :meth:`Index.load` never sees a half-written directory.

Search is Euclidean in the projected space. Backends: ``shortlist`` (default: a few hundred
candidates from compact codes of a PCA copy, scanned with FAISS's 4-bit product-quantisation
fast-scan kernels, then re-ranked exactly), ``balltree`` (scikit-learn's BallTree, as in the
study) and ``exact`` (brute force, the yardstick). README and bench/index_speed.py say why the
default is what it is.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ffengine.catalog import Product
from ffengine.errors import FFError, IndexLoadError, WeightsError
from ffengine.prior import Priors

log = logging.getLogger(__name__)

FORMAT = "ffengine-index"
#: ``ffengine.weights.fingerprint``: weights hash, then preprocessing hash.
FINGERPRINT = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")
VERSION = 2
ARRAY_FILES = ("features.npy", "vectors.npy", "projection_mean.npy", "projection_matrix.npy")
PRODUCTS_FILE = "products.jsonl"
MANIFEST_FILE = "manifest.json"
#: Rows used to fit a PCA (a random subset beyond this: the covariance barely changes, the fit gets slow).
PCA_FIT_ROWS = 20_000
#: Scratch memory for exact re-ranking (bytes of gathered candidate vectors at a time).
RERANK_BLOCK_BYTES = 16 << 20
#: A ``<index>.tmp-*`` directory untouched for this long is a crashed write's leftover (seconds).
STALE_TMP_SECONDS = 3600
#: Rows for the shortlist's PCA, fitted at every load (it only picks candidates, so a sample will do).
COARSE_FIT_ROWS = 2_000
#: Fewest rows worth product quantisation: FAISS trains 16 centroids per subspace and wants ~40
#: rows per centroid; below this a float scan of the PCA copy is cheap anyway.
PQ_MIN_ROWS = 1_000


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def as_features(feats: np.ndarray, dim: int, what: str = "features") -> np.ndarray:
    """``(m, dim)`` C-contiguous float32, or a ValueError naming the shape."""
    arr = np.ascontiguousarray(feats, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape (m, {dim}), got {np.shape(feats)}")
    return arr


@dataclass(frozen=True, eq=False)
class Projection:
    """``y = (maybe_l2(x) - mean) @ matrix``, then optionally L2-normalised.

    Applied to catalogue and query features alike, so Euclidean distance in the
    projected space is what the index ranks by.
    """

    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (D, d)
    normalize_input: bool = False
    normalize_output: bool = False

    def __post_init__(self) -> None:
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        matrix = np.ascontiguousarray(self.matrix, dtype=np.float32)
        if mean.ndim != 1 or matrix.ndim != 2 or matrix.shape[0] != mean.shape[0] or matrix.shape[1] < 1:
            raise ValueError(f"projection needs mean (D,) and matrix (D, d); got {mean.shape} and {matrix.shape}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "matrix", matrix)
        identity = matrix.shape[0] == matrix.shape[1] and not mean.any() and np.array_equal(matrix, np.eye(len(mean), dtype=np.float32))
        object.__setattr__(self, "_identity", identity)

    @classmethod
    def identity(cls, dim: int, *, normalize_input: bool = False) -> Projection:
        """Keep the features as they are (optionally L2-normalised): the study's 1280-d search."""
        return cls(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32), normalize_input, False)

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def is_identity(self) -> bool:
        return bool(self._identity)  # type: ignore[attr-defined]

    def apply(self, feats: np.ndarray) -> np.ndarray:
        """``(n, D)`` backbone features -> ``(n, d)`` C-contiguous float32 search vectors."""
        x = as_features(feats, self.in_dim)
        if self.normalize_input:
            x = l2_normalize(x)
        if not self.is_identity:
            x = (x - self.mean) @ self.matrix
        if self.normalize_output:
            x = l2_normalize(x)
        return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Reduction:
    """A recipe for a :class:`Projection`, fitted on a catalogue's features.

    ``dims=None`` keeps every dimension (no PCA); ``whiten`` divides each principal
    axis by its standard deviation.
    """

    dims: int | None = None
    normalize_input: bool = False
    whiten: bool = False
    normalize_output: bool = False

    def label(self) -> str:
        parts = ["l2" if self.normalize_input else "raw", f"pca{self.dims}" if self.dims else "full"]
        if self.whiten:
            parts.append("whiten")
        if self.normalize_output:
            parts.append("l2out")
        return "+".join(parts)

    def fit(self, feats: np.ndarray, *, seed: int = 0, max_rows: int = PCA_FIT_ROWS) -> Projection:
        """Fit on ``feats`` (n, D): PCA on a fixed random subset of at most ``max_rows`` rows."""
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        dim = feats.shape[1]
        if self.dims is None:
            if self.whiten or self.normalize_output:
                raise ValueError("whiten/normalize_output need a PCA (set dims)")
            return Projection.identity(dim, normalize_input=self.normalize_input)
        if not 1 <= self.dims <= dim:
            raise ValueError(f"PCA dims must be in 1..{dim}, got {self.dims}")
        if len(feats) < 2:
            raise ValueError("a PCA needs at least 2 catalogue vectors")
        x = l2_normalize(feats) if self.normalize_input else feats
        if len(x) > max_rows:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]
        mean = x.mean(axis=0, dtype=np.float64)
        centred = (x - mean.astype(np.float32)).astype(np.float32)
        if len(centred) < dim:  # few rows: the SVD of the data is cheaper than the covariance's eigh
            _, sing, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
            eigval, eigvec = sing**2, vt.T
        else:
            eigval, eigvec = np.linalg.eigh((centred.T @ centred).astype(np.float64))
        eigval = eigval / max(len(x) - 1, 1)
        order = np.argsort(eigval)[::-1][: self.dims]
        matrix = eigvec[:, order]
        if self.whiten:
            matrix = matrix / np.sqrt(np.maximum(eigval[order], 1e-12))
        # eigenvector signs are arbitrary; fix them so that refits are reproducible
        signs = np.sign(matrix[np.abs(matrix).argmax(axis=0), np.arange(matrix.shape[1])])
        matrix = matrix * np.where(signs == 0, 1.0, signs)
        return Projection(mean.astype(np.float32), matrix.astype(np.float32), self.normalize_input, self.normalize_output)


#: What ``write_index(projection=None)`` uses; chosen from bench/quality.py and bench/index_speed.py (see README).
DEFAULT_REDUCTION = Reduction(dims=None, normalize_input=True)


class Searcher(Protocol):
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class ExactSearcher:
    """Brute force: every query against every vector (the yardstick the others are measured against)."""

    def __init__(self, vectors: np.ndarray, sq_norms: np.ndarray | None = None) -> None:
        self.vectors = vectors
        self.sq_norms = squared_norms(vectors) if sq_norms is None else sq_norms

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        """The ``c`` nearest rows per query, unordered (no exact re-rank)."""
        return nearest_rows(self.vectors, queries, c, self.sq_norms)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(self.vectors, queries, k, self.sq_norms)


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    """``(n,)`` squared lengths of the rows of ``vectors`` (n, d)."""
    return np.einsum("ij,ij->i", vectors, vectors)


def nearest_rows(vectors: np.ndarray, queries: np.ndarray, c: int, sq_norms: np.ndarray) -> np.ndarray:
    """``(m, c)`` rows with the smallest ``|v|^2 - 2 q.v`` (= squared distance minus ``|q|^2``), unordered."""
    n = len(vectors)
    c = min(c, n)
    out = np.empty((len(queries), c), np.int64)
    step = max(1, (32 << 20) // max(n * 4, 1))  # ~32 MB of scores at a time
    for start in range(0, len(queries), step):
        scores = sq_norms[None, :] - 2.0 * (queries[start : start + step] @ vectors.T)
        if c < n:
            out[start : start + step] = np.argpartition(scores, c - 1, axis=1)[:, :c]
        else:
            out[start : start + step] = np.arange(n)
    return out


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, sq_norms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of ``vectors`` for each query, ascending distance (ties: lower row first).

    Candidates come from the ``|v|^2 - 2 q.v`` expansion; their distances are then
    recomputed from differences so that near-duplicates get exact (tiny) distances.
    """
    if sq_norms is None:
        sq_norms = squared_norms(vectors)
    k = min(k, len(vectors))
    return rerank(vectors, queries, nearest_rows(vectors, queries, k, sq_norms), k)


class BallTreeSearcher:
    """scikit-learn's BallTree, Euclidean, as in the study; rebuilt from the vectors at load."""

    def __init__(self, vectors: np.ndarray, leaf_size: int = 40) -> None:
        from sklearn.neighbors import BallTree

        self.tree = BallTree(vectors, leaf_size=leaf_size, metric="euclidean")

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        return self.tree.query(queries, k=min(c, self.tree.data.shape[0]), return_distance=False).astype(np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self.tree.query(queries, k=min(k, self.tree.data.shape[0]), return_distance=True, sort_results=True)
        return dist.astype(np.float32), idx.astype(np.int64)


class PQSearcher:
    """FAISS ``IndexPQFastScan``: ``subspaces`` 4-bit codes per vector, scanned with SIMD lookup tables.

    Scores are approximate (a candidate source, never an answer): a 44k x 128 float copy is
    22 MB to stream per query, its 64 four-bit codes 1.4 MB. Rebuilt (trained) at every load,
    like the BallTree, so nothing FAISS-specific is ever read from disk.
    """

    def __init__(self, vectors: np.ndarray, subspaces: int) -> None:
        import faiss

        self.index = faiss.IndexPQFastScan(vectors.shape[1], subspaces, 4)
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index.train(data)
        self.index.add(data)

    def candidates(self, queries: np.ndarray, c: int) -> np.ndarray:
        """The ``c`` rows with the smallest approximate distance per query."""
        _, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(c, self.index.ntotal))
        return rows.astype(np.int64)


class ShortlistSearcher:
    """Candidates from a PCA of the vectors, then their exact distances in the full vector space.

    A search reads every vector it scores; at 44k x 1280 that is 227 MB per query. Scoring a
    ``coarse_dims`` PCA copy instead (:func:`quick_pca`, fitted here, at load) and re-ranking
    ``shortlist`` candidates exactly gives the exact answer whenever the true neighbours make the
    shortlist; bench/index_speed.py measures how often (recall@5). ``inner`` searches the PCA
    copy: product-quantised codes (:class:`PQSearcher`), brute force or a BallTree.
    """

    def __init__(
        self, vectors: np.ndarray, coarse_dims: int, shortlist: int, inner: Any = ExactSearcher, sq_norms: np.ndarray | None = None
    ) -> None:
        self.vectors = vectors
        self.sq_norms = squared_norms(vectors) if sq_norms is None else sq_norms
        self.shortlist = shortlist
        self.coarse = quick_pca(vectors, coarse_dims)
        self.inner = inner(self.coarse.apply(vectors))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.vectors))
        cand = self.inner.candidates(self.coarse.apply(queries), max(self.shortlist, k))
        return rerank(self.vectors, queries, cand, k, self.sq_norms)


def quick_pca(vectors: np.ndarray, dims: int, rows: int = COARSE_FIT_ROWS, seed: int = 0) -> Projection:
    """The top ``dims`` principal axes of a fixed sample, by randomized SVD: cheap enough to redo at every load.

    It only picks candidates (the re-rank is exact), so an approximate fit costs nothing in the answer.
    """
    from sklearn.utils.extmath import randomized_svd

    sample = vectors if len(vectors) <= rows else vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), rows, replace=False))]
    mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    _, _, vt = randomized_svd(sample - mean, dims, n_iter=2, random_state=seed)
    return Projection(mean, vt.T.astype(np.float32))


def rerank(
    vectors: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int, sq_norms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of each query's candidate rows, ascending distance (ties: lower row first).

    With more candidates than ``k`` (and ``sq_norms``, the vectors' squared lengths) they are first
    scored by ``|v|^2 - 2 q.v``, one matrix-vector product; the best ``k`` then get distances from
    differences, exact also for near-duplicates. Work is done in blocks of about
    :data:`RERANK_BLOCK_BYTES` so that memory stays flat for any candidate count.
    """
    if sq_norms is not None and cand.shape[1] > k:
        scores = np.empty(cand.shape, np.float32)
        for rows, cols in blocks(cand.shape, vectors.shape[1]):
            c = cand[rows, cols]
            gathered = vectors[c]  # (m, c, d)
            scores[rows, cols] = sq_norms[c] - 2.0 * np.matmul(gathered, queries[rows, :, None])[..., 0]
        cand = np.take_along_axis(cand, np.argpartition(scores, k - 1, axis=1)[:, :k], 1)
    d = np.empty(cand.shape, np.float32)
    for rows, cols in blocks(cand.shape, vectors.shape[1]):
        diffs = vectors[cand[rows, cols]] - queries[rows, None, :]
        d[rows, cols] = np.sqrt(np.einsum("mkd,mkd->mk", diffs, diffs))
    order = np.lexsort((cand, d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(cand, order, 1)


def blocks(shape: tuple[int, int], dim: int) -> list[tuple[slice, slice]]:
    """(query rows, candidate columns) blocks gathering about :data:`RERANK_BLOCK_BYTES` of vectors each."""
    m, c = shape
    per_block = max(1, RERANK_BLOCK_BYTES // (4 * dim))
    col_step = max(1, min(c, per_block))
    row_step = max(1, per_block // col_step)
    return [(slice(r, r + row_step), slice(j, j + col_step)) for r in range(0, m, row_step) for j in range(0, c, col_step)]


#: Options each backend takes (``write_index(**options)``), with their smallest allowed value.
BACKEND_OPTIONS: dict[str, dict[str, int]] = {
    "shortlist": {"coarse_dims": 1, "shortlist": 1, "pq_subspaces": 0},
    "balltree": {"leaf_size": 1, "coarse_dims": 1, "shortlist": 1},
    "exact": {},
}
BACKENDS = tuple(BACKEND_OPTIONS)
#: What an index uses unless told otherwise; chosen from bench/index_speed.py (see README).
DEFAULT_BACKEND = "shortlist"
#: A backend's options when the caller names none (``coarse_dims=None``: no PCA shortlist, search the
#: vectors; ``pq_subspaces``: 4-bit codes per vector, ``None`` = one per two PCA dimensions, ``0`` = scan
#: the PCA copy as floats instead).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "shortlist": {"coarse_dims": 128, "shortlist": 400, "pq_subspaces": None},
    "balltree": {"leaf_size": 40, "coarse_dims": None, "shortlist": 400},
    "exact": {},
}


def effective_options(backend: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The backend's defaults overridden by ``options``."""
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    merged = {**DEFAULT_OPTIONS[backend], **(options or {})}
    check_options(backend, merged)
    return merged


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Refuse an unknown backend, an option it does not take, or a value out of range."""
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    allowed = BACKEND_OPTIONS[backend]
    for name, value in options.items():
        if name not in allowed:
            raise ValueError(f"backend {backend!r} takes no option {name!r} (it takes: {', '.join(allowed) or 'none'})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < allowed[name]):
            raise ValueError(f"option {name} must be a whole number >= {allowed[name]}, got {value!r}")
    coarse, subspaces = options.get("coarse_dims"), options.get("pq_subspaces")
    if coarse and subspaces and coarse % subspaces:
        raise ValueError(f"pq_subspaces ({subspaces}) must divide coarse_dims ({coarse})")


def pq_subspaces(dims: int) -> int:
    """Default code size: one 4-bit code per two dimensions (per dimension when ``dims`` is odd)."""
    return dims // 2 if dims % 2 == 0 else dims


def make_searcher(backend: str, vectors: np.ndarray, options: dict[str, Any], sq_norms: np.ndarray | None = None) -> Searcher:
    """The searcher for ``backend``; a PCA shortlist only when it is smaller than the vectors.

    ``sq_norms``: the vectors' squared lengths when the caller has them already (not computed twice).
    """
    options = effective_options(backend, options)
    if backend == "exact":
        return ExactSearcher(vectors, sq_norms)
    inner: Any = ExactSearcher
    if backend == "balltree":
        leaf = int(options["leaf_size"])
        inner = lambda data: BallTreeSearcher(data, leaf)  # noqa: E731
    coarse = options.get("coarse_dims")
    if backend == "shortlist" and coarse and options["pq_subspaces"] != 0 and len(vectors) >= PQ_MIN_ROWS:
        subspaces = options["pq_subspaces"] or pq_subspaces(coarse)
        inner = lambda data: PQSearcher(data, subspaces)  # noqa: E731
    if coarse and coarse < min(vectors.shape):
        return ShortlistSearcher(vectors, int(coarse), int(options["shortlist"]), inner, sq_norms)
    return inner(vectors) if backend == "balltree" else ExactSearcher(vectors, sq_norms)


class Index:
    """Catalogue vectors + products + the projection and model fingerprint that made them."""

    def __init__(
        self,
        features: np.ndarray,
        products: Sequence[Product],
        *,
        fingerprint: str,
        projection: Projection,
        backend: str = DEFAULT_BACKEND,
        manifest: dict[str, Any] | None = None,
        vectors: np.ndarray | None = None,
        path: Path | None = None,
        options: dict[str, Any] | None = None,
        priors: Priors | None = None,
    ) -> None:
        self.features = as_features(features, projection.in_dim, "catalogue features")
        if len(self.features) != len(products):
            raise ValueError(f"{len(self.features)} feature rows but {len(products)} products")
        if len(products) == 0:
            raise ValueError("an index needs at least one product")
        self.products = list(products)
        self.projection = projection
        self.vectors = projection.apply(self.features) if vectors is None else vectors
        self.sq_norms = squared_norms(self.vectors)
        self.fingerprint = fingerprint
        self.backend = backend
        self.options = effective_options(backend, options)
        self.path = path
        self.manifest = manifest or {}
        self.searcher = make_searcher(backend, self.vectors, self.options, self.sq_norms)
        if priors is not None and len(priors.product_group) != len(self.products):
            raise ValueError(f"priors cover {len(priors.product_group)} products, the index holds {len(self.products)}")
        self.priors = priors

    def __len__(self) -> int:
        return len(self.products)

    @property
    def dim(self) -> int:
        """Backbone feature dimension a query must have."""
        return self.projection.in_dim

    def search(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(m, 1280)`` backbone features -> ``(dist (m, k) float32, idx (m, k) int64)``, nearest first.

        ``k`` is capped at ``len(index)``.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self.searcher.search(self.projection.apply(as_features(feats, self.dim, "query features")), k)

    def search_rows(self, feats: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search restricted to ``rows`` (e.g. a filter's matches); returns index-wide row numbers."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            m = len(as_features(feats, self.dim, "query features"))
            return np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
        queries = self.projection.apply(as_features(feats, self.dim, "query features"))
        cand = np.broadcast_to(rows, (len(queries), len(rows)))  # no copy of the rows' vectors
        return rerank(self.vectors, queries, cand, min(k, len(rows)), self.sq_norms)

    @classmethod
    def load(cls, path: str | os.PathLike[str], expect_fingerprint: str | None = None) -> Index:
        """Read an index directory; :class:`IndexLoadError` if missing, corrupt or made by another model."""
        return load_index(Path(path), expect_fingerprint)


# ---------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_durable(path: Path, write: Any) -> None:
    """Create ``path``, let ``write(fh)`` fill it, and fsync before returning."""
    with path.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_index(
    out_dir: str | os.PathLike[str],
    features: np.ndarray,
    products: Sequence[Product],
    *,
    fingerprint: str,
    catalog_hash: str,
    backend: str = DEFAULT_BACKEND,
    projection: Projection | Reduction | None = None,
    priors: Priors | None = None,
    preprocess: dict[str, Any] | None = None,
    weights: dict[str, str] | None = None,
    **options: Any,
) -> Path:
    """Write an index directory atomically and return its path.

    ``priors`` (:func:`ffengine.prior.fit_priors`) are stored beside the vectors; ``preprocess``
    (the model's, as JSON) is recorded so that an index made with other preprocessing is named as such;
    ``weights`` (:func:`weights_record`) so that the index can be used without naming its weights again.

    ``projection`` is a fitted :class:`Projection`, a :class:`Reduction` to fit on
    ``features``, or ``None`` for :data:`DEFAULT_REDUCTION`. ``options`` are backend
    options (``coarse_dims`` and ``shortlist``; ``leaf_size`` for the BallTree; defaults in
    :data:`DEFAULT_OPTIONS`) and are recorded in the manifest.
    """
    options = effective_options(backend, options)
    out = Path(out_dir)
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"catalogue features must have shape (n, D), got {features.shape}")
    if len(features) != len(products) or len(products) == 0:
        raise ValueError(f"need one feature row per product and at least one product; got {len(features)} rows, {len(products)} products")
    recipe = DEFAULT_REDUCTION if projection is None else projection
    if isinstance(recipe, Reduction):
        if recipe.dims is not None and recipe.dims > min(features.shape):
            recipe = Reduction(None, recipe.normalize_input)  # too few products for a PCA of that size
        proj = recipe.fit(features)
    else:
        proj = recipe
    vectors = proj.apply(features)
    if not np.isfinite(vectors).all():
        raise ValueError("catalogue features contain NaN or infinity")
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise FFError(f"{out} exists and is not an index (no {MANIFEST_FILE}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        arrays = {
            "features.npy": features,
            "vectors.npy": vectors,
            "projection_mean.npy": proj.mean,
            "projection_matrix.npy": proj.matrix,
            **(priors.arrays() if priors is not None else {}),
        }
        for name, arr in arrays.items():
            write_durable(tmp / name, lambda fh, a=arr: np.save(fh, a, allow_pickle=False))
        lines = "".join(json.dumps(p.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for p in products)
        write_durable(tmp / PRODUCTS_FILE, lambda fh: fh.write(lines.encode("utf-8")))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint,
            "dim": proj.in_dim,
            "vector_dim": proj.out_dim,
            "count": len(products),
            "backend": backend,
            "options": options,
            "projection": {
                "normalize_input": proj.normalize_input,
                "normalize_output": proj.normalize_output,
                "recipe": asdict(recipe) if isinstance(recipe, Reduction) else None,
            },
            "catalog_hash": catalog_hash,
            "preprocess": preprocess,
            "weights": weights,
            "priors": priors.to_json() if priors is not None else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {name: sha256_file(tmp / name) for name in (*arrays, PRODUCTS_FILE)},
        }
        manifest["checksum"] = manifest_checksum(manifest)
        write_durable(tmp / MANIFEST_FILE, lambda fh: fh.write(json.dumps(manifest, indent=2, sort_keys=True).encode()))
        fsync_dir(tmp)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_tmp(out)
    return out


def remove_stale_tmp(out: Path, min_age_s: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete ``<out>.tmp-*`` directories that crashed writes left behind; returns what went.

    Only those untouched for ``min_age_s``: a write in progress (another process) is younger,
    since the features are computed before its directory is created.
    """
    removed = []
    now = time.time()
    for leftover in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        try:
            if leftover.is_dir() and not leftover.is_symlink() and now - leftover.stat().st_mtime > min_age_s:
                shutil.rmtree(leftover)
                removed.append(leftover)
        except OSError as exc:  # gone already, or not ours to delete: leave it
            log.debug("cannot remove %s: %s", leftover, exc)
    if removed:
        log.info("removed %d leftover(s) of interrupted index writes next to %s", len(removed), out)
    return removed


def old_path(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``: ``out -> out.old``, ``tmp -> out``, then drop ``out.old``.

    A crash between the two renames leaves ``out.old`` complete; :func:`load_index` falls back to it.
    A leftover ``out.old`` is only deleted while a live ``out`` exists: when a crash left ``out.old``
    alone, it is the last good copy and stays until the new index is in place.
    """
    old = old_path(out)
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- loading


def load_index(path: Path, expect_fingerprint: str | None = None) -> Index:
    if not (path / MANIFEST_FILE).is_file():
        old = old_path(path)
        if (old / MANIFEST_FILE).is_file():
            log.warning("index %s is missing; using %s left by an interrupted update", path, old)
            path = old
        elif path.is_dir():
            raise IndexLoadError(f"{path} is not an index: {MANIFEST_FILE} is missing. Build one with `ffengine index build`.")
        else:
            raise IndexLoadError(f"No index at {path}. Build one with `ffengine index build --catalog CSV --out {path}`.")
    manifest = read_manifest(path)
    fingerprint = manifest["fingerprint"]
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise IndexLoadError(model_mismatch(str(path), fingerprint, manifest.get("preprocess"), expect_fingerprint))
    files = manifest["files"]
    prior_files = Priors.file_names(manifest["priors"]) if manifest.get("priors") else []
    for name in (*ARRAY_FILES, *prior_files, PRODUCTS_FILE):
        file = path / name
        if not file.is_file():
            raise IndexLoadError(f"Index {path} is incomplete: {name} is missing. Rebuild it with `ffengine index build`.")
        if sha256_file(file) != files.get(name):
            raise IndexLoadError(f"Index {path} is corrupt: {name} does not match its checksum in {MANIFEST_FILE}. Rebuild it.")
    arrays = {name: read_array(path / name) for name in ARRAY_FILES}
    n, dim, vdim = manifest["count"], manifest["dim"], manifest["vector_dim"]
    expected = {"features.npy": (n, dim), "vectors.npy": (n, vdim), "projection_mean.npy": (dim,), "projection_matrix.npy": (dim, vdim)}
    for name, shape in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != np.float32:
            raise IndexLoadError(f"Index {path} is corrupt: {name} is {arrays[name].dtype}{arrays[name].shape}, expected float32{shape}.")
    products = read_products(path / PRODUCTS_FILE)
    if len(products) != n:
        raise IndexLoadError(f"Index {path} is corrupt: {len(products)} products for {n} vectors.")
    proj_meta = manifest["projection"]
    try:
        projection = Projection(
            arrays["projection_mean.npy"],
            arrays["projection_matrix.npy"],
            bool(proj_meta["normalize_input"]),
            bool(proj_meta["normalize_output"]),
        )
        priors = Priors.from_files(manifest["priors"], lambda name: read_array(path / name), n) if prior_files else None
        return Index(
            arrays["features.npy"],
            products,
            fingerprint=fingerprint,
            projection=projection,
            backend=manifest["backend"],
            manifest=manifest,
            vectors=arrays["vectors.npy"],
            path=path,
            options=manifest.get("options") or {},
            priors=priors,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexLoadError(f"Index {path} is corrupt: {exc}") from None


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``checksum``: an edited option is caught
    like an edited file (the file hashes alone leave ``options`` and ``projection`` unguarded)."""
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_mismatch(where: str, index_fingerprint: str, index_preprocess: Any, model_fingerprint: str) -> str:
    """Why an index and a model do not go together, and what to do (fingerprint = weights hash + preprocessing)."""
    same_weights = [FINGERPRINT.fullmatch(f) for f in (index_fingerprint, model_fingerprint)]
    if all(same_weights) and index_fingerprint[:16] == model_fingerprint[:16]:
        fit = index_preprocess.get("fit", "crop") if isinstance(index_preprocess, dict) else "crop"
        return (
            f"Index {where} was built by these weights with other preprocessing (fit={fit!r}; fingerprint {index_fingerprint}, "
            f"the loaded model is {model_fingerprint}). Its features cannot be mixed with this model's: rebuild it with `ffengine index build`."
        )
    return (
        f"Index {where} was built by another model (fingerprint {index_fingerprint}, the loaded model is {model_fingerprint}). "
        "Rebuild it with the same weights (`ffengine index build --weights ...`) or use the index made for these weights."
    )


def weights_record(source: str) -> dict[str, str] | None:
    """What a manifest records of the weights an index is built with (``Embedder.source``): a local
    file's absolute path and sha256, a download's URL; ``None`` for anything else (a random init)."""
    if source.startswith(("https://", "http://")):
        return {"url": source}
    path = Path(source).expanduser()
    return {"path": str(path.resolve()), "sha256": sha256_file(path)} if path.is_file() else None


def recorded_weights(path: Path) -> str | None:
    """The weights spec for the index at ``path`` as its manifest records them: the file (checked to be
    the one the index was built with) or the torchvision name of the download; ``None`` without an
    index or a record. :class:`WeightsError` says which file is needed when it has moved or changed."""
    if not (path / MANIFEST_FILE).is_file():
        return None
    record = read_manifest(path).get("weights")
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("url"), str):
        return torchvision_name(record["url"])
    file, digest = Path(str(record.get("path"))), record.get("sha256")
    fix = (
        "Point --weights FILE or FFENGINE_WEIGHTS at that file (a copy with its .json sidecar will do), "
        "or rebuild the index with `ffengine index build --weights FILE`."
    )
    if not file.is_file():
        raise WeightsError(f"Index {path} was built with the weights file {file} (sha256 {digest}), which is not there any more. {fix}")
    if sha256_file(file) != digest:
        raise WeightsError(f"Index {path} was built with the weights file {file} (sha256 {digest}), which has changed since. {fix}")
    return str(file)


def torchvision_name(url: str) -> str | None:
    """The torchvision weights name (``IMAGENET1K_V2``) that downloads from ``url``, if any."""
    from torchvision.models import MobileNet_V2_Weights

    return next((w.name for w in MobileNet_V2_Weights if w.url == url), None)


def read_manifest(path: Path) -> dict[str, Any]:
    where = path / MANIFEST_FILE
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IndexLoadError(f"Index {path} is corrupt: {MANIFEST_FILE} is not readable JSON ({exc}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexLoadError(f"{path} is not an ffengine index ({MANIFEST_FILE} has no format {FORMAT!r}).")
    if manifest.get("version") != VERSION:
        raise IndexLoadError(f"Index {path} has format version {manifest.get('version')!r}; this program reads version {VERSION}. Rebuild it.")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise IndexLoadError(f"Index {path} is corrupt: {MANIFEST_FILE} was changed after it was written (checksum mismatch). Rebuild it.")
    required = {"fingerprint": str, "dim": int, "vector_dim": int, "count": int, "backend": str, "projection": dict, "files": dict}
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise IndexLoadError(f"Index {path} is corrupt: {MANIFEST_FILE} lacks a valid {key!r}.")
    if manifest["backend"] not in BACKENDS:
        raise IndexLoadError(f"Index {path} uses backend {manifest['backend']!r}; this program knows {', '.join(BACKENDS)}.")
    return manifest


def read_array(file: Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise IndexLoadError(f"Index {file.parent} is corrupt: cannot read {file.name} ({exc}).") from None


def read_products(file: Path) -> list[Product]:
    products = []
    with file.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                products.append(Product.from_json(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:
                raise IndexLoadError(f"Index {file.parent} is corrupt: {file.name} line {number} is not a product ({exc}).") from None
    return products
