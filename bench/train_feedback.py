"""Benchmark: retraining from simulated 👍/👎 on catalog-10k, and how much feedback it takes.

Runs the same simulation as ``python -m train simulate`` (simulated shoppers send the
queries' train/ photos through Recommender -> record_search -> rate, liking a result when
its category matches the photo's class; the retrain chooses on validation/ photos) on the
whole catalog-10k, for several amounts of feedback, and reports category precision@5 on
the test/ photos before (the served, frozen ImageNet model) and after, plus timings.

    FFENGINE_WEIGHTS=../shared/models/mobilenet_v2_imagenet.pth python bench/train_feedback.py

Writes bench/results/train_feedback.json; caches features and indexes in bench/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffengine.config import EngineSettings  # noqa: E402
from train.simulate import SimulationOptions, simulate  # noqa: E402

SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
STUDY_BASELINE = 0.655  # the study's frozen MobileNetV2 + BallTree, category precision@5 on test


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shoppers", default="60,150,300,1000,all", help="comma-separated amounts of train photos (all = every one)")
    p.add_argument("--catalog-limit", type=int, help="first N products (default: all of catalog-10k)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_feedback.json")
    args = p.parse_args()
    weights = os.environ.get("FFENGINE_WEIGHTS") or str(SHARED / "models" / "mobilenet_v2_imagenet.pth")
    catalog = SHARED / "datasets" / "catalog-10k" / "products.csv"
    queries = SHARED / "datasets" / "queries"
    if not catalog.is_file() or not Path(weights).exists():
        print(f"needs {catalog} and {weights}", file=sys.stderr)
        return 2
    work = REPO / "bench" / "out" / "train_feedback"
    runs = []
    for amount in args.shoppers.split(","):
        shoppers = None if amount == "all" else int(amount)
        for stale in (work / "models", work / "sim.db", work / "sim.db-wal", work / "sim.db-shm"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        settings = EngineSettings(weights=weights, index_dir=work / "index", device=os.environ.get("FFENGINE_DEVICE", "auto"), data_dir=work)
        opts = SimulationOptions(catalog_limit=args.catalog_limit, shoppers=shoppers)
        started = time.perf_counter()
        result = asyncio.run(simulate(catalog, queries, settings, f"sqlite+aiosqlite:///{work / 'sim.db'}", opts))
        row = {**result.to_json(), "shoppers": result.feedback["searches"], "wall_seconds": round(time.perf_counter() - started, 1)}
        runs.append(row)
        print(
            f"{row['shoppers']:>5} rated searches: precision@5 {result.before:.3f} -> {result.after:.3f} "
            f"({'promoted' if result.promoted else 'kept'}), retrain {result.seconds['retrain']:.0f} s",
            flush=True,
        )
    report = {
        "what": "category precision@5 on the queries' test/ photos, catalog-10k, before/after retraining from simulated feedback",
        "study_baseline": STUDY_BASELINE,
        "weights": weights,
        "catalog_products": runs[-1]["catalog_products"],
        "test_photos": runs[-1]["test_photos"],
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print("\n| rated searches | 👍 | 👎 | before | after | promoted | retrain s | metric training s |")
    print("| ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: |")
    for r in runs:
        fb = r["feedback"]
        print(
            f"| {r['shoppers']} | {fb['likes']} | {fb['dislikes']} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{'yes' if r['promoted'] else 'no'} | {r['seconds']['retrain']:.0f} | {r['seconds']['metric_training']:.0f} |"
        )
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
