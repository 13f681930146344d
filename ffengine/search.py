"""Searching an index's vectors with FAISS: exactly, or through a shortlist re-ranked by float16 copies.

``shortlist`` (the default) is FAISS's ``PCA{c},PQ{c/2}x4fs,Refine(SQfp16)``: four-bit codes of a PCA
copy of the vectors, scanned with SIMD lookup tables, pick ``shortlist`` candidates whose distances to
the vectors kept in float16 give the answer; bench/index_speed.py measures how often that is the exact
one. ``exact`` is a flat float32 scan. FAISS holds the vectors: :attr:`Searcher.vectors` is a view of
its storage (float16 for a shortlist), not a second copy. Version-3 indexes re-rank float32 vectors
(``RFlat``) and are still read.
Distances are Euclidean (not squared); ties go to the lower row. FAISS is imported on first use, so
that commands which never search start without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ffengine.projection import fits_float16, sample_rows

if TYPE_CHECKING:
    from pathlib import Path

    import faiss

#: Options each backend takes (``write_index(**options)``), with their smallest allowed value.
BACKEND_OPTIONS: dict[str, dict[str, int]] = {"shortlist": {"coarse_dims": 1, "shortlist": 1}, "exact": {}}
BACKENDS = tuple(BACKEND_OPTIONS)
#: What an index uses unless told otherwise; chosen from bench/index_speed.py (see docs/benchmarks.md).
DEFAULT_BACKEND = "shortlist"
#: A backend's options when the caller names none.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"shortlist": {"coarse_dims": 128, "shortlist": 400}, "exact": {}}
#: Fewest rows worth product quantisation: FAISS trains 16 centroids per subspace and wants ~40
#: rows per centroid; below this an exact scan is cheap anyway.
PQ_MIN_ROWS = 1_000
#: Rows the PCA and the codes are trained on: a fixed random subset beyond this (the PCA barely
#: changes, and FAISS's k-means samples 4,096 rows per subspace whatever it is given).
TRAIN_ROWS = 10_000


def effective_options(backend: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The backend's defaults overridden by ``options``; ValueError for an unknown backend, an option
    it does not take or a value out of range, before anything is built or written."""
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    allowed = BACKEND_OPTIONS[backend]
    merged = {**DEFAULT_OPTIONS[backend], **(options or {})}
    for name, value in merged.items():
        if name not in allowed:
            raise ValueError(f"backend {backend!r} takes no option {name!r} (it takes: {', '.join(allowed) or 'none'})")
        if isinstance(value, bool) or not isinstance(value, int) or value < allowed[name]:
            raise ValueError(f"option {name} must be a whole number >= {allowed[name]}, got {value!r}")
    return merged


def factory_string(coarse_dims: int) -> str:
    """The FAISS index of the shortlist: one 4-bit code per two PCA dimensions (per dimension when
    ``coarse_dims`` is odd, as the code count must divide them), the vectors kept in float16 for re-ranking
    (half the bytes of float32 to hash and page in; the distances differ by float16's rounding, ~1e-3)."""
    codes = coarse_dims // 2 if coarse_dims % 2 == 0 else coarse_dims
    return f"PCA{coarse_dims},PQ{codes}x4fs,Refine(SQfp16)"


def is_fp16(index: faiss.Index) -> bool:
    """Whether ``index`` is a scalar quantiser storing each dimension as float16."""
    import faiss

    return isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16


