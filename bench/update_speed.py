"""Updating 1% of a catalogue against rebuilding it: ``ffengine index update`` on catalog-44k.

    .venv/bin/python bench/update_speed.py              # ~10 min on 2 cores (the full build embeds 44k pictures)
    .venv/bin/python bench/update_speed.py --limit 5000 # a quicker look

Steps, each timed, with ../shared's MobileNetV2 weights:

1. **full build**: ``index build`` of catalog-44k from scratch (no embedding cache: every picture embedded);
2. the catalogue a day later, 1% changed in three equal parts: products gone, products whose picture was
   replaced (the picture flipped: new content), and new products (pictures from catalog-10k, flipped so that
   no cache could know them);
3. **update**: ``index update`` from the first index to a new one, with no embedding cache either;
4. **rebuild with a warm cache**: ``index build`` of the changed catalogue with step 1's embedding cache (what a
   rebuild costs at best: every unchanged picture is still read and hashed, and the search trained again).

Also checks that the update holds what a fresh build of the changed catalogue holds (same products, features
equal within float16 rounding). Writes ``bench/results/update_speed.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))

from ffengine.build import build_index, update_index  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.index import Index  # noqa: E402


def changed_catalogue(source: Path, other: Path, out: Path, limit: int | None, share: float, seed: int = 0) -> dict[str, int]:
    """Write ``out/products.csv`` (+ ``out/images``): ``source``'s first ``limit`` rows with ``share`` of them
    changed as the module docstring says; returns how many of each."""
    with source.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:limit]
    with other.open(newline="", encoding="utf-8") as fh:
        extra = list(csv.DictReader(fh))
    rng = np.random.default_rng(seed)
    third = max(1, round(len(rows) * share / 3))
    picked = rng.choice(len(rows), 2 * third, replace=False)
    gone, replaced = set(picked[:third].tolist()), set(picked[third:].tolist())
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept = []
    for i, row in enumerate(rows):
        if i in gone:
            continue
        picture = source.parent / row["image"]
        if i in replaced:  # new content under the product's own picture name
            ImageOps.mirror(Image.open(picture).convert("RGB")).save(out / "images" / Path(row["image"]).name, quality=90)
            row = {**row, "image": f"images/{Path(row['image']).name}"}
        else:
            row = {**row, "image": str(picture.resolve())}
        kept.append(row)
    for j, row in enumerate(extra[:third]):
        name = f"new-{j}.jpg"
        ImageOps.mirror(Image.open(other.parent / row["image"]).convert("RGB")).save(out / "images" / name, quality=90)
        kept.append({**{k: row.get(k, "") for k in kept[0]}, "id": f"new-{row['id']}", "image": f"images/{name}"})
    with (out / "products.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    return {"products_before": len(rows), "gone": len(gone), "replaced": len(replaced), "added": third, "products_after": len(kept)}


def timed(step: str, results: dict[str, object], work):  # noqa: ANN001, ANN201
    started = time.perf_counter()
    report = work()
    results[step] = {"seconds": round(time.perf_counter() - started, 1), "embedded": report.embedded, "reused": report.reused,
                     "from_cache": report.cached - report.reused, "products": report.products}  # fmt: skip
    print(f"{step}: {results[step]}", flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, help="use the first N products of catalog-44k")
    parser.add_argument("--share", type=float, default=0.01, help="share of the catalogue changed (default 0.01)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "update_speed.json")
    args = parser.parse_args()
    work = REPO / "bench" / "out" / "update"
    shutil.rmtree(work, ignore_errors=True)
    source = SHARED / "datasets" / "catalog-44k" / "products.csv"
    os.environ["FFENGINE_IMAGE_ROOTS"] = str(source.parent.resolve())  # the changed catalogue names the originals by path
    changes = changed_catalogue(source, SHARED / "datasets" / "catalog-10k" / "products.csv", work / "day2", args.limit, args.share)
    if args.limit:
        with source.open(newline="", encoding="utf-8") as fh:
            lines = fh.readlines()[: args.limit + 1]
        first = work / "day1.csv"
        first.write_text("".join(lines).replace(",images/", f",{source.parent.resolve()}/images/"), encoding="utf-8")
    else:
        first = source
    print(f"catalogue changes: {changes}", flush=True)
    embedder = Embedder.load(str(SHARED / "models" / "mobilenet_v2_imagenet.pth"), "cpu")
    results: dict[str, object] = {"changes": changes, "cpu_count": os.cpu_count(), "runtime": embedder.runtime}
    day2 = work / "day2" / "products.csv"
    timed("full_build", results, lambda: build_index(first, work / "v1", embedder, cache_dir=work / "cache", progress=False))
    timed("update", results, lambda: update_index(day2, work / "v1", work / "v2", embedder, progress=False))
    timed("rebuild_warm_cache", results, lambda: build_index(day2, work / "v3", embedder, cache_dir=work / "cache", progress=False))
    updated, rebuilt = Index.load(work / "v2"), Index.load(work / "v3")
    rows = {p.id: i for i, p in enumerate(rebuilt.products)}
    order = [rows[p.id] for p in updated.products]
    same = sorted(rows) == sorted(p.id for p in updated.products)
    gap = float(np.abs(updated.features.astype(np.float32) - rebuilt.features[order].astype(np.float32)).max())
    full, update, warm = (results[k]["seconds"] for k in ("full_build", "update", "rebuild_warm_cache"))  # type: ignore[index]
    results.update(same_products=same, max_feature_gap=round(gap, 5), update_vs_full=round(update / full, 4), update_vs_warm_rebuild=round(update / warm, 4))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
