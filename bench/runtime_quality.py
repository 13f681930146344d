"""Does the CPU runtime change the answers? Each compiled runtime, the whole catalogue, every photo.

    .venv/bin/python bench/runtime_quality.py        # ../shared data and weights; ~4 min on 2 cores

OpenVINO computes in bfloat16 on CPUs that have it; ONNX Runtime in float32 (it agrees with
PyTorch fp32 to cosine >= 0.99999, bench/embed_speed.py). For each runtime this embeds catalog-10k
and all 3,781 consumer photos from scratch (no embedding cache: the cache is keyed by model, not
runtime), through the shipped pipeline (``embed_catalog``, so the build throughput of each runtime
is measured too), and scores category precision@5 per split with the shipped index and
``Recommender``. Also: cosine of OpenVINO's features to ONNX Runtime's, and precision when the
catalogue was embedded by one runtime and the photos by the other (an index built on one machine
serving queries on another). Writes ``bench/results/runtime_quality.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
RUNTIMES = ("onnx", "openvino")
SPLITS = ("train", "validation", "test")

from ffengine.build import embed_catalog  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.evaluate import category_precision, embed_photos, read_category_map, read_queries  # noqa: E402
from ffengine.index import DEFAULT_REDUCTION, Index  # noqa: E402
from ffengine.recommend import Recommender  # noqa: E402
from ffengine.runtime_onnx import cosine_rows  # noqa: E402


def precision(embedder: Embedder, catalogue: Any, features: np.ndarray, photos: np.ndarray, labels: list[str], mapping: dict) -> float:
    index = Index(features, catalogue.products, fingerprint=embedder.fingerprint, projection=DEFAULT_REDUCTION.fit(features))
    results = Recommender(embedder, index).recommend_features(photos, 5)
    return round(category_precision(results, labels, mapping).mean, 4)


def main() -> int:
    data = SHARED / "datasets"
    weights = SHARED / "models" / "mobilenet_v2_imagenet.pth"
    mapping = read_category_map(data / "query_categories.csv")
    queries = {split: read_queries(data / "queries", split) for split in SPLITS}
    runs: dict[str, dict[str, Any]] = {}
    for runtime in RUNTIMES:
        embedder = Embedder.load(str(weights), "cpu", runtime=runtime)
        assert embedder.runtime == runtime, f"{runtime} is not usable here ({embedder.runtime} runs instead)"
        started = time.perf_counter()
        catalogue = embed_catalog(data / "catalog-10k" / "products.csv", embedder, cache_dir=None, progress=True)
        seconds = time.perf_counter() - started
        photos = {split: embed_photos([p for p, _ in rows], embedder, cache_dir=None) for split, rows in queries.items()}
        runs[runtime] = {"embedder": embedder, "catalogue": catalogue, "photos": photos}
        runs[runtime]["summary"] = {
            "precision_inference": getattr(embedder._runner, "precision", "f32"),
            "catalogue_images_per_s": round(len(catalogue.products) / seconds, 1),
        }
        print(f"{runtime}: catalogue at {runs[runtime]['summary']['catalogue_images_per_s']} img/s", flush=True)

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_average_after": [round(v, 2) for v in os.getloadavg()]}, "runtimes": {}}
    for runtime, run in runs.items():
        rows = dict(run["summary"])
        for split, rows_ in queries.items():
            rows[f"precision_at_5_{split}"] = precision(run["embedder"], run["catalogue"], run["catalogue"].features, run["photos"][split], [l for _, l in rows_], mapping)
        result["runtimes"][runtime] = rows
    onnx, ov = runs["onnx"], runs["openvino"]
    assert [p.id for p in onnx["catalogue"].products] == [p.id for p in ov["catalogue"].products]
    cos_cat = cosine_rows(ov["catalogue"].features, onnx["catalogue"].features)
    cos_q = cosine_rows(np.concatenate([ov["photos"][s] for s in SPLITS]), np.concatenate([onnx["photos"][s] for s in SPLITS]))
    result["openvino_vs_onnx_cosine"] = {
        "catalogue": {"min": round(float(cos_cat.min()), 5), "p1": round(float(np.percentile(cos_cat, 1)), 5), "mean": round(float(cos_cat.mean()), 5)},
        "photos": {"min": round(float(cos_q.min()), 5), "p1": round(float(np.percentile(cos_q, 1)), 5), "mean": round(float(cos_q.mean()), 5)},
    }
    result["mixed"] = {
        "onnx catalogue, openvino photos": {
            split: precision(onnx["embedder"], onnx["catalogue"], onnx["catalogue"].features, ov["photos"][split], [l for _, l in queries[split]], mapping) for split in SPLITS
        },
    }
    out = REPO / "bench" / "results" / "runtime_quality.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
