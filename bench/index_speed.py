"""Search speed vs exactness of each backend and feature reduction, at 10k, 44k and 200k products.

    .venv/bin/python bench/index_speed.py                     # all sizes (needs ../shared; ~10 min on 2 cores)
    .venv/bin/python bench/index_speed.py --sizes 10k,44k --queries 100
    .venv/bin/python bench/index_speed.py --sizes 10k,44k,200k --end-to-end-only 200k --configs default --before REF --loads 3

Catalogue vectors are real MobileNetV2 features (../shared weights) of catalog-10k and
catalog-44k, embedded through ``ffengine.build.embed_catalog`` with the embedding cache in
``bench/out/cache``. "200k" is the 44k real vectors plus 155,559 jittered copies of random real
ones (each dimension + N(0, (0.25 * that dimension's std)^2), clipped at 0 like the ReLU6 features).
Queries are the consumer photos of ``validation/`` and ``test/`` (real user-style pictures).

For every (size, configuration): build seconds and peak traced memory of building the index,
resident size of its arrays (features, vectors, codes), single-query latency p50/p95 of ``Index.search``
with one BLAS thread (as a bot worker runs it), recall@5 against exact float32 search in the same vector
space (what the backend loses, float16 re-ranking included) and overlap@5 with the study's neighbours (exact, raw 1280-d: what
the reduction changes). Both compare distances, not row ids, so that a tie between identical
catalogue pictures counts as a hit whichever row is returned. The study's BallTree (scikit-learn)
is built here (:class:`BallTreeIndex`): a baseline, not a backend. For the shipped default also:
index write and load time (the fastest of ``--loads``) and the latency of a full
``Recommender.recommend_features`` call (duplicate collapse included).

``--configs`` keeps the configurations whose name contains one of its comma-separated words
(``none``: only the shipped default end to end; ``--end-to-end-only`` does that for some sizes). ``--before REF`` also measures the shipped default
of ``ffengine/index.py`` as it was at git commit REF (read with ``git show``, nothing checked out),
in the same run: its search as the configuration "before REF: default", its write and load beside
today's.
Writes ``bench/results/index_speed.json`` and prints markdown tables; records the load average,
since other processes on the machine slow every number down.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
SIZES = {"10k": "catalog-10k", "44k": "catalog-44k", "200k": "catalog-44k", "1m": "catalog-44k"}
#: Sizes made of catalog-44k plus jittered copies, and how many rows they have.
JITTERED = {"200k": 200_000, "1m": 1_000_000}
JITTER = 0.25

from ffengine.build import embed_catalog  # noqa: E402
from ffengine.catalog import Product  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.evaluate import embed_photos, neighbour_recall, read_queries  # noqa: E402
import ffengine.index as index_now  # noqa: E402
from ffengine.index import DEFAULT_BACKEND, DEFAULT_OPTIONS, DEFAULT_REDUCTION, Projection, Reduction  # noqa: E402
from ffengine.recommend import Recommender  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    reduction: Reduction
    backend: str  # an index backend, or "balltree": the study's, built here
    options: dict[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ()  # sizes where it only repeats a slower row (a 1280-d tree at 200k: minutes, 3 GB)
    code: ModuleType = index_now  # the index module it runs: today's, or --before's

    def build(self, feats: np.ndarray, products: list[Product], fp: str) -> Any:
        projection = self.code.Reduction(self.reduction.dims, self.reduction.normalize_input).fit(feats)
        if self.backend == "balltree":
            return BallTreeIndex(feats, projection, **self.options)
        return self.code.Index(feats, products, fingerprint=fp, projection=projection, backend=self.backend, options=self.options)


class BallTreeIndex:
    """The study's search: scikit-learn's BallTree over the projected vectors, Euclidean (exact)."""

    def __init__(self, feats: np.ndarray, projection: Projection, leaf_size: int = 40) -> None:
        from sklearn.neighbors import BallTree  # pip install -e ".[bench]"

        self.features, self.projection, self.options = feats, projection, {"leaf_size": leaf_size}
        self.vectors = projection.apply(feats)
        self.tree = BallTree(self.vectors, leaf_size=leaf_size, metric="euclidean")

    def search(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self.tree.query(self.projection.apply(feats), k=min(k, len(self.vectors)), sort_results=True)
        return dist.astype(np.float32), idx.astype(np.int64)


DEFAULT = "L2 1280-d, shipped default for the size"
CONFIGS = [
    Config("study: raw 1280-d, BallTree", Reduction(None, False), "balltree"),
    Config("L2 1280-d, BallTree", Reduction(None, True), "balltree", skip=("200k",)),
    Config("L2+PCA256, BallTree", Reduction(256, True), "balltree", skip=("200k",)),
    Config("L2+PCA128, BallTree", Reduction(128, True), "balltree"),
    Config("L2+PCA64, BallTree", Reduction(64, True), "balltree"),
    Config("L2 1280-d, PQ PCA64 (32x4 bit) -> rerank 400", Reduction(None, True), "shortlist", {"coarse_dims": 64, "shortlist": 400}),
    Config("L2 1280-d, PQ PCA128 (64x4 bit) -> rerank 200", Reduction(None, True), "shortlist", {"coarse_dims": 128, "shortlist": 200}),
    Config(DEFAULT, DEFAULT_REDUCTION, DEFAULT_BACKEND),  # options by size: effective_options(backend, {}, rows)
    Config("L2 1280-d, PQ PCA128 (64x4 bit) -> rerank 800", Reduction(None, True), "shortlist", {"coarse_dims": 128, "shortlist": 800}),
    Config("L2 1280-d, PQ PCA256 (128x4 bit) -> rerank 400", Reduction(None, True), "shortlist", {"coarse_dims": 256, "shortlist": 400}),
    Config("raw 1280-d, exact", Reduction(None, False), "exact"),
    Config("L2 1280-d, exact", Reduction(None, True), "exact"),
    Config("L2+PCA128, exact", Reduction(128, True), "exact"),
    Config("L2+PCA64, exact", Reduction(64, True), "exact"),
]


def code_at(ref: str) -> ModuleType:
    """``ffengine/index.py`` as it was at git commit ``ref``, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:ffengine/index.py"], capture_output=True, text=True, check=True).stdout
    name = "index_before"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    exec(compile(source, f"{ref}:ffengine/index.py", "exec"), module.__dict__)  # noqa: S102 - this repository's own code
    return module


