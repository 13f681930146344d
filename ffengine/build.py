"""Catalogue -> features -> index, fast, resumable, and honest about what was skipped.

The study embedded one photo at a time (~34 img/s, decode bound). Here the work is
a pipeline on an asyncio loop that only coordinates:

* a thread pool reads each file (or :mod:`ffengine.fetch` downloads it, revalidating
  the copy in the :class:`~ffengine.httpcache.HttpCache` beside the embedding cache), hashes the
  bytes, looks the hash up in the :class:`~ffengine.cache.EmbeddingCache`, and only on
  a miss decodes (:func:`~ffengine.images.load_image`) and runs ``embedder.prepare``;
* with a compiled CPU runtime (OpenVINO, ONNX Runtime) the same worker then embeds its
  picture itself (one worker per core plus one, each call confined to one core's worth of
  work): no hand-off and no batching, ~20% less CPU per image than a separate model thread;
* with any other runtime (PyTorch on GPU) one model thread runs ``embedder.embed_arrays``
  on batches instead. PIL, hashlib and the runtimes release the GIL, so all of this
  overlaps; new features go to the cache as they come.

A bounded number of images is in flight, so memory stays flat for any catalogue size.
A photo that cannot be read, downloaded or decoded becomes a :class:`Problem` with the
catalogue line number, and so does anything else one product's picture raises on the way
(a URL whose host name cannot be encoded, say): one bad row costs that row only. Everything
else is embedded. :func:`embed_catalog` returns the
features (``train/`` re-embeds a catalogue with a fine-tuned model this way);
:func:`build_index` also writes the index directory with :func:`ffengine.index.write_index`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from ffengine.cache import EmbeddingCache, content_hash
from ffengine.catalog import CatalogReadResult, Problem, Product, no_usable_product, read_catalog
from ffengine.errors import CatalogError, FFError, ImageRejected
from ffengine.fetch import Fetcher, FetchError, FetchSettings, redact_url
from ffengine.httpcache import HttpCache
from ffengine.images import MAX_BYTES, load_image, read_image_bytes
from ffengine.items import COLOUR_BINS, colour_histogram
from ffengine.prior import describe as describe_priors
from ffengine.prior import LinearHead, fit_priors

if TYPE_CHECKING:  # torch comes with the weights; the build only reads the record
    from ffengine.index import Index
    from ffengine.weights import Preprocess

log = logging.getLogger(__name__)

#: Images per forward pass.
BATCH_SIZE = 32
#: Bump when :func:`ffengine.items.colour_histogram` changes, so cached histograms are not reused.
COLOUR_CACHE_VERSION = 1
#: What an admin should read for each kind of rejected image (``ImageRejected.reason``).
IMAGE_FAULTS = {
    "not_found": "image file not found",
    "empty": "image file is empty",
    "not_image": "not an image",
    "truncated": "truncated image",
    "corrupt": "damaged image",
    "not_a_file": "not a regular file (device, pipe or folder)",
    "bad_shape": "image too long or too thin",
}


class FeatureExtractor(Protocol):
    """What the build needs from :class:`ffengine.embedder.Embedder`."""

    fingerprint: str
    dim: int
    preprocess: Preprocess

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray: ...


class Model(FeatureExtractor, Protocol):
    """What :func:`build_index` records beside the features: how pictures were fed, which weights, which head."""

    source: str
    kind_head: LinearHead | None


@dataclass
class BuildReport:
    """What a build did: ``products`` indexed, ``skipped`` rows/images (with line numbers),
    features ``embedded`` now vs reused from the ``cached``, wall time and throughput."""

    products: int
    skipped: list[Problem]
    embedded: int
    cached: int
    seconds: float
    images_per_s: float
    catalog_hash: str
    fingerprint: str
    #: Remote images whose bytes were downloaded, and those the server confirmed unchanged (HTTP cache).
    downloaded: int = 0
    revalidated: int = 0
    #: Of ``seconds``: reading + embedding, and writing the index (0 until it is written).
    embed_seconds: float = 0.0
    index_seconds: float = 0.0
    out_dir: Path | None = None
    catalog: Path | None = None
    #: Products indexed with something dropped (a link a shopper could not open), with line numbers.
    warnings: list[Problem] = field(default_factory=list)
    #: What the category priors learned (classes, held-out accuracy); see :mod:`ffengine.prior`.
    priors: dict[str, object] = field(default_factory=dict)
    #: Of ``cached``: pictures whose features came from the previous index (``index update``).
    reused: int = 0

    def summary(self, max_problems: int = 10) -> str:
        """A few lines for a person: counts, speed, and the first skipped rows."""
        lines = [
            f"{self.products} products indexed ({self.embedded} embedded"
            + (f", {self.reused} reused from the previous index" if self.reused else "")
            + f", {self.cached - self.reused} from cache"
            + (f", {self.downloaded} downloaded" if self.downloaded else "")
            + (f", {self.revalidated} unchanged on the server" if self.revalidated else "")
            + f"), {len(self.skipped)} skipped"
            + (f", {len(self.warnings)} with warnings" if self.warnings else "")
            + f"; {self.seconds:.1f} s, {self.images_per_s:.0f} images/s"
        ]
        if self.out_dir is not None:
            lines.append(f"index written to {self.out_dir}")
            lines.append(describe_priors(self.priors))
        for problem in self.skipped[:max_problems]:
            lines.append(f"  skipped {problem}")
        if len(self.skipped) > max_problems:
            lines.append(f"  ... and {len(self.skipped) - max_problems} more skipped")
        for warning in self.warnings[:max_problems]:
            lines.append(f"  warning {warning}")
        if len(self.warnings) > max_problems:
            lines.append(f"  ... and {len(self.warnings) - max_problems} more warnings")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "products": self.products,
            "skipped": [_problem_json(p) for p in self.skipped],
            "warnings": [_problem_json(p) for p in self.warnings],
            "embedded": self.embedded,
            "cached": self.cached,
            "reused": self.reused,
            "downloaded": self.downloaded,
            "revalidated": self.revalidated,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
            "embed_seconds": round(self.embed_seconds, 3),
            "index_seconds": round(self.index_seconds, 3),
            "catalog_hash": self.catalog_hash,
            "fingerprint": self.fingerprint,
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "catalog": None if self.catalog is None else str(self.catalog),
        }


def _problem_json(problem: Problem) -> dict[str, object]:
    return {"line": problem.line, "product_id": problem.product_id, "reason": problem.reason}


@dataclass(frozen=True)
class EmbeddedCatalog:
    """Features ``(n, dim)`` float32 and colour histograms ``(n, COLOUR_BINS)`` float16, row-aligned
    with ``products``, and their images' sha256."""

    features: np.ndarray
    colours: np.ndarray
    products: list[Product]
    image_hashes: list[str]
    report: BuildReport = field(repr=False)


