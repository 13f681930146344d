"""The linear map from backbone features to the vectors an index searches, and the recipes that fit one.

Catalogue and query features go through the same :class:`Projection`, so the Euclidean distance
between projected vectors is what the index ranks by; ``train/`` learns a new one from feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Rows projected at a time from features stored in another type (float16): float32 copies stay small.
APPLY_CHUNK_ROWS = 32_768
#: Rows used to fit a PCA (a random subset beyond this: the covariance barely changes, the fit gets slow).
PCA_FIT_ROWS = 20_000


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


#: Most a row may move, relative to its length, when stored in float16 (whose rounding is 2**-11).
FLOAT16_TOLERANCE = 1e-3


def fits_float16(x: np.ndarray, chunk: int = 32_768) -> bool:
    """Whether float16 holds every row of ``x`` within :data:`FLOAT16_TOLERANCE` of its length: not so
    for values beyond +-65504, or rows so short that float16 rounds them to nothing."""
    for start in range(0, len(x), chunk):  # float32 temporaries of a chunk at a time
        rows = np.asarray(x[start : start + chunk], dtype=np.float32)
        moved = np.linalg.norm(rows.astype(np.float16).astype(np.float32) - rows, axis=1)
        if not (moved <= FLOAT16_TOLERANCE * np.linalg.norm(rows, axis=1)).all():
            return False
    return True


def sample_rows(x: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """``x`` itself, or a fixed random subset of ``rows`` of its rows (in order): what a fit needs, reproducibly."""
    if len(x) <= rows:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), rows, replace=False))]


@dataclass(frozen=True, eq=False)
class Projection:
    """``y = (maybe_l2(x) - mean) @ matrix``: backbone features ``(n, D)`` to search vectors ``(n, d)``."""

    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (D, d)
    normalize_input: bool = False

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
        return cls(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32), normalize_input)

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
        """``(n, D)`` backbone features (float32, or float16 as an index stores them) -> ``(n, d)``
        C-contiguous float32 search vectors; float16 ones are converted a chunk of rows at a time."""
        if getattr(feats, "dtype", None) == np.float16 and np.ndim(feats) == 2 and len(feats) > APPLY_CHUNK_ROWS:
            out = np.empty((len(feats), self.out_dim), np.float32)
            for start in range(0, len(feats), APPLY_CHUNK_ROWS):
                out[start : start + APPLY_CHUNK_ROWS] = self.apply(feats[start : start + APPLY_CHUNK_ROWS])
            return out
        x = as_features(feats, self.in_dim)
        if self.normalize_input:
            x = l2_normalize(x)
        if not self.is_identity:
            x = (x - self.mean) @ self.matrix
        return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class Reduction:
    """A recipe for a :class:`Projection`, fitted on a catalogue's features: L2-normalise or not, then
    keep the ``dims`` principal axes (``None``: every dimension, no PCA)."""

    dims: int | None = None
    normalize_input: bool = False

    def label(self) -> str:
        return ("l2" if self.normalize_input else "raw") + (f"+pca{self.dims}" if self.dims else "+full")

    def fit(self, feats: np.ndarray, *, seed: int = 0, max_rows: int = PCA_FIT_ROWS) -> Projection:
        """Fit on ``feats`` (n, D): FAISS's PCA on a fixed random subset of at most ``max_rows`` rows."""
        import faiss  # only a PCA needs it: loading an index or the identity does not

        feats = np.ascontiguousarray(feats, dtype=np.float32)
        dim = feats.shape[1]
        if self.dims is None:
            return Projection.identity(dim, normalize_input=self.normalize_input)
        if not 1 <= self.dims <= dim:
            raise ValueError(f"PCA dims must be in 1..{dim}, got {self.dims}")
        if len(feats) < 2:
            raise ValueError("a PCA needs at least 2 catalogue vectors")
        x = sample_rows(l2_normalize(feats) if self.normalize_input else feats, max_rows, seed)
        pca = faiss.PCAMatrix(dim, self.dims)
        pca.train(np.ascontiguousarray(x))
        matrix = faiss.vector_to_array(pca.A).reshape(self.dims, dim).T  # FAISS keeps (d, D)
        return Projection(faiss.vector_to_array(pca.mean), matrix, self.normalize_input)


#: What ``write_index(projection=None)`` uses; chosen from bench/quality.py and bench/index_speed.py (see docs/benchmarks.md).
DEFAULT_REDUCTION = Reduction(dims=None, normalize_input=True)