def selected(words: str, before: ModuleType | None, ref: str) -> list[Config]:
    """The configurations ``--configs`` names, and --before's default just before today's."""
    keep = [c for c in CONFIGS if words != "none" and (words == "all" or any(w in c.name for w in words.split(",")))]
    if before is not None and any(c.name == DEFAULT for c in keep):
        old = Config(f"before {ref}: default", before.Reduction(None, True), before.DEFAULT_BACKEND, code=before)
        keep.insert(next(i for i, c in enumerate(keep) if c.name == DEFAULT), old)
    return keep


class FeatureOnly:
    """The two things Recommender needs from an embedder, to time it on cached features."""

    def __init__(self, fingerprint: str, dim: int) -> None:
        self.fingerprint, self.dim = fingerprint, dim


def nbytes(index: Any) -> int:
    """Arrays the index keeps in memory: features, vectors, and what its search adds (tree, codes, PCA)."""
    total = index.features.nbytes + (index.vectors.nbytes if index.vectors is not index.features else 0)
    searcher = getattr(index, "searcher", None)
    if isinstance(index, BallTreeIndex):
        total += sum(a.nbytes for a in index.tree.get_arrays())
    elif hasattr(searcher, "flat") and searcher.shortlist:  # today's: FAISS's codes and PCA beside the vectors
        base = faiss.downcast_index(searcher.index.base_index)
        pca = base.chain.at(0)
        total += faiss.downcast_index(base.index).code_size * len(index) + 4 * pca.d_in * pca.d_out
    elif getattr(searcher, "coarse", None) is not None:  # before: a PQ searcher over a PCA copy
        inner = searcher.inner
        total += searcher.coarse.matrix.nbytes + searcher.sq_norms.nbytes
        total += getattr(inner, "vectors", np.zeros(0)).nbytes + (inner.index.code_size * inner.index.ntotal if hasattr(inner, "index") else 0)
    return total