def build_index(
    catalog_path: str | os.PathLike[str] | CatalogReadResult,
    out_dir: str | os.PathLike[str],
    embedder: Model,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    limit: int | None = None,
    fetch: FetchSettings | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    previous: Index | None = None,
    **index_options: Any,
) -> BuildReport:
    """Import ``catalog_path`` (or an already read catalogue), embed it (reusing ``cache_dir``)
    and write the index to ``out_dir``.

    ``index_options`` go to :func:`ffengine.index.write_index` (``backend``, ``projection``,
    ``coarse_dims``...). A ``previous`` index lends its pictures' features and its trained search
    (:func:`update_index`). Blocking: from async code use ``asyncio.to_thread``.
    Raises :class:`CatalogError` when nothing usable is left.
    """
    from ffengine.index import weights_record, write_index

    started = time.perf_counter()
    result = embed_catalog(
        catalog_path, embedder, cache_dir=cache_dir, progress=progress, limit=limit, fetch=fetch, batch_size=batch_size, workers=workers,
        previous=previous,
    )  # fmt: skip
    report = result.report
    index_started = time.perf_counter()
    previous_head = previous.priors.category_head if previous is not None and previous.priors is not None else None
    priors = fit_priors(result.features, [p.category for p in result.products], kind_head=embedder.kind_head, colours=result.colours, category_head=previous_head)
    report.priors = priors.info if priors is not None else {}
    report.out_dir = write_index(
        out_dir,
        result.features,
        result.products,
        fingerprint=embedder.fingerprint,
        catalog_hash=report.catalog_hash,
        priors=priors,
        preprocess=embedder.preprocess.to_json(),
        weights=weights_record(embedder.source),
        image_hashes=result.image_hashes,
        trained=previous.searcher if previous is not None else None,
        **index_options,
    )
    report.index_seconds = time.perf_counter() - index_started
    report.seconds = time.perf_counter() - started
    report.images_per_s = report.products / report.seconds if report.seconds > 0 else 0.0
    log.info("index build: %s", report.summary(max_problems=0))
    return report


