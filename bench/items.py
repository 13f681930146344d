"""Which item? Items found in outfit photos, and what searching one item gives, on held-out catalogue shots.

    .venv/bin/python bench/items.py        # ../shared data and weights; a few minutes on 2 cores (cache warm)

catalog-10k's apparel is photographed on models, so a product shot shows more than the garment the
row sells. A fixed tenth of the catalogue (seeded) is held out; its apparel shots are the queries and
the other nine tenths are the store (built with ``build_index``, features from ``bench/out/cache``).
The row's ``category`` and ``colour`` are the truth. Queries alternate between two halves: the
engine's constants in :mod:`ffengine.items` were chosen on ``tune``; ``test`` is reported beside it.

For each query:
* item recall: the row's category is among the items :meth:`Recommender.answer_photos` offers;
* category precision@5 of the whole photo, unrestricted (what the shopper gets first);
* colour agreement@5 (results with the row's colour), all restricted to the row's category:
  the whole photo as ranked today (``whole``); the picked item, cropped and ranked with its colour
  (``item``, what pressing the item's button gives); and the whole photo ranked with the colour of its
  centre (``whole_colour``: what the colour term alone gives, without the crop). ``item`` and
  ``whole`` are scored on the photos whose item was found; the restriction makes precision 1.
* time: the photo with its feature map against the plain photo search, and each item's search.

Writes ``bench/results/items.json`` and the sheet ``docs/items.png`` (8 test photos: boxes and results).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))

from ffengine.build import build_index  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.images import load_image  # noqa: E402
from ffengine.index import Index  # noqa: E402
from ffengine.items import colour_histogram  # noqa: E402
from ffengine.recommend import Recommendation, Recommender  # noqa: E402
from ffengine.sheet import SheetRow, contact_sheet  # noqa: E402

HELD_OUT = 0.1
SHEET_PHOTOS = 8


def split(rows: list[dict[str, str]], seed: int = 0) -> np.ndarray:
    """Which rows are held out (a fixed tenth)."""
    return np.random.default_rng(seed).random(len(rows)) < HELD_OUT


def store_csv(rows: list[dict[str, str]], keep: np.ndarray, folder: Path, out: Path) -> Path:
    """The rest of the store as a catalogue file with absolute image paths (``folder`` must be an image root)."""
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row, kept in zip(rows, keep, strict=True):
            if kept:
                writer.writerow({**row, "image": str(folder / row["image"])})
    return out


def share(recs: Sequence[Recommendation], field: str, truth: str) -> float:
    return float(np.mean([(getattr(r.product, field) or "") == truth for r in recs])) if recs else 0.0


def whole_with_colour(rec: Recommender, image: Any, category: str) -> list[Recommendation]:
    """The whole photo, restricted to ``category``, ranked with the colour of its centre (no crop)."""
    pixels = rec.embedder.prepare([image])
    return rec.ranked_by_colour(rec.embedder.embed_arrays(pixels), colour_histogram(pixels[0]), rec.item_rows(category, 5), 5)


def score_photo(rec: Recommender, path: Path, row: dict[str, str]) -> dict[str, Any]:
    image = load_image(path)
    started = time.perf_counter()
    answer = rec.answer_photos([image])[0]
    photo_s = time.perf_counter() - started
    category, colour = row["category"], row["colour"]
    out: dict[str, Any] = {"id": row["id"], "photo_s": photo_s, "items": [i.category for i in answer.items]}
    out["families"] = len({rec.family_of(i.category) for i in answer.items})
    out["category_p5"] = share(answer.recommendations, "category", category)
    picked = next((i for i in answer.items if i.category == category), None)
    item_times = []
    for item in answer.items:
        started = time.perf_counter()
        _, found = rec.recommend_item(image, item)
        item_times.append(time.perf_counter() - started)
        if item is picked:
            out["item_colour5"] = share(found, "colour", colour)
            out["item_results"] = found
    out["item_s"] = item_times
    if picked is not None:
        out["whole_colour5"] = share(rec.recommend_features(answer.features[None], 5, {"category": category})[0], "colour", colour)
        out["whole_centre_colour5"] = share(whole_with_colour(rec, image, category), "colour", colour)
    return out


def summary(scored: list[dict[str, Any]]) -> dict[str, Any]:
    found = [s for s in scored if "item_colour5" in s]
    return {
        "photos": len(scored),
        "item_recall": round(len(found) / len(scored), 3),
        "items_per_photo": round(float(np.mean([len(s["items"]) for s in scored])), 2),
        "garment_families_per_photo": round(float(np.mean([s["families"] for s in scored])), 2),
        "category_p5_whole": round(float(np.mean([s["category_p5"] for s in scored])), 3),
        "picked_items": len(found),
        "colour5_whole_restricted": round(float(np.mean([s["whole_colour5"] for s in found])), 3),
        "colour5_item_crop": round(float(np.mean([s["item_colour5"] for s in found])), 3),
        "colour5_whole_with_centre_colour": round(float(np.mean([s["whole_centre_colour5"] for s in found])), 3),
    }


def draw_sheet(rec: Recommender, scored: list[dict[str, Any]], family: dict[str, str], images: Path, out: Path) -> Path:
    """Test photos with at least two items, those whose first two are different garments (families) first:
    per photo, a row for each of its first two items."""
    several = [s for s in scored if len(s["items"]) >= 2 and "item_colour5" in s]
    several.sort(key=lambda s: family.get(s["items"][0]) == family.get(s["items"][1]))  # stable: seeded order otherwise
    chosen = several[:SHEET_PHOTOS]
    rows = []
    for s in chosen:
        image = load_image(images / "images" / f"{s['id']}.jpg")
        for item in rec.answer_photos([image])[0].items[:2]:
            found = rec.recommend_item(image, item)[1]
            rows.append(SheetRow(image, f"{s['id']}: {item.category} {item.probability:.0%}", found, boxes=[(item.box, item.category)]))
    return contact_sheet(rows, out, thumb=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "items.json")
    parser.add_argument("--sheet", type=Path, default=REPO / "docs" / "items.png")
    args = parser.parse_args(argv)
    catalogue = args.shared / "datasets" / "catalog-10k"
    rows = list(csv.DictReader((catalogue / "products.csv").open(encoding="utf-8")))
    held = split(rows)
    embedder = Embedder.load(str(args.shared / "models" / "mobilenet_v2_imagenet.pth"), "cpu")
    os.environ["FFENGINE_IMAGE_ROOTS"] = str(catalogue)  # the store's file lives elsewhere, its pictures here
    with tempfile.TemporaryDirectory() as tmp:
        build_index(store_csv(rows, ~held, catalogue, Path(tmp) / "store.csv"), Path(tmp) / "index", embedder, cache_dir=args.cache, progress=False)
        rec = Recommender(embedder, Index.load(Path(tmp) / "index"))
    queries = [row for row, h in zip(rows, held, strict=True) if h and row["master_category"] == "Apparel"]
    for row in queries[:5]:  # warm-up
        rec.answer_photos([load_image(catalogue / row["image"])])
    scored = [score_photo(rec, catalogue / row["image"], row) for row in queries]
    plain = []
    for row in queries[:200]:
        image = load_image(catalogue / row["image"])
        started = time.perf_counter()
        rec.recommend_features(rec.embedder.embed([image]), 5)
        plain.append(time.perf_counter() - started)
    halves = {"tune": scored[0::2], "test": scored[1::2], "all": scored}
    item_ms = [t * 1e3 for s in scored for t in s["item_s"]]
    result = {
        "store": int((~held).sum()),
        "runtime": embedder.runtime,
        **{name: summary(part) for name, part in halves.items()},
        "photo_with_items_p50_ms": round(float(np.median([s["photo_s"] for s in scored])) * 1e3, 2),
        "photo_plain_p50_ms": round(float(np.median(plain)) * 1e3, 2),
        "item_search_p50_ms": round(float(np.median(item_ms)), 2),
        "item_search_p95_ms": round(float(np.percentile(item_ms, 95)), 2),
        "command": "bench/items.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    family = {row["category"]: row["sub_category"] for row in rows}
    print(f"sheet: {draw_sheet(rec, halves['test'], family, catalogue, args.sheet)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