def exact_distances(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The reference: the ``k`` smallest distances per query, by FAISS's brute force, recomputed from differences."""
    return np.sort(true_distances(vectors, queries, faiss.knn(queries, vectors, k)[1]), axis=1)


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
    index = cfg.build(feats, products, fp)
    build_s = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with threadpool_limits(1):
        lat, cpu, rows = time_queries(lambda q: index.search(q, 5)[1][0], queries, budget)
    n = len(rows)
    projected = index.projection.apply(queries[:n])
    vectors = index.projection.apply(feats)  # float32: the reference, whatever precision the index keeps its copy in
    same_space = exact_distances(vectors, projected, 5)
    found_same = true_distances(vectors, projected, rows)
    del vectors
    found_study = true_distances(feats, queries[:n], rows)
    out = {
        "config": cfg.name,
        "reduction": cfg.reduction.label(),
        "backend": cfg.backend,
        "options": index.options,
        "code": cfg.code.__name__,
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
    return out  # the index goes with this frame; the next measure() collects it before building its own


def measure_defaults(codes: list[ModuleType], feats: np.ndarray, products: list[Product], queries: np.ndarray, fp: str, size: str, loads: int) -> list[dict[str, Any]]:
    """The shipped default of each index module as the bot uses it: write, load from disk (``loads`` times,
    the modules taking turns so that a busy spell slows both; the fastest counts), recommend (duplicates collapsed)."""
    where = {code: REPO / "bench" / "out" / f"speed-index-{size}-{code.__name__}" for code in codes}
    out = {code: {"size": size, "code": code.__name__, "load_s_all": []} for code in codes}
    for code in codes:
        t = time.perf_counter()
        code.write_index(where[code], feats, products, fingerprint=fp, catalog_hash="bench")
        out[code]["write_s"] = round(time.perf_counter() - t, 2)
    for _ in range(loads):
        for code in codes:
            gc.collect()
            t = time.perf_counter()
            code.Index.load(where[code], expect_fingerprint=fp)
            out[code]["load_s_all"].append(round(time.perf_counter() - t, 2))
    for code in codes:
        out[code].update(serving_memory(where[code], queries[:200], fp))
        index = code.Index.load(where[code], expect_fingerprint=fp)
        rec = Recommender(FeatureOnly(fp, index.dim), index)  # type: ignore[arg-type]
        with threadpool_limits(1):
            lat, cpu, _ = time_queries(lambda q: [r.product.id for r in rec.recommend_features(q, 5)[0]], queries[:200], 30)  # noqa: B023
        shutil.rmtree(where[code], ignore_errors=True)
        out[code].update(
            load_s=min(out[code]["load_s_all"]),
            recommend_p50_ms=round(float(np.percentile(lat, 50)) * 1e3, 3),
            recommend_p95_ms=round(float(np.percentile(lat, 95)) * 1e3, 3),
            recommend_cpu_p50_ms=round(float(np.percentile(cpu, 50)) * 1e3, 3),
        )
    return list(out.values())


SERVE = """
import sys, time, numpy as np
from ffengine.index import Index
from ffengine.recommend import Recommender
class FeatureOnly:
    def __init__(self, fingerprint, dim): self.fingerprint, self.dim = fingerprint, dim
def rss(field):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(field))
t = time.perf_counter()
index = Index.load(sys.argv[1], expect_fingerprint=sys.argv[3])
loaded_s, after_load = time.perf_counter() - t, rss("VmRSS:")
rec = Recommender(FeatureOnly(sys.argv[3], index.dim), index)
for q in np.load(sys.argv[2]):
    rec.recommend_features(q[None], 5)
print(loaded_s, after_load, rss("VmRSS:"), rss("VmHWM:"))
"""


def serving_memory(where: Path, queries: np.ndarray, fp: str) -> dict[str, float]:
    """A fresh process as a replica runs: load the index, answer ``queries``; its resident memory (MB) after
    loading, after answering and at its peak (memory-mapped pages it touched included), and its load time."""
    file = where.with_suffix(".queries.npy")
    np.save(file, queries)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SERVE, str(where), str(file), fp], capture_output=True, text=True, env=env, check=True)
    file.unlink()
    load_s, after_load, after_queries, peak = (float(x) for x in done.stdout.split())
    return {"fresh_process_load_s": round(load_s, 2), "rss_after_load_mb": round(after_load), "rss_serving_mb": round(after_queries), "rss_peak_mb": round(peak)}