class Searcher:
    """A FAISS index over the search vectors, and how many candidates its shortlist re-ranks (``None``: exact)."""

    def __init__(self, index: faiss.Index, shortlist: int | None) -> None:
        import faiss

        self.index = index
        self.shortlist = shortlist
        self.flat = faiss.downcast_index(index.refine_index) if shortlist else index
        n, d = self.flat.ntotal, self.flat.d
        if is_fp16(self.flat):  # the refine stage's codes are the vectors in float16
            self.vectors = faiss.rev_swig_ptr(self.flat.codes.data(), n * d * 2).view(np.float16).reshape(n, d)
        else:
            self.vectors = faiss.rev_swig_ptr(self.flat.get_xb(), n * d).reshape(n, d)
        self.vectors.flags.writeable = False

    @classmethod
    def build(cls, vectors: np.ndarray, backend: str, options: dict[str, Any]) -> Searcher:
        """Train and fill a new FAISS index (``options`` as :func:`effective_options` returns them)."""
        import faiss

        n, d = vectors.shape
        coarse = options.get("coarse_dims", d)
        if backend == "exact" or n < PQ_MIN_ROWS or coarse >= d:
            index = faiss.IndexFlatL2(d)
        else:
            factory = factory_string(coarse)
            if not fits_float16(vectors):  # re-ranked in float32 where float16 cannot hold the vectors
                factory = factory.replace("Refine(SQfp16)", "RFlat")
            index = faiss.index_factory(d, factory)
            index.train(sample_rows(vectors, TRAIN_ROWS))
        index.add(vectors)
        return cls(index, options["shortlist"] if isinstance(index, faiss.IndexRefine) else None)

    @classmethod
    def read(cls, path: Path, options: dict[str, Any]) -> Searcher:
        """The FAISS index :meth:`write` wrote, in FAISS's own format (data, not code: nothing is unpickled).
        Its vectors stay in the file, paged in on use (FAISS >= 1.11 maps them; older versions read them)."""
        import faiss

        try:
            index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        except RuntimeError as exc:
            raise ValueError(f"{path.name} is not a FAISS index ({str(exc).splitlines()[0]})") from None
        if isinstance(index, faiss.IndexRefine) and index.metric_type == faiss.METRIC_L2:
            refine = faiss.downcast_index(index.refine_index)  # float16 (version 4) or float32 (version 3)
            if is_fp16(refine) or isinstance(refine, faiss.IndexFlatL2):
                return cls(index, int(options["shortlist"]))
        if isinstance(index, faiss.IndexFlatL2):
            return cls(index, None)
        raise ValueError(f"{path.name} holds a FAISS {type(index).__name__}, not an index this program writes")

    def write(self, fh: BinaryIO) -> None:
        """Stream the FAISS index, trained codes and vectors, to ``fh`` in FAISS's own format: loading trains nothing."""
        import faiss

        faiss.write_index(self.index, faiss.PyCallbackIOWriter(fh.write))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dist (m, k) float32, rows (m, k) int64)``, nearest first; ``k`` is at most the row count."""
        k = min(k, len(self.vectors))
        if self.shortlist is None:
            return exact_distances(self.vectors, queries, self.index.search(queries, k)[1])
        # the whole shortlist comes back re-ranked (its exact distances, ties by row): its first k are the answer
        dist, rows = self.index.search(queries, max(k, min(self.shortlist, len(self.vectors))))
        return np.sqrt(dist[:, :k]), rows[:, :k]

    def search_rows(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search among ``rows`` only (a flat scan behind FAISS's bitmap ID selector); index-wide rows."""
        import faiss

        allowed = np.zeros(len(self.vectors), bool)
        allowed[rows] = True
        k = min(k, int(allowed.sum()))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
        found = self.flat.search(queries, k, params=faiss.SearchParameters(sel=selector))[1]
        return exact_distances(self.vectors, queries, found)

    def describe(self) -> str:
        """What a search does, in words (``ffengine index info``)."""
        import faiss

        if self.shortlist is None:
            return "an exact scan of every vector"
        base = faiss.downcast_index(self.index.base_index)
        dims, codes = base.chain.at(0).d_out, faiss.downcast_index(base.index).M
        how = "by their float16 copies" if is_fp16(faiss.downcast_index(self.index.refine_index)) else "exactly"
        return f"{self.shortlist} candidates from {codes} 4-bit codes of a {dims}-d PCA copy, re-ranked {how}"


def exact_distances(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows``' distances to their queries from the differences, ordered by (distance, row): a flat scan of
    many queries computes ``|x|² + |y|² - 2x·y`` (BLAS), which blurs near-duplicates and their order."""
    dist = np.empty(rows.shape, np.float32)
    for i, (query, found) in enumerate(zip(queries, rows, strict=True)):  # (k, d) at a time, never (m, k, d)
        dist[i] = np.linalg.norm(vectors[found] - query, axis=1)
    order = np.lexsort((rows, dist), axis=1)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