def update_index(
    catalog_path: str | os.PathLike[str] | CatalogReadResult,
    index_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    embedder: Model,
    **build_options: Any,
) -> BuildReport:
    """Index the catalogue anew into ``out_dir`` from the index at ``index_dir``, which stays as it is (a
    version's index is never changed): pictures it holds keep their features and colours (by sha256, so a
    changed picture is embedded again and a moved one is not), new products are embedded, gone ones left
    out. Its projection and its trained search structure are kept, refilled rather than trained again,
    unless the catalogue has grown into another structure. ``build_options`` as :func:`build_index` takes them.
    """
    from ffengine.index import Index

    if Path(out_dir).resolve() == Path(index_dir).resolve():
        raise FFError(f"an update writes a new index: {out_dir} is the index it starts from")
    previous = Index.load(index_dir, expect_fingerprint=embedder.fingerprint)
    if previous.image_sha256 is None:
        raise FFError(f"Index {index_dir} was written before indexes kept their pictures' hashes: rebuild it once with `ffengine index build`")
    return build_index(
        catalog_path, out_dir, embedder, previous=previous, backend=previous.backend, projection=previous.projection,
        **{**previous.options, **build_options},
    )  # fmt: skip


def embed_catalog(
    catalog: str | os.PathLike[str] | CatalogReadResult,
    embedder: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    limit: int | None = None,
    fetch: FetchSettings | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    previous: Index | None = None,
) -> EmbeddedCatalog:
    """Blocking wrapper of :func:`aembed_catalog` (runs its own event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("embed_catalog() blocks; from async code use 'await aembed_catalog(...)'")
    return asyncio.run(
        aembed_catalog(
            catalog, embedder, cache_dir=cache_dir, progress=progress, limit=limit, fetch=fetch, batch_size=batch_size, workers=workers,
            previous=previous,
        )  # fmt: skip
    )


async def aembed_catalog(
    catalog: str | os.PathLike[str] | CatalogReadResult,
    embedder: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    limit: int | None = None,
    fetch: FetchSettings | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    previous: Index | None = None,
) -> EmbeddedCatalog:
    """Embed every usable product of ``catalog`` (a path or an already read catalogue).

    All file, decode and model work runs in worker threads: the event loop is never
    blocked, so this is safe to await inside the bot. ``workers`` sizes the decode
    pool (default: the number of CPUs); ``fetch`` sets download limits (default:
    :meth:`FetchSettings.from_env`, which reads the hosts and networks
    :data:`~ffengine.config.FETCH_ALLOW` opens). The pictures a ``previous`` index holds (by sha256)
    keep the features and colours it has for them.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    started = time.perf_counter()
    if isinstance(catalog, CatalogReadResult):
        read = catalog if limit is None else _truncate(catalog, limit)
    else:
        read = await asyncio.to_thread(read_catalog, catalog, limit=limit)
    cache = EmbeddingCache(cache_dir, embedder.fingerprint, embedder.dim) if cache_dir is not None else None
    colour_cache = EmbeddingCache(cache_dir, colour_cache_name(embedder.preprocess), COLOUR_BINS) if cache_dir is not None else None
    if previous is not None:
        cache, colour_cache = Reused.layers(previous, cache, colour_cache)
    http_cache = HttpCache.beside(cache_dir) if cache_dir is not None else None
    fetch = fetch or FetchSettings.from_env()
    inline = _embeds_inline(embedder)
    workers = workers or (os.cpu_count() or 2) + (1 if inline else 0)  # inline: one spare for file reads

    pool = ThreadPoolExecutor(workers, thread_name_prefix="ff-decode")
    model = ThreadPoolExecutor(1, thread_name_prefix="ff-embed")
    try:
        run = _Run(read, embedder, (cache, colour_cache), http_cache, fetch, pool, model, batch_size, progress)
        await run.go(in_flight=max(2 * batch_size, 4 * workers, fetch.concurrency))
    finally:  # all work is done unless we are failing; never wait for threads on the loop
        pool.shutdown(wait=False, cancel_futures=True)
        model.shutdown(wait=False, cancel_futures=True)

    done = await asyncio.to_thread(embedded_catalog, read, run, embedder.fingerprint, started)
    if isinstance(cache, Reused):
        done.report.reused = sum(digest in cache.rows for digest in done.image_hashes)
    return done


