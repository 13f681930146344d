"""Search speed vs exactness of each backend and feature reduction, at 10k, 44k and 200k products.

    .venv/bin/python bench/index_speed.py                     # all sizes (needs ../shared; ~10 min on 2 cores)
    .venv/bin/python bench/index_speed.py --sizes 10k,44k --queries 100

Catalogue vectors are real MobileNetV2 features (../shared weights) of catalog-10k and
catalog-44k, embedded through ``ffengine.build.embed_catalog`` with the embedding cache in
``bench/out/cache``. "200k" is the 44k real vectors plus 155,559 jittered copies of random real
ones (each dimension + N(0, (0.25 * that dimension's std)^2), clipped at 0 like the ReLU6 features).
Queries are the consumer photos of ``validation/`` and ``test/`` (real user-style pictures).

For every (size, configuration): build seconds and peak traced memory of building the index,
resident size of its arrays (vectors + tree), single-query latency p50/p95 of ``Index.search``
with one BLAS thread (as a bot worker runs it), recall@5 against exact search in the same vector
space (what the backend loses) and overlap@5 with the study's neighbours (exact, raw 1280-d: what
the reduction changes). Both compare distances, not row ids, so that a tie between identical
catalogue pictures counts as a hit whichever row is returned. For the shipped default also: index load time and the latency of a full
``Recommender.recommend_features`` call (duplicate collapse included).
Writes ``bench/results/index_speed.json`` and prints markdown tables; records the load average,
since other processes on the machine slow every number down.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
SIZES = {"10k": "catalog-10k", "44k": "catalog-44k", "200k": "catalog-44k"}
JITTER = 0.25

from ffengine.build import embed_catalog  # noqa: E402
from ffengine.catalog import Product  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.evaluate import embed_photos, neighbour_recall, read_queries  # noqa: E402
from ffengine.index import DEFAULT_BACKEND, DEFAULT_OPTIONS, DEFAULT_REDUCTION, Index, Reduction, exact_search, write_index  # noqa: E402
from ffengine.recommend import Recommender  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    reduction: Reduction
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ()  # sizes where it only repeats a slower row (a 1280-d tree at 200k: minutes, 3 GB)


PLAIN = {"coarse_dims": None}
FLOATS = {"pq_subspaces": 0}
CONFIGS = [
    Config("study: raw 1280-d, BallTree", Reduction(None, False), "balltree", PLAIN),
    Config("L2 1280-d, BallTree", Reduction(None, True), "balltree", PLAIN, skip=("200k",)),
    Config("L2+PCA256, BallTree", Reduction(256, True), "balltree", PLAIN, skip=("200k",)),
    Config("L2+PCA128, BallTree", Reduction(128, True), "balltree", PLAIN),
    Config("L2+PCA64, BallTree", Reduction(64, True), "balltree", PLAIN),
    Config("L2 1280-d, BallTree on PCA64 -> rerank 400", Reduction(None, True), "balltree", {"coarse_dims": 64, "shortlist": 400}),
    Config("L2 1280-d, float scan PCA64 -> rerank 400", Reduction(None, True), "shortlist", {"coarse_dims": 64, "shortlist": 400, **FLOATS}),
    Config("L2 1280-d, float scan PCA128 -> rerank 200", Reduction(None, True), "shortlist", {"coarse_dims": 128, "shortlist": 200, **FLOATS}),
    Config("L2 1280-d, PQ PCA64 (32x4 bit) -> rerank 400", Reduction(None, True), "shortlist", {"coarse_dims": 64, "shortlist": 400}),
    Config("L2 1280-d, PQ PCA128 (64x4 bit) -> rerank 200", Reduction(None, True), "shortlist", {"coarse_dims": 128, "shortlist": 200}),
    Config("L2 1280-d, PQ PCA128 (64x4 bit) -> rerank 400", Reduction(None, True), "shortlist", {"coarse_dims": 128, "shortlist": 400}),
    Config("L2 1280-d, PQ PCA128 (64x4 bit) -> rerank 800", Reduction(None, True), "shortlist", {"coarse_dims": 128, "shortlist": 800}),
    Config("L2 1280-d, PQ PCA256 (128x4 bit) -> rerank 400", Reduction(None, True), "shortlist", {"coarse_dims": 256, "shortlist": 400}),
    Config("raw 1280-d, exact", Reduction(None, False), "exact"),
    Config("L2 1280-d, exact", Reduction(None, True), "exact"),
    Config("L2+PCA128, exact", Reduction(128, True), "exact"),
    Config("L2+PCA64, exact", Reduction(64, True), "exact"),
]


class FeatureOnly:
    """The two things Recommender needs from an embedder, to time it on cached features."""

    def __init__(self, fingerprint: str, dim: int) -> None:
        self.fingerprint, self.dim = fingerprint, dim


def nbytes(index: Index) -> int:
    """Arrays the index keeps in memory: features, vectors, the tree and its coarse projection."""
    total = index.features.nbytes + (index.vectors.nbytes if index.vectors is not index.features else 0)
    searcher = index.searcher
    tree = getattr(searcher, "tree", None)
    if tree is not None:
        total += sum(a.nbytes for a in tree.get_arrays())
    if getattr(searcher, "coarse", None) is not None:
        total += searcher.coarse.matrix.nbytes  # type: ignore[union-attr]
        inner = searcher.inner  # type: ignore[union-attr]
        total += getattr(inner, "vectors", np.zeros(0)).nbytes + (inner.index.code_size * inner.index.ntotal if hasattr(inner, "index") else 0)
    return total + getattr(searcher, "sq_norms", np.zeros(0)).nbytes


def jittered(feats: np.ndarray, total: int, seed: int = 0) -> np.ndarray:
    """``feats`` plus noisy copies of random rows up to ``total`` rows (see module docstring)."""
    rng = np.random.default_rng(seed)
    extra = total - len(feats)
    scale = (JITTER * feats.std(axis=0)).astype(np.float32)
    copies = feats[rng.integers(0, len(feats), extra)] + rng.standard_normal((extra, feats.shape[1]), dtype=np.float32) * scale
    return np.ascontiguousarray(np.vstack([feats, np.maximum(copies, 0)]), dtype=np.float32)


def true_distances(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Distances from each query to the rows a search returned for it, recomputed (not trusted)."""
    return np.linalg.norm(vectors[rows] - queries[:, None, :], axis=2)


