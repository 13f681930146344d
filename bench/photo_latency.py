"""Single-photo latency, as a shopper waits for it: read + decode + embed + search with the category prior + duplicate collapse.

    .venv/bin/python bench/photo_latency.py          # ../shared data and weights; ~2 min on 2 idle cores

``Recommender.recommend(path)`` for consumer photos (``validation/`` + ``test/``, real phone-style
pictures), one at a time, against the shipped default index of catalog-10k and of catalog-44k
(catalogue features from the embedding cache in ``bench/out/cache``), for each CPU runtime.
Reports p50/p95 wall time and the split between embedding (decode + model) and search.
Writes ``bench/results/photo_latency.json``.
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
CATALOGUES = ("catalog-10k", "catalog-44k")
RUNTIMES = ("openvino", "onnx")
PHOTOS = 200

from ffengine.build import embed_catalog  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.evaluate import read_queries  # noqa: E402
from ffengine.images import load_image  # noqa: E402
from ffengine.index import DEFAULT_REDUCTION, Index  # noqa: E402
from ffengine.prior import fit_priors  # noqa: E402
from ffengine.recommend import Recommender  # noqa: E402


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 2)


def measure(recommender: Recommender, photos: list[Path]) -> dict[str, Any]:
    for path in photos[:5]:  # warm-up: first calls allocate
        recommender.recommend(path)
    total, embed = [], []
    for path in photos:
        started = time.perf_counter()
        feats = recommender.embedder.embed([load_image(path)])
        mid = time.perf_counter()
        recommender.recommend_features(feats, 5)
        total.append(time.perf_counter() - started)
        embed.append(mid - started)
    return {
        "photos": len(photos),
        "p50_ms": ms(total, 50),
        "p95_ms": ms(total, 95),
        "decode_embed_p50_ms": ms(embed, 50),
        "search_p50_ms": ms([t - e for t, e in zip(total, embed, strict=True)], 50),
    }


def main() -> int:
    data = SHARED / "datasets"
    weights = str(SHARED / "models" / "mobilenet_v2_imagenet.pth")
    photos = [p for split in ("validation", "test") for p, _ in read_queries(data / "queries", split)][::3][:PHOTOS]
    embedders = {runtime: Embedder.load(weights, "cpu", runtime=runtime) for runtime in RUNTIMES}
    results = []
    for name in CATALOGUES:
        catalogue = embed_catalog(data / name / "products.csv", embedders["onnx"], cache_dir=REPO / "bench" / "out" / "cache", progress=False)
        priors = fit_priors(catalogue.features, [p.category for p in catalogue.products])  # what index build fits
        index = Index(
            catalogue.features, catalogue.products, fingerprint=catalogue.report.fingerprint, projection=DEFAULT_REDUCTION.fit(catalogue.features), priors=priors
        )
        for runtime, embedder in embedders.items():
            row = {"catalogue": name, "products": len(index), "runtime": runtime, **measure(Recommender(embedder, index), photos)}
            results.append(row)
            print(row, flush=True)
    out = REPO / "bench" / "results" / "photo_latency.json"
    summary = {"what": "Recommender.recommend(photo path): read + decode + embed + search with the category prior, one photo at a time", "results": results, "cpus": os.cpu_count(), "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| catalogue | runtime | p50 ms | p95 ms | decode+embed p50 | search p50 |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['catalogue']} | {r['runtime']} | {r['p50_ms']} | {r['p95_ms']} | {r['decode_embed_p50_ms']} | {r['search_p50_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
