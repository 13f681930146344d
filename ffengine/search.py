"""Searching an index's vectors with FAISS: exactly, or through a shortlist re-ranked by float16 copies.

``shortlist`` (the default) is FAISS's ``PCA{c},PQ{c/2}x4fs,Refine(SQfp16)``: four-bit codes of a PCA
copy of the vectors, scanned with SIMD lookup tables, pick ``shortlist`` candidates whose distances to
the vectors kept in float16 give the answer; bench/index_speed.py measures how often that is the exact
one. A large catalogue puts inverted lists in front of the codes (``PCA{c},IVF{lists},...``), so that a
query scans the codes of its ``nprobe`` nearest lists only. ``exact`` is a flat float32 scan. FAISS holds
the vectors: :attr:`Searcher.vectors` is a view of its storage (float16 for a shortlist), not a second copy. Version-3 indexes re-rank float32 vectors
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
BACKEND_OPTIONS: dict[str, dict[str, int]] = {"shortlist": {"coarse_dims": 1, "shortlist": 1, "nprobe": 1}, "exact": {}}
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
#: From this many rows the codes are scanned only in the ``nprobe`` inverted lists nearest the query
#: (an IVF coarse quantiser in front of them): a scan of every code costs as much as the rest of a search.
IVF_MIN_ROWS = 200_000
#: The options of a catalogue of :data:`IVF_MIN_ROWS` or more, when the caller names none: near copies crowd
#: a large catalogue, so the codes keep more PCA dimensions, one code each, and the re-ranking takes more candidates.
LARGE_OPTIONS: dict[str, dict[str, Any]] = {"shortlist": {"coarse_dims": 256, "shortlist": 500, "nprobe": 128}, "exact": {}}
#: Rows each inverted list's centroid is trained on (FAISS's k-means wants at least 39).
ROWS_PER_LIST = 50
#: A search among more rows than this (a category, a filter) goes through the inverted lists, where there are
#: some: a flat scan of a large part of a large catalogue reads it all.
EXACT_ROWS = 50_000


def effective_options(backend: str, options: dict[str, Any] | None, rows: int = 0) -> dict[str, Any]:
    """The backend's defaults for ``rows`` products overridden by ``options``; ValueError for an unknown
    backend, an option it does not take or a value out of range, before anything is built or written."""
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    allowed = BACKEND_OPTIONS[backend]
    defaults = LARGE_OPTIONS if rows >= IVF_MIN_ROWS else DEFAULT_OPTIONS
    merged = {**defaults[backend], **(options or {})}
    for name, value in merged.items():
        if name not in allowed:
            raise ValueError(f"backend {backend!r} takes no option {name!r} (it takes: {', '.join(allowed) or 'none'})")
        if isinstance(value, bool) or not isinstance(value, int) or value < allowed[name]:
            raise ValueError(f"option {name} must be a whole number >= {allowed[name]}, got {value!r}")
    return merged


def factory_string(coarse_dims: int, lists: int = 0) -> str:
    """The FAISS index of the shortlist: one 4-bit code per two PCA dimensions (per dimension when
    ``coarse_dims`` is odd, as the code count must divide them), or behind ``lists`` inverted lists one
    per dimension (a query scans a few lists' codes, so they can afford twice the bytes); the vectors
    kept in float16 for re-ranking (half the bytes of float32 to hash and page in; the distances differ
    by float16's rounding, ~1e-3)."""
    codes = coarse_dims // 2 if coarse_dims % 2 == 0 and not lists else coarse_dims
    return f"PCA{coarse_dims},{f'IVF{lists},' if lists else ''}PQ{codes}x4fs,Refine(SQfp16)"


def structure(rows: int, dim: int, backend: str, options: dict[str, Any]) -> str:
    """The FAISS factory string of ``rows`` vectors of ``dim`` (``"Flat"``: an exact scan). Inverted lists
    number about four times the square root of the rows, a power of two (FAISS's guidance: 4 to 16)."""
    coarse = options.get("coarse_dims", dim)
    if backend == "exact" or rows < PQ_MIN_ROWS or coarse >= dim:
        return "Flat"
    lists = 2 ** round(np.log2(4 * np.sqrt(rows))) if rows >= IVF_MIN_ROWS else 0
    return factory_string(coarse, lists)


def is_fp16(index: faiss.Index) -> bool:
    """Whether ``index`` is a scalar quantiser storing each dimension as float16."""
    import faiss

    return isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16


class Storage:
    """A read-only NumPy view of memory a FAISS index owns, that keeps the index alive while the view (or any
    view of it) exists: FAISS's own ``rev_swig_ptr`` arrays do not, so one outliving its index reads freed memory."""

    def __init__(self, owner: faiss.Index, raw: np.ndarray, shape: tuple[int, int]) -> None:
        self.owner = owner
        self.__array_interface__ = {"data": (raw.__array_interface__["data"][0], True), "shape": shape, "typestr": raw.dtype.str, "version": 3}


class Searcher:
    """A FAISS index over the search vectors, and how many candidates its shortlist re-ranks (``None``: exact)."""

    def __init__(self, index: faiss.Index, shortlist: int | None, nprobe: int | None = None) -> None:
        import faiss

        self.index = index
        self.shortlist = shortlist
        self.flat = faiss.downcast_index(index.refine_index) if shortlist else index
        self.lists = faiss.try_extract_index_ivf(index) if shortlist else None
        if self.lists is not None and nprobe is not None:
            self.lists.nprobe = min(nprobe, self.lists.nlist)
        n, d = self.flat.ntotal, self.flat.d
        if is_fp16(self.flat):  # the refine stage's codes are the vectors in float16
            raw = faiss.rev_swig_ptr(self.flat.codes.data(), n * d * 2).view(np.float16)
        else:
            raw = faiss.rev_swig_ptr(self.flat.get_xb(), n * d)
        self.vectors = np.asarray(Storage(index, raw, (n, d)))

    @classmethod
    def build(cls, vectors: np.ndarray, backend: str, options: dict[str, Any], trained: Searcher | None = None) -> Searcher:
        """A FAISS index of ``vectors`` (``options`` as :func:`effective_options` returns them): ``trained``'s
        PCA, lists and codebooks refilled where it has the structure these vectors need (an update: nothing
        trained again, an unchanged vector gets the same codes), else trained here."""
        import faiss

        n, d = vectors.shape
        factory = structure(n, d, backend, options)
        if factory != "Flat" and not fits_float16(vectors):  # re-ranked in float32 where float16 cannot hold the vectors
            factory = factory.replace("Refine(SQfp16)", "RFlat")
        if trained is not None and trained.factory == factory and trained.flat.d == d:
            index = faiss.deserialize_index(faiss.serialize_index(trained.index))  # an owned copy: a read one maps its file
            index.reset()
        elif factory == "Flat":
            index = faiss.IndexFlatL2(d)
        else:
            index = faiss.index_factory(d, factory)
            lists = faiss.try_extract_index_ivf(index)
            index.train(sample_rows(vectors, max(TRAIN_ROWS, ROWS_PER_LIST * lists.nlist if lists else 0)))
        index.add(vectors)
        nprobe = options.get("nprobe", LARGE_OPTIONS["shortlist"]["nprobe"])  # lists for options that had none (an update that grew)
        return cls(index, options["shortlist"] if isinstance(index, faiss.IndexRefine) else None, nprobe)

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
                return cls(index, int(options["shortlist"]), options.get("nprobe"))
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

    def search_rows(self, queries: np.ndarray, rows: np.ndarray, k: int, exact_rows: int = EXACT_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """Search among ``rows`` only (FAISS's bitmap ID selector); index-wide rows. Up to ``exact_rows`` rows,
        or without inverted lists, a flat scan of them (exact); more, through the shortlist like :meth:`search`,
        its lists and codes scanned for those rows only."""
        import faiss

        allowed = np.zeros(len(self.vectors), bool)
        allowed[rows] = True
        count = int(allowed.sum())
        k = min(k, count)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
        if self.lists is not None and k <= self.shortlist and count > exact_rows:  # type: ignore[operator]
            lists = faiss.SearchParametersIVF(sel=selector, nprobe=self.lists.nprobe)
            params = faiss.IndexRefineSearchParameters(k_factor=1.0, base_index_params=faiss.SearchParametersPreTransform(index_params=lists))
            found = self.index.search(queries, self.shortlist, params=params)[1][:, :k]
            if (found >= 0).all():  # else the nearest lists held fewer than k of the rows: scan them all
                return exact_distances(self.vectors, queries, found)
        found = self.flat.search(queries, k, params=faiss.SearchParameters(sel=selector))[1]
        return exact_distances(self.vectors, queries, found)

    def coarse(self) -> tuple[int, int]:
        """The shortlist's PCA dimensions and 4-bit codes per vector."""
        import faiss

        base = faiss.downcast_index(self.index.base_index)
        return base.chain.at(0).d_out, faiss.downcast_index(base.index).pq.M

    @property
    def factory(self) -> str:
        """The FAISS factory string of this index's structure (``"Flat"``: an exact scan)."""
        if self.shortlist is None:
            return "Flat"
        dims, codes = self.coarse()
        refine = "Refine(SQfp16)" if is_fp16(self.flat) else "RFlat"
        return f"PCA{dims},{f'IVF{self.lists.nlist},' if self.lists else ''}PQ{codes}x4fs,{refine}"

    def describe(self) -> str:
        """What a search does, in words (``ffengine index info``)."""
        if self.shortlist is None:
            return "an exact scan of every vector"
        dims, codes = self.coarse()
        how = "by their float16 copies" if is_fp16(self.flat) else "exactly"
        lists = f" in the {self.lists.nprobe} nearest of {self.lists.nlist} lists" if self.lists else ""
        return f"{self.shortlist} candidates from {codes} 4-bit codes of a {dims}-d PCA copy{lists}, re-ranked {how}"


def exact_distances(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows``' distances to their queries from the differences, ordered by (distance, row): a flat scan of
    many queries computes ``|x|² + |y|² - 2x·y`` (BLAS), which blurs near-duplicates and their order."""
    dist = np.empty(rows.shape, np.float32)
    for i, (query, found) in enumerate(zip(queries, rows, strict=True)):  # (k, d) at a time, never (m, k, d)
        dist[i] = np.linalg.norm(vectors[found] - query, axis=1)
    order = np.lexsort((rows, dist), axis=1)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