def markdown(rows: list[list[str]], header: list[str]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index_speed.json")
    parser.add_argument("--sizes", default="10k,44k,200k")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per configuration (fewer if slow)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of query time per configuration before stopping early")
    parser.add_argument("--configs", default="all", help="comma-separated words: the configurations whose name holds one ('none': only the default end to end)")
    parser.add_argument("--before", metavar="REF", help="also measure the default of ffengine/index.py at git commit REF, in the same run")
    parser.add_argument("--loads", type=int, default=1, help="times each default index is loaded (the fastest counts)")
    parser.add_argument("--end-to-end-only", default="", metavar="SIZES", help="sizes measured only end to end (write, load, recommend), e.g. 200k")
    return parser.parse_args(argv)


def catalogue(size: str, data: Path, embedder: Embedder, cache: Path, loaded: dict[str, tuple[np.ndarray, list[Product]]]) -> tuple[np.ndarray, list[Product]]:
    """The catalogue features and products of ``size`` (embedded once per catalogue; 200k and 1m add jittered copies)."""
    folder = SIZES[size]
    if folder not in loaded:
        cat = embed_catalog(data / folder / "products.csv", embedder, cache_dir=cache, progress=True)
        loaded[folder] = (cat.features, cat.products)
    feats, products = loaded[folder]
    if size not in JITTERED:
        return feats, products
    feats = jittered(feats, JITTERED[size])
    return feats, products + [
        Product(id=f"jitter-{i}", title="jittered copy", url=f"https://shop.invalid/{i}", image=f"/nonexistent/{i}.jpg", category="x")
        for i in range(len(feats) - len(products))
    ]


def print_tables(results: list[dict[str, Any]], defaults: list[dict[str, Any]]) -> None:
    header = ["size", "configuration", "p50 ms", "p95 ms", "CPU p50 ms", "recall@5 vs exact", "overlap with study", "build s", "build peak MB", "resident MB"]
    rows = [
        [r["size"], r["config"], f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['cpu_p50_ms']:.2f}", f"{r['recall_at_5_vs_exact_same_space']:.4f}",
         f"{r['overlap_at_5_with_study_neighbours']:.3f}", f"{r['build_s']:.1f}", f"{r['build_peak_mb']:.0f}", f"{r['resident_mb']:.0f}"]
        for r in results
    ]  # fmt: skip
    print("\n" + markdown(rows, header))
    print("\n" + markdown([[d["size"], d["code"], f"{d['write_s']:.1f}", f"{d['load_s']:.2f}", f"{d['recommend_p50_ms']:.2f}", f"{d['recommend_p95_ms']:.2f}", f"{d['recommend_cpu_p50_ms']:.2f}",
                             f"{d['rss_serving_mb']}", f"{d['rss_peak_mb']}"] for d in defaults],
                          ["size", "code", "write s", "load s (fastest)", "recommend p50 ms", "recommend p95 ms", "recommend CPU p50 ms", "serving RSS MB", "peak RSS MB"]))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    before = code_at(args.before) if args.before else None
    configs = selected(args.configs, before, args.before)
    codes = [index_now] if before is None else [before, index_now]
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
        feats, products = catalogue(size, data, embedder, args.cache, loaded)
        print(f"\n# {size}: {len(feats)} vectors, {len(queries)} queries", flush=True)
        searched = [c for c in configs if size not in c.skip and size not in args.end_to_end_only.split(",")]
        study_ref = exact_distances(feats, queries, 5) if searched else None
        for cfg in searched:
            row = {"size": size, "n": len(feats), **measure(cfg, feats, products, queries, study_ref, fp, args.budget)}
            results.append(row)
            print(
                f"  {cfg.name:44s} p50 {row['p50_ms']:8.3f} ms  p95 {row['p95_ms']:8.3f} ms  cpu {row['cpu_p50_ms']:7.3f} ms  recall {row['recall_at_5_vs_exact_same_space']:.4f}"
                f"  study-overlap {row['overlap_at_5_with_study_neighbours']:.3f}  build {row['build_s']:.1f} s  peak {row['build_peak_mb']:.0f} MB",
                flush=True,
            )
        defaults += measure_defaults(codes, feats, products, queries, fp, size, args.loads)
        print(f"  default end to end: {defaults[-len(codes):]}", flush=True)
        del feats, products
        gc.collect()
    summary = {
        "what": "single-query search latency (1 BLAS thread) and recall@5 vs exact, per backend/reduction and catalogue size",
        "queries": "consumer photos (validation + test), real MobileNetV2 features",
        "size_200k": f"catalog-44k real features + jittered copies (noise {JITTER} x per-dimension std, clipped at 0)",
        "default": {"reduction": DEFAULT_REDUCTION.label(), "backend": DEFAULT_BACKEND, "options": DEFAULT_OPTIONS[DEFAULT_BACKEND]},
        "before": args.before,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "results": results,
        "default_end_to_end": defaults,
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print_tables(results, defaults)
    print(f"\nwrote {args.out}; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