class Reused:
    """A previous index's features (or colour histograms) of its pictures, by sha256, in front of an
    embedding cache (``behind``, or none): what it does not hold is looked up and stored there."""

    def __init__(self, rows: dict[str, int], values: np.ndarray | None, behind: EmbeddingCache | None) -> None:
        self.rows, self.values, self.behind = rows, values, behind

    @classmethod
    def layers(cls, index: Index, cache: EmbeddingCache | None, colours: EmbeddingCache | None) -> tuple[Reused, Reused]:
        """The feature and colour layers of ``index`` (one that kept no pictures' hashes reuses nothing)."""
        digests = index.image_sha256
        rows = {} if digests is None else {bytes(d).hex(): row for row, d in enumerate(digests)}
        kept_colours = index.priors.colours if index.priors is not None else None
        return cls(rows, index.features, cache), cls(rows if kept_colours is not None else {}, kept_colours, colours)

    def get(self, digest: str) -> np.ndarray | None:
        row = self.rows.get(digest)
        if row is None:
            return self.behind.get(digest) if self.behind is not None else None
        return np.asarray(self.values[row], dtype=np.float32)  # type: ignore[index]

    def put(self, digest: str, value: np.ndarray) -> bool:
        return self.behind.put(digest, value) if self.behind is not None else False


def embedded_catalog(read: CatalogReadResult, run: _Run, fingerprint: str, started: float) -> EmbeddedCatalog:
    """The products that worked, their features, colours and hashes, and the report of the pass."""
    keep = [i for i in range(len(read.products)) if i not in run.failures]
    skipped = sorted(read.problems + list(run.failures.values()), key=lambda p: p.line)
    if not keep:
        raise CatalogError(no_usable_product(read.path, skipped))
    products = [read.products[i] for i in keep]
    kept_ids = {p.id for p in products}
    hashes = [run.hashes[i] for i in keep]
    every = len(keep) == len(read.products)
    features = run.features if every else np.ascontiguousarray(run.features[keep])
    colours = run.colours if every else np.ascontiguousarray(run.colours[keep])
    seconds = time.perf_counter() - started
    report = BuildReport(
        products=len(products),
        skipped=skipped,
        embedded=run.embedded,
        cached=run.cached,
        seconds=seconds,
        images_per_s=len(products) / seconds if seconds > 0 else 0.0,
        embed_seconds=seconds,
        catalog_hash=catalog_hash(products, hashes),
        fingerprint=fingerprint,
        downloaded=run.downloaded,
        revalidated=run.revalidated,
        catalog=read.path,
        warnings=[w for w in read.warnings if w.product_id in kept_ids],
    )
    return EmbeddedCatalog(features, colours, products, hashes, report)


def colour_cache_name(preprocess: Preprocess) -> str:
    """Colour histograms depend on the network input only: models fed the same way share them."""
    from ffengine.weights import preprocess_digest  # with torch, which the embedder has imported already

    return f"colours{COLOUR_CACHE_VERSION}-{preprocess_digest(preprocess)}"


