"""The product index: catalogue features and products, searched by Euclidean distance.

:mod:`ffengine.projection` maps features to search vectors, :mod:`ffengine.search` searches them with
FAISS, :class:`Index` ties them to the products and to the files below (:mod:`ffengine.files` replaces
them atomically), and the names other modules use from those are importable from here. An index is a directory::

    manifest.json          what made it: model fingerprint, dims, backend, catalogue hash, sha256 of every file
    features.npy           raw backbone features (n, 1280) in float16 (version 3: float32), memory-mapped at load,
                           so train/ can re-project and an update reuse them without re-reading images (searching
                           never reads them: they stay on disk while the process serves)
    search.faiss           the FAISS index, in FAISS's own format: the searched vectors ``projection.apply(features)``
                           (float16 for the shortlist's re-ranking; version 3: float32) and, for the shortlist, its
                           trained PCA and codes (loading trains nothing)
    projection_mean.npy    (1280,)   } the reduction applied to catalogue and query features alike
    projection_matrix.npy  (1280, d) }
    image_sha256.npy       (n, 32) uint8: each product picture's sha256, so that ``index update`` reuses the
                           features of the pictures it already holds (absent before version 5)
    products.jsonl         one ``Product.to_json()`` per line, row order = vector order (read a line at a time
                           on access: :class:`ffengine.productfile.ProductFile`)

Nothing in it is executable: arrays load with ``np.load(allow_pickle=False)``, the search file with
FAISS's reader, the rest is JSON, each checked against the manifest's sha256 first. Version 2 had
``vectors.npy`` instead of the search file and is still read (its search is trained at load); version 3
kept features and re-ranked vectors in float32 and is still read. Writes
are atomic: a sibling ``<out>.tmp-XXXX`` directory is filled, then swapped in by rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ffengine.catalog import Product
from ffengine.errors import FFError, IndexLoadError, WeightsError
from ffengine.files import old_path, remove_stale_tmp, replace_dir, sha256_file, swap_in, write_atomic  # noqa: F401
from ffengine.prior import Priors
from ffengine.productfile import ProductFile, ProductLineError
from ffengine.projection import DEFAULT_REDUCTION, Projection, Reduction, as_features, fits_float16
from ffengine.search import BACKENDS, DEFAULT_BACKEND, DEFAULT_OPTIONS, PQ_MIN_ROWS, Searcher, effective_options  # noqa: F401

log = logging.getLogger(__name__)

FORMAT = "ffengine-index"
#: ``ffengine.weights.fingerprint``: weights hash, then preprocessing hash.
FINGERPRINT = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")
VERSION = 5
#: Versions :func:`read_manifest` accepts: 2 lacks the search file (trained again at load), 3 holds float32,
#: 4 lacks the pictures' hashes.
READABLE_VERSIONS = (2, 3, 4, 5)
#: Types ``features.npy`` may hold: float16 as written since version 4, float32 before.
FEATURE_DTYPES = (np.float16, np.float32)
FEATURES_FILE = "features.npy"
ARRAY_FILES = (FEATURES_FILE, "projection_mean.npy", "projection_matrix.npy")
SEARCH_FILE = "search.faiss"
#: Version 2's searched vectors, which version 3 keeps in :data:`SEARCH_FILE`.
VECTORS_FILE = "vectors.npy"
IMAGES_FILE = "image_sha256.npy"
PRODUCTS_FILE = "products.jsonl"
MANIFEST_FILE = "manifest.json"


class Index:
    """Catalogue vectors + products + the projection and model fingerprint that made them; ``searcher``
    (read from disk) or else one trained here over ``vectors`` (default: the projected features)."""

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
        searcher: Searcher | None = None,
        image_sha256: np.ndarray | None = None,
    ) -> None:
        # an index's float16 features (memory-mapped) stay so: Projection.apply converts what it projects
        stored = isinstance(features, np.ndarray) and features.dtype == np.float16 and features.ndim == 2 and features.shape[1] == projection.in_dim
        self.features = features if stored else as_features(features, projection.in_dim, "catalogue features")
        if len(self.features) != len(products):
            raise ValueError(f"{len(self.features)} feature rows but {len(products)} products")
        if len(products) == 0:
            raise ValueError("an index needs at least one product")
        if priors is not None and len(priors.product_group) != len(products):
            raise ValueError(f"priors cover {len(priors.product_group)} products, the index holds {len(products)}")
        self.products = products if isinstance(products, ProductFile) else list(products)
        self.projection = projection
        self.fingerprint = fingerprint
        self.backend = backend
        self.options = effective_options(backend, options, len(products))
        self.path = path
        self.manifest = manifest or {}
        self.priors = priors
        self.image_sha256 = image_sha256
        if image_sha256 is not None and (image_sha256.dtype != np.uint8 or image_sha256.shape != (len(products), 32)):
            raise ValueError(f"image hashes {image_sha256.dtype}{image_sha256.shape} do not fit {len(products)} products")
        if searcher is None:
            vectors = projection.apply(self.features) if vectors is None else as_features(vectors, projection.out_dim, "vectors")
            searcher = Searcher.build(vectors, backend, self.options)
        self.searcher = searcher

    def __len__(self) -> int:
        return len(self.products)

    @property
    def dim(self) -> int:
        """Backbone feature dimension a query must have."""
        return self.projection.in_dim

    @property
    def vectors(self) -> np.ndarray:
        """The searched vectors ``(n, d)``: a read-only view of the FAISS index's own copy."""
        return self.searcher.vectors

    @cached_property
    def sq_norms(self) -> np.ndarray:
        """``(n,)`` squared lengths of the vectors (computed on first use: searching does not need them)."""
        vectors = self.vectors.astype(np.float32, copy=False)
        return np.einsum("ij,ij->i", vectors, vectors)

    def search(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(m, 1280)`` backbone features -> ``(dist (m, k) float32, idx (m, k) int64)``, nearest first.

        ``k`` is capped at ``len(index)``.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self.searcher.search(self.projection.apply(as_features(feats, self.dim, "query features")), k)

    def search_rows(self, feats: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search restricted to ``rows`` (e.g. a filter's matches); returns index-wide row numbers."""
        queries = self.projection.apply(as_features(feats, self.dim, "query features"))
        return self.searcher.search_rows(queries, np.asarray(rows, dtype=np.int64), k)

    @classmethod
    def load(cls, path: str | os.PathLike[str], expect_fingerprint: str | None = None) -> Index:
        """Read an index directory; :class:`IndexLoadError` if missing, corrupt or made by another model."""
        return load_index(Path(path), expect_fingerprint)


# ---------------------------------------------------------------- writing


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
    image_hashes: Sequence[str] | None = None,
    trained: Searcher | None = None,
    **options: Any,
) -> Path:
    """Write an index directory atomically and return its path.

    ``projection`` is a fitted :class:`Projection`, a :class:`Reduction` to fit on ``features``, or
    ``None`` for :data:`DEFAULT_REDUCTION`; ``options`` are the backend's (``coarse_dims``,
    ``shortlist``; defaults in :data:`DEFAULT_OPTIONS`). ``priors`` (:func:`ffengine.prior.fit_priors`)
    are stored beside the vectors. The manifest records ``preprocess`` (the model's, as JSON), so that
    an index made with other preprocessing is named as such, and ``weights`` (:func:`weights_record`),
    so that the index can be used without naming its weights again. ``image_hashes`` (the pictures'
    sha256, hex) let a later update reuse these features; ``trained``, a previous index's searcher, is
    refilled with the new vectors instead of training one (:meth:`Searcher.build`).
    """
    options = effective_options(backend, options, len(products))  # refused before any work
    out = Path(out_dir)
    features = checked_catalogue(features, products, out)
    recipe, proj = fitted(projection, features)
    digests = image_digests(image_hashes, len(products)) if image_hashes is not None else None
    searcher = Searcher.build(proj.apply(features), backend, options, trained=trained)
    index = Index(features, products, fingerprint=fingerprint, projection=proj, backend=backend, options=options, priors=priors,
                  searcher=searcher, image_sha256=digests)  # fmt: skip
    provenance = {"catalog_hash": catalog_hash, "preprocess": preprocess, "weights": weights}
    replace_dir(out, lambda folder: write_files(folder, index, recipe, provenance))
    return out


def checked_catalogue(features: np.ndarray, products: Sequence[Product], out: Path) -> np.ndarray:
    """``features`` as float32, once they fit ``products`` and ``out`` may be replaced; ValueError or FFError saying why not."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"catalogue features must have shape (n, D), got {features.shape}")
    if len(features) != len(products) or len(products) == 0:
        raise ValueError(f"need one feature row per product and at least one product; got {len(features)} rows, {len(products)} products")
    if not np.isfinite(features).all():
        raise ValueError("catalogue features contain NaN or infinity")
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise FFError(f"{out} exists and is not an index (no {MANIFEST_FILE}); refusing to replace it")
    return features


def fitted(projection: Projection | Reduction | None, features: np.ndarray) -> tuple[Reduction | None, Projection]:
    """The recipe (``None`` for a given projection) and the projection it fits on ``features``; a PCA
    wider than the catalogue allows falls back to every dimension."""
    recipe = DEFAULT_REDUCTION if projection is None else projection
    if not isinstance(recipe, Reduction):
        return None, recipe
    if recipe.dims is not None and recipe.dims > min(features.shape):
        recipe = Reduction(None, recipe.normalize_input)  # too few products for a PCA of that size
    return recipe, recipe.fit(features)


def image_digests(hashes: Sequence[str], n: int) -> np.ndarray:
    """``(n, 32)`` uint8: the pictures' sha256 from their hex digests (ValueError unless one per product)."""
    if len(hashes) != n:
        raise ValueError(f"{len(hashes)} image hashes for {n} products")
    return np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(n, 32)


def stored_features(features: np.ndarray) -> np.ndarray:
    """The features as ``features.npy`` keeps them: float16 (half the bytes to hash and page in at load),
    or float32 where float16 cannot hold them (:func:`fits_float16`)."""
    return features if features.dtype == np.float16 or not fits_float16(features) else features.astype(np.float16)


def write_files(folder: Path, index: Index, recipe: Reduction | None, provenance: dict[str, Any]) -> None:
    """Write the index's files into ``folder``, each flushed to the disk, the manifest vouching for them last."""
    arrays = {
        FEATURES_FILE: stored_features(index.features),
        "projection_mean.npy": index.projection.mean,
        "projection_matrix.npy": index.projection.matrix,
        **(index.priors.arrays() if index.priors is not None else {}),
        **({IMAGES_FILE: index.image_sha256} if index.image_sha256 is not None else {}),
    }
    for name, arr in arrays.items():
        write_atomic(folder / name, lambda fh, a=arr: np.save(fh, a, allow_pickle=False), durable=True)
    write_atomic(folder / SEARCH_FILE, index.searcher.write, durable=True)
    lines = "".join(json.dumps(p.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for p in index.products)
    write_atomic(folder / PRODUCTS_FILE, lines.encode("utf-8"), durable=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": index.fingerprint,
        "dim": index.projection.in_dim,
        "vector_dim": index.projection.out_dim,
        "count": len(index),
        "backend": index.backend,
        "options": index.options,
        "projection": {"normalize_input": index.projection.normalize_input, "recipe": asdict(recipe) if recipe else None},
        "priors": index.priors.to_json() if index.priors is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **provenance,
        "files": {name: sha256_file(folder / name) for name in (*arrays, SEARCH_FILE, PRODUCTS_FILE)},
    }
    manifest["checksum"] = manifest_checksum(manifest)
    write_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True).encode(), durable=True)


# ---------------------------------------------------------------- loading


def load_index(path: Path, expect_fingerprint: str | None = None) -> Index:
    """Read the index at ``path`` (or the ``.old`` copy an interrupted update left), every file checked
    against the manifest before it is read; the FAISS index is read as written, not trained again."""
    path = locate(path)
    manifest = read_manifest(path)
    fingerprint = manifest["fingerprint"]
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise IndexLoadError(model_mismatch(str(path), fingerprint, manifest.get("preprocess"), expect_fingerprint))
    products = verified_products(path, manifest)  # every file checked; the products read while the rest hash
    arrays = read_arrays(path, manifest)
    n = manifest["count"]
    if len(products) != n:
        raise IndexLoadError(f"Index {path} is corrupt: {len(products)} products for {n} vectors.")
    backend, options = search_in_manifest(manifest)
    try:
        if manifest["projection"].get("normalize_output"):  # a version-2 option only benchmarks used
            raise ValueError("its projection normalises its output, which this program no longer does")
        projection = Projection(arrays["projection_mean.npy"], arrays["projection_matrix.npy"], bool(manifest["projection"]["normalize_input"]))
        priors = Priors.from_files(manifest["priors"], lambda name: read_array(path / name), n) if manifest.get("priors") else None
        searcher = read_searcher(path, manifest, backend, options)
        digests = read_array(path / IMAGES_FILE) if IMAGES_FILE in file_names(manifest) else None
        return Index(
            arrays[FEATURES_FILE], products, fingerprint=fingerprint, projection=projection, backend=backend, manifest=manifest,
            vectors=arrays.get(VECTORS_FILE), path=path, options=options, priors=priors, searcher=searcher, image_sha256=digests,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexLoadError(f"Index {path} is corrupt: {exc}. Rebuild it with `ffengine index build`.") from None


def read_arrays(path: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The index's arrays by file name (version 2's vectors too), each of the shape the manifest implies."""
    n, dim, vdim = manifest["count"], manifest["dim"], manifest["vector_dim"]
    expected = {FEATURES_FILE: (n, dim), "projection_mean.npy": (dim,), "projection_matrix.npy": (dim, vdim)}
    if VECTORS_FILE in file_names(manifest):
        expected[VECTORS_FILE] = (n, vdim)
    arrays = {name: read_array(path / name, mapped=name == "features.npy") for name in expected}
    for name, shape in expected.items():
        dtypes = FEATURE_DTYPES if name == "features.npy" else (np.float32,)
        if arrays[name].shape != shape or arrays[name].dtype not in dtypes:
            raise IndexLoadError(f"Index {path} is corrupt: {name} is {arrays[name].dtype}{arrays[name].shape}, expected float32{shape}.")
    return arrays


def read_searcher(path: Path, manifest: dict[str, Any], backend: str, options: dict[str, Any]) -> Searcher | None:
    """The FAISS index as written, checked to hold the manifest's vectors; ``None`` for a version-2
    index, whose searcher is built again from its vectors (slow: rebuild it to load fast)."""
    if SEARCH_FILE not in file_names(manifest):
        log.warning("index %s has format version 2: its search structures are trained at every load; rebuild it to load fast", path)
        return None
    searcher = Searcher.read(path / SEARCH_FILE, effective_options(backend, options))
    if searcher.vectors.shape != (manifest["count"], manifest["vector_dim"]):
        raise ValueError(f"{SEARCH_FILE} holds {searcher.vectors.shape} vectors, expected {(manifest['count'], manifest['vector_dim'])}")
    return searcher


def locate(path: Path) -> Path:
    """``path``, or the ``<path>.old`` an interrupted update left; IndexLoadError saying how to build one."""
    if (path / MANIFEST_FILE).is_file():
        return path
    old = old_path(path)
    if (old / MANIFEST_FILE).is_file():
        log.warning("index %s is missing; using %s left by an interrupted update", path, old)
        return old
    if path.is_dir():
        raise IndexLoadError(f"{path} is not an index: {MANIFEST_FILE} is missing. Build one with `ffengine index build`.")
    raise IndexLoadError(f"No index at {path}. Build one with `ffengine index build --catalog CSV --out {path}`.")


def file_names(manifest: dict[str, Any]) -> list[str]:
    """Every file the index in ``manifest`` consists of, but the manifest."""
    search = VECTORS_FILE if manifest["version"] == 2 else SEARCH_FILE
    priors = Priors.file_names(manifest["priors"]) if manifest.get("priors") else []
    images = [IMAGES_FILE] if IMAGES_FILE in manifest["files"] else []
    return [*ARRAY_FILES, search, *priors, *images, PRODUCTS_FILE]


def verified_products(path: Path, manifest: dict[str, Any]) -> ProductFile:
    """The products (read on access), once every file of the index is there and matches its sha256 in the
    manifest (IndexLoadError naming the first that does not). The other files hash in threads (hashlib lets
    go of the GIL) while products.jsonl, checked first, has its lines found."""
    names = file_names(manifest)
    for name in names:
        if not (path / name).is_file():
            raise IndexLoadError(f"Index {path} is incomplete: {name} is missing. Rebuild it with `ffengine index build`.")

    def check(name: str, digest: str) -> None:
        if digest != manifest["files"].get(name):
            raise IndexLoadError(f"Index {path} is corrupt: {name} does not match its checksum in {MANIFEST_FILE}. Rebuild it.")

    others = sorted((name for name in names if name != PRODUCTS_FILE), key=lambda name: -(path / name).stat().st_size)
    with ThreadPoolExecutor(max(1, min(2, (os.cpu_count() or 2) - 1))) as pool:
        digests = {name: pool.submit(sha256_file, path / name) for name in others}  # biggest first
        try:
            check(PRODUCTS_FILE, sha256_file(path / PRODUCTS_FILE))
            products = ProductFile(path / PRODUCTS_FILE)
            for name in names:
                if name != PRODUCTS_FILE:
                    check(name, digests[name].result())
        except ProductLineError as exc:
            raise IndexLoadError(f"Index {path} is corrupt: {PRODUCTS_FILE} {exc}.") from None
        finally:
            for future in digests.values():
                future.cancel()  # on an error, the files not started yet are not hashed for nothing
    return products


def search_in_manifest(manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The backend and options the index is searched with. A version-2 index may name what this program
    no longer has: the study's BallTree, or a shortlist without a PCA, search exactly (as they did)."""
    backend, options = manifest["backend"], dict(manifest.get("options") or {})
    if manifest["version"] == 2:
        if backend == "balltree" or not options.get("coarse_dims"):
            return "exact", {}
        options.pop("pq_subspaces", None)  # the code size is one code per two PCA dimensions again
    return backend, options


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
    """The manifest of the index at ``path``, refused (IndexLoadError saying why) unless it is an ffengine
    index of a readable version, unchanged since written (its checksum) and complete in what it states."""
    where = path / MANIFEST_FILE
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IndexLoadError(f"Index {path} is corrupt: {MANIFEST_FILE} is not readable JSON ({exc}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexLoadError(f"{path} is not an ffengine index ({MANIFEST_FILE} has no format {FORMAT!r}).")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise IndexLoadError(f"Index {path} has format version {manifest.get('version')!r}; this program reads versions 2 to {VERSION}. Rebuild it.")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise IndexLoadError(f"Index {path} is corrupt: {MANIFEST_FILE} was changed after it was written (checksum mismatch). Rebuild it.")
    required = {"fingerprint": str, "dim": int, "vector_dim": int, "count": int, "backend": str, "projection": dict, "files": dict}
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise IndexLoadError(f"Index {path} is corrupt: {MANIFEST_FILE} lacks a valid {key!r}.")
    known = (*BACKENDS, "balltree") if manifest["version"] == 2 else BACKENDS  # see search_in_manifest
    if manifest["backend"] not in known:
        raise IndexLoadError(f"Index {path} uses backend {manifest['backend']!r}; this program knows {', '.join(BACKENDS)}.")
    return manifest


def read_array(file: Path, *, mapped: bool = False) -> np.ndarray:
    """A ``.npy`` file's array, never unpickled; ``mapped``: read-only and paged in from the file on use
    (the catalogue features: a gigabyte at 200k products, of which a search touches a few rows)."""
    try:
        return np.load(file, mmap_mode="r" if mapped else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise IndexLoadError(f"Index {file.parent} is corrupt: cannot read {file.name} ({exc}).") from None
