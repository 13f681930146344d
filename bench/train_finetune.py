"""Benchmark: fine-tuning on catalog-10k's labels on this CPU, then the engine's quality benchmark.

Runs ``python -m train finetune``'s code (frozen-prefix mode on a CPU: blocks 17-18 and a
label head train on cached features of clean + shopper-like views) and reports the study's
metric (held-out micro-F1 over attribute labels) and category precision@5 on the queries'
test/ photos for the frozen ImageNet model and the fine-tuned one, with training time.

    FFENGINE_WEIGHTS=../shared/models/mobilenet_v2_imagenet.pth python bench/train_finetune.py [--limit 4000]

Writes bench/results/train_finetune.json; caches in bench/out/.
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

from ffengine.build import build_index  # noqa: E402
from ffengine.config import EngineSettings  # noqa: E402
from ffengine.db import Database  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.index import Index  # noqa: E402
from train.evaluation import Benchmark, LabelledPhotos  # noqa: E402
from train.finetune import FinetuneOptions  # noqa: E402
from train.finetune_run import FinetuneRunOptions, finetune_catalog_async  # noqa: E402
from train.labels import DEFAULT_ATTRIBUTES  # noqa: E402

SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
STUDY = {"precision5_frozen_imagenet": 0.655, "micro_f1_mobilenetv2_149_labels": 0.396}


async def run(args: argparse.Namespace, weights: str, attributes: str) -> dict:
    catalog = SHARED / "datasets" / "catalog-10k" / "products.csv"
    queries = SHARED / "datasets" / "queries"
    work = REPO / "bench" / "out" / "train_finetune"
    for stale in (work / "models", work / "ft.db", work / "ft.db-wal", work / "ft.db-shm"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    device = os.environ.get("FFENGINE_DEVICE", "auto")
    settings = EngineSettings(weights=weights, index_dir=work / "index", device=device, data_dir=work)
    base = await asyncio.to_thread(Embedder.load, weights, device)
    t0 = time.perf_counter()
    await asyncio.to_thread(build_index, catalog, settings.index_dir, base, cache_dir=settings.cache_dir, progress=False)
    print(f"base index ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    training = FinetuneOptions(
        mode=args.mode, train_from=args.train_from, epochs=args.epochs, views=args.views, limit=args.limit, batch_size=args.batch_size,
        attributes=tuple(attributes.split(",")),
    )
    db = await Database.open(f"sqlite+aiosqlite:///{work / 'ft.db'}")
    try:
        started = time.perf_counter()
        result = await finetune_catalog_async(
            db, settings, catalog, options=FinetuneRunOptions(training, eval_queries=queries),
            progress=lambda f, t: print(f"[{f:4.0%}] {t}", flush=True),
        )
        seconds = time.perf_counter() - started
        version = await db.get_model_version(result.version)  # type: ignore[arg-type]
    finally:
        await db.close()
    assert version is not None

    test = LabelledPhotos.read(queries, "test")
    tuned = await asyncio.to_thread(Embedder.load, version.weights, device)
    before = (await asyncio.to_thread(Benchmark.prepare, test, base, settings.cache_dir)).score(Index.load(settings.index_dir))
    after = (await asyncio.to_thread(Benchmark.prepare, test, tuned, settings.cache_dir)).score(Index.load(Path(version.index_dir)))
    m = result.metrics
    return {
        "what": "fine-tuning MobileNetV2 on catalog-10k attribute labels; category precision@5 on the queries' test/ photos",
        "study": STUDY,
        "command": " ".join(sys.argv),
        "options": {k: getattr(training, k) for k in ("mode", "train_from", "epochs", "views", "limit", "batch_size", "lr", "attributes")},
        "labels": m["labels"],
        "micro_f1_holdout": m["micro_f1"],
        "micro_f1_holdout_shopper_views": m["micro_f1_shopper_view"],
        "products_train": m["products_train"],
        "products_holdout": m["products_holdout"],
        "finetune_seconds": m["seconds"],
        "seconds_total_with_index_and_eval": round(seconds, 1),
        "precision5_validation": {"frozen": m.get("precision5_before"), "finetuned": m.get("precision5_after")},
        "precision5_test": {"frozen": before.mean, "finetuned": after.mean},
        "per_class_test": {"frozen": before.per_class, "finetuned": after.per_class},
        "test_photos": before.n,
        "status": result.status,
        "reason": result.reason,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "device": str(base.device),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="auto", choices=("auto", "frozen-prefix", "full"))
    p.add_argument("--train-from", type=int, default=17)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--limit", type=int, help="train on this many products (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--attributes", action="append", help="catalogue columns used as labels, comma-separated; repeat for several runs "
                   f"(default: {','.join(DEFAULT_ATTRIBUTES)})")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_finetune.json")
    args = p.parse_args()
    weights = os.environ.get("FFENGINE_WEIGHTS") or str(SHARED / "models" / "mobilenet_v2_imagenet.pth")
    if not (SHARED / "datasets" / "catalog-10k").is_dir() or not Path(weights).exists():
        print(f"needs {SHARED}/datasets/catalog-10k and {weights}", file=sys.stderr)
        return 2
    runs = [asyncio.run(run(args, weights, attributes)) for attributes in args.attributes or [",".join(DEFAULT_ATTRIBUTES)]]
    report = {"what": runs[0].pop("what"), "study": runs[0].pop("study"), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print("\n| model | labels | micro-F1 (held-out) | precision@5 validation | precision@5 test | fine-tune time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| frozen ImageNet (study: 0.655) | - | - | {runs[0]['precision5_validation']['frozen']:.3f} | {runs[0]['precision5_test']['frozen']:.3f} | - |")
    for r in runs:
        print(
            f"| fine-tuned on {', '.join(r['options']['attributes'])} | {r['labels']} | {r['micro_f1_holdout']:.3f} | "
            f"{r['precision5_validation']['finetuned']:.3f} | {r['precision5_test']['finetuned']:.3f} | {r['finetune_seconds']:.0f} s |"
        )
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