def time_queries(search: Any, queries: np.ndarray, budget_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Single-query wall and CPU (this thread) latencies in s, and the results; stops after ``budget_s`` (min 20 queries).

    CPU time is what the query cost; wall time also holds waiting for a core the other
    processes on this shared machine had.
    """
    for q in queries[:3]:
        search(q[None, :])
    lat, cpu, rows = [], [], []
    spent = 0.0
    for i, q in enumerate(queries):
        t, c = time.perf_counter(), time.thread_time()
        result = search(q[None, :])
        cpu.append(time.thread_time() - c)
        lat.append(time.perf_counter() - t)
        rows.append(result)
        spent += lat[-1]
        if spent > budget_s and i >= 19:
            break
    return np.array(lat), np.array(cpu), np.array(rows)


def measure(cfg: Config, feats: np.ndarray, products: list[Product], queries: np.ndarray, study_ref: np.ndarray, fp: str, budget: float) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    index = Index(feats, products, fingerprint=fp, projection=cfg.reduction.fit(feats), backend=cfg.backend, options=cfg.options)
    build_s = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with threadpool_limits(1):
        lat, cpu, rows = time_queries(lambda q: index.search(q, 5)[1][0], queries, budget)
    n = len(rows)
    projected = index.projection.apply(queries[:n])
    same_space = exact_search(index.vectors, projected, 5)[0]
    found_same = true_distances(index.vectors, projected, rows)
    found_study = true_distances(feats, queries[:n], rows)
    out = {
        "config": cfg.name,
        "reduction": cfg.reduction.label(),
        "backend": cfg.backend,
        "options": index.options,
        "build_s": round(build_s, 3),
        "build_peak_mb": round(peak / 2**20, 1),
        "resident_mb": round(nbytes(index) / 2**20, 1),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 3),
        "cpu_p50_ms": round(float(np.percentile(cpu, 50)) * 1e3, 3),
        "queries_timed": n,
        "recall_at_5_vs_exact_same_space": round(neighbour_recall(found_same, same_space), 4),
        "overlap_at_5_with_study_neighbours": round(neighbour_recall(found_study, study_ref[:n]), 4),
    }
    del index
    gc.collect()
    return out


def measure_default(feats: np.ndarray, products: list[Product], queries: np.ndarray, fp: str, size: str) -> dict[str, Any]:
    """The shipped default as the bot uses it: write, load from disk, recommend (duplicates collapsed)."""
    where = REPO / "bench" / "out" / f"speed-index-{size}"
    t = time.perf_counter()
    write_index(where, feats, products, fingerprint=fp, catalog_hash="bench")
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    index = Index.load(where, expect_fingerprint=fp)
    load_s = time.perf_counter() - t
    rec = Recommender(FeatureOnly(fp, index.dim), index)  # type: ignore[arg-type]
    with threadpool_limits(1):
        lat, cpu, _ = time_queries(lambda q: [r.product.id for r in rec.recommend_features(q, 5)[0]], queries[:200], 30)
    shutil.rmtree(where, ignore_errors=True)
    return {
        "size": size,
        "write_s": round(write_s, 2),
        "load_s": round(load_s, 2),
        "recommend_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "recommend_p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 3),
        "recommend_cpu_p50_ms": round(float(np.percentile(cpu, 50)) * 1e3, 3),
    }


def markdown(rows: list[list[str]], header: list[str]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index_speed.json")
    parser.add_argument("--sizes", default="10k,44k,200k")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per configuration (fewer if slow)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of query time per configuration before stopping early")
    args = parser.parse_args(argv)
    data = args.shared / "datasets"
    load_before = os.getloadavg()
    embedder = Embedder.load(str(args.shared / "models" / "mobilenet_v2_imagenet.pth"), "cpu")
    fp = embedder.fingerprint
    photos = [p for split in ("validation", "test") for p, _ in read_queries(data / "queries", split)]
    queries = embed_photos(photos, embedder, cache_dir=args.cache, progress=True)[: args.queries]
    results: list[dict[str, Any]] = []
    defaults: list[dict[str, Any]] = []
    loaded: dict[str, tuple[np.ndarray, list[Product]]] = {}
    for size in args.sizes.split(","):
        folder = SIZES[size]
        if folder not in loaded:
            cat = embed_catalog(data / folder / "products.csv", embedder, cache_dir=args.cache, progress=True)
            loaded[folder] = (cat.features, cat.products)
        feats, products = loaded[folder]
        if size == "200k":
            feats = jittered(feats, 200_000)
            products = products + [
                Product(id=f"jitter-{i}", title="jittered copy", url=f"https://shop.invalid/{i}", image=f"/nonexistent/{i}.jpg", category="x")
                for i in range(len(feats) - len(products))
            ]
        print(f"\n# {size}: {len(feats)} vectors, {len(queries)} queries", flush=True)
        with threadpool_limits(1):
            study_ref = exact_search(feats, queries, 5)[0]
        for cfg in (c for c in CONFIGS if size not in c.skip):
            row = {"size": size, "n": len(feats), **measure(cfg, feats, products, queries, study_ref, fp, args.budget)}
            results.append(row)
            print(
                f"  {cfg.name:44s} p50 {row['p50_ms']:8.3f} ms  p95 {row['p95_ms']:8.3f} ms  cpu {row['cpu_p50_ms']:7.3f} ms  recall {row['recall_at_5_vs_exact_same_space']:.4f}"
                f"  study-overlap {row['overlap_at_5_with_study_neighbours']:.3f}  build {row['build_s']:.1f} s  peak {row['build_peak_mb']:.0f} MB",
                flush=True,
            )
        defaults.append(measure_default(feats, products, queries, fp, size))
        print(f"  default end to end: {defaults[-1]}", flush=True)
        del feats, products
        gc.collect()

    summary = {
        "what": "single-query search latency (1 BLAS thread) and recall@5 vs exact, per backend/reduction and catalogue size",
        "queries": "consumer photos (validation + test), real MobileNetV2 features",
        "size_200k": f"catalog-44k real features + jittered copies (noise {JITTER} x per-dimension std, clipped at 0)",
        "default": {"reduction": DEFAULT_REDUCTION.label(), "backend": DEFAULT_BACKEND, "options": DEFAULT_OPTIONS[DEFAULT_BACKEND]},
        "results": results,
        "default_end_to_end": defaults,
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    header = ["size", "configuration", "p50 ms", "p95 ms", "CPU p50 ms", "recall@5 vs exact", "overlap with study", "build s", "build peak MB", "resident MB"]
    rows = [
        [r["size"], r["config"], f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['cpu_p50_ms']:.2f}", f"{r['recall_at_5_vs_exact_same_space']:.4f}",
         f"{r['overlap_at_5_with_study_neighbours']:.3f}", f"{r['build_s']:.1f}", f"{r['build_peak_mb']:.0f}", f"{r['resident_mb']:.0f}"]
        for r in results
    ]  # fmt: skip
    print("\n" + markdown(rows, header))
    print("\n" + markdown([[d["size"], f"{d['write_s']:.1f}", f"{d['load_s']:.1f}", f"{d['recommend_p50_ms']:.2f}", f"{d['recommend_p95_ms']:.2f}", f"{d['recommend_cpu_p50_ms']:.2f}"] for d in defaults],
                          ["size", "write s", "load s", "recommend p50 ms", "recommend p95 ms", "recommend CPU p50 ms"]))  # fmt: skip
    print(f"\nwrote {args.out}; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