def catalog_hash(products: Sequence[Product], image_hashes: Sequence[str]) -> str:
    """sha256 over each product's JSON and its image's content hash, in order."""
    digest = hashlib.sha256()
    for product, image in zip(products, image_hashes, strict=True):
        digest.update(json.dumps(product.to_json(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n" + image.encode() + b"\n")
    return digest.hexdigest()


def _truncate(read: CatalogReadResult, limit: int) -> CatalogReadResult:
    """The first ``limit`` products, and the problems met before the last of them (as ``read_catalog(limit=)``)."""
    if limit >= len(read.products):
        return read
    last = read.lines[limit - 1] if limit > 0 else 0
    return CatalogReadResult(
        read.products[:limit],
        [p for p in read.problems if p.line < last],
        read.lines[:limit],
        read.path,
        [w for w in read.warnings if w.line <= last],
    )


class _Run:
    """State of one embedding pass: per-product results plus the batching of model work."""

    def __init__(
        self,
        read: CatalogReadResult,
        embedder: FeatureExtractor,
        caches: tuple[EmbeddingCache | None, EmbeddingCache | None],
        http_cache: HttpCache | None,
        fetch: FetchSettings,
        pool: ThreadPoolExecutor,
        model: ThreadPoolExecutor,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.read = read
        self.embedder = embedder
        self.cache, self.colour_cache = caches
        self.http_cache = http_cache
        self.fetch = fetch
        self.pool = pool
        self.model = model
        self.batch_size = batch_size
        self.inline = _embeds_inline(embedder)
        n = len(read.products)
        self.features = np.zeros((n, embedder.dim), dtype=np.float32)
        self.colours = np.zeros((n, COLOUR_BINS), dtype=np.float16)
        self.hashes: list[str] = [""] * n
        self.failures: dict[int, Problem] = {}
        self.embedded = self.cached = self.downloaded = self.revalidated = self.unexpected = 0
        self.bar = tqdm(total=n, unit="img", desc="embedding", file=sys.stderr, disable=not progress, mininterval=0.5, dynamic_ncols=True)
        self._waiting: list[tuple[str, np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._producers = 0

    async def go(self, in_flight: int) -> None:
        """Process every product with ``in_flight`` concurrent workers."""
        todo = iter(range(len(self.read.products)))
        self._producers = min(in_flight, len(self.read.products))
        try:
            async with AsyncExitStack() as stack:
                needs_fetch = any(p.is_remote for p in self.read.products)
                fetcher = await stack.enter_async_context(Fetcher(self.fetch, self.http_cache)) if needs_fetch else None
                async with asyncio.TaskGroup() as group:
                    for _ in range(self._producers):
                        group.create_task(self._worker(todo, fetcher))
                if fetcher is not None:
                    self.downloaded, self.revalidated = fetcher.downloaded, fetcher.revalidated
        except ExceptionGroup as failed:  # the same fault reaches every waiting worker: report it once
            raise failed.exceptions[0] from None
        finally:
            self.bar.close()

    async def _worker(self, todo: Any, fetcher: Fetcher | None) -> None:
        try:
            for i in todo:  # a shared iterator: each index goes to exactly one worker
                await self._one(i, fetcher)
        finally:
            self._producers -= 1
            self._flush_if_stalled()

    async def _one(self, i: int, fetcher: Fetcher | None) -> None:
        product = self.read.products[i]
        loop = asyncio.get_running_loop()
        try:
            if product.is_remote:
                assert fetcher is not None
                source: str | bytes = await fetcher.get(product.image)
            else:
                source = product.image
            digest, feature, colour, pixels, fresh = await loop.run_in_executor(self.pool, self._inspect, source)
        except Exception as exc:  # noqa: BLE001 - whatever one picture raises costs that row only
            self.failures[i] = Problem(self.read.lines[i], product.id, self._fault(exc, product))
            self.bar.update()
            return
        self.hashes[i] = digest
        if feature is None:
            assert pixels is not None
            feature = await self._embed(digest, pixels)
        if fresh:
            self.embedded += 1
        else:
            self.cached += 1
        self.features[i] = feature
        self.colours[i] = colour
        self.bar.update()

    def _fault(self, exc: Exception, product: Product) -> str:
        """Why ``product``'s picture was skipped; an unforeseen error is also logged (with its traceback once)."""
        if not isinstance(exc, (ImageRejected, FetchError)):
            self.unexpected += 1
            log.log(logging.WARNING if self.unexpected == 1 else logging.DEBUG, "skipping %s", product.id, exc_info=exc)
        return _describe(exc, product)

    def _inspect(self, source: str | bytes) -> tuple[str, np.ndarray | None, np.ndarray, np.ndarray | None, bool]:
        """Worker thread: bytes -> ``(sha256, feature, colour histogram, pixels, embedded now)``.

        A cached feature and colour come back as they are. Otherwise the picture is decoded and
        prepared, its colour histogram taken, and it is either embedded right here (:attr:`inline`:
        one picture per worker thread, no hand-off) or its pixels go back for the model thread's
        next batch (``feature`` is then ``None``).
        """
        data = source if isinstance(source, bytes) else read_image_bytes(source, MAX_BYTES)
        digest = content_hash(data)
        cached = self.cache.get(digest) if self.cache is not None else None
        colour = self.colour_cache.get(digest) if self.colour_cache is not None else None
        if cached is not None and colour is not None:
            return digest, cached, colour, None, False
        image = load_image(data)
        try:
            pixels = self.embedder.prepare([image])[0]
        except Exception as exc:  # a decoded picture the resizer still chokes on: skip it, but say so loudly
            log.exception("cannot prepare a decoded image (sha256 %s)", digest)
            raise ImageRejected(f"cannot prepare the image ({type(exc).__name__}: {str(exc)[:100]})", "unpreparable") from None
        colour = colour_histogram(pixels)
        if self.colour_cache is not None:
            self.colour_cache.put(digest, colour)
        if cached is not None:
            return digest, cached, colour, None, False
        if not self.inline:
            return digest, None, colour, pixels, True
        feature = self.embedder.embed_arrays(pixels[None], on_caller_thread=True)[0]  # type: ignore[call-arg]
        if self.cache is not None:
            self.cache.put(digest, feature)
        return digest, feature, colour, None, True

    async def _embed(self, digest: str, pixels: np.ndarray) -> np.ndarray:
        """Queue one prepared image for the next batch and wait for its feature."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((digest, pixels, future))
        if len(self._waiting) >= self.batch_size:
            self._flush()
        else:
            self._flush_if_stalled()
        return await future

    def _flush_if_stalled(self) -> None:
        """Send a partial batch when every live worker is waiting on it (else nothing would move)."""
        if self._waiting and len(self._waiting) >= self._producers:
            self._flush()

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().run_in_executor(self.model, self._embed_batch, [(d, p) for d, p, _ in batch])

        def deliver(done: asyncio.Future[np.ndarray]) -> None:
            for row, (_, _, future) in enumerate(batch):
                if future.done():
                    continue
                if done.cancelled():
                    future.cancel()
                elif done.exception() is not None:
                    future.set_exception(done.exception())  # type: ignore[arg-type]
                else:
                    future.set_result(done.result()[row])

        task.add_done_callback(deliver)

    def _embed_batch(self, items: list[tuple[str, np.ndarray]]) -> np.ndarray:
        """Model thread: one forward pass, then remember the new features."""
        features = self.embedder.embed_arrays(np.stack([pixels for _, pixels in items]))
        if self.cache is not None:
            for (digest, _), feature in zip(items, features, strict=True):
                self.cache.put(digest, feature)
        return features


def _embeds_inline(embedder: FeatureExtractor) -> bool:
    """Whether each decode worker should embed its own picture (see ``Embedder.wants_one_picture_per_thread``):
    compiled CPU runtimes run fastest as one picture per core, and skipping the hand-off to a model
    thread saves ~20% CPU per image (bench/build_speed.py). Batching wins everywhere else (GPU)."""
    return bool(getattr(embedder, "wants_one_picture_per_thread", False))


def _describe(exc: Exception, product: Product) -> str:
    """A reason an admin can act on, naming the file or URL (and the error's type, when it is none of ours)."""
    where = redact_url(product.image) if product.is_remote else product.image
    if len(where) > 200:
        where = where[:200] + "..."
    if isinstance(exc, FetchError):
        return f"download failed ({exc}): {where}"
    if isinstance(exc, ImageRejected):
        return f"{IMAGE_FAULTS.get(exc.reason, str(exc))}: {where}"
    return f"cannot use the picture ({type(exc).__name__}: {str(exc)[:120]}): {where}"
