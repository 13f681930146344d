"""The shopper's own product first: is a screenshot of a catalogue product answered with that product?

    .venv/bin/python bench/identity.py                                   # the base index of catalog-10k
    .venv/bin/python bench/identity.py --index trained=data/models/demo/index

Screenshot-like copies of ``--products`` catalogue pictures (fixed seed; each a crop of 80-92 %, rescaled, turned
a few degrees, with a border of one colour, saved as JPEG), never the pictures the index holds. For each index:
exact-product hit@1 and hit@5 through ``Recommender`` (priors and duplicate collapse as served) and by plain
cosine (the index's nearest rows), the cosine distance of the copy to its product and to the nearest other
picture (what :data:`ffengine.recommend.IDENTITY_DISTANCE` is chosen from: on the first half of the products,
the identity rule's threshold; the second half is reported), and how often the priors demoted the product.
A hit is the product itself or a product with the very same picture (catalogues list one picture twice).
Writes ``bench/results/identity.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))

from ffengine.build import embed_catalog  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.evaluate import category_precision, read_category_map, read_queries  # noqa: E402
from ffengine.images import load_image  # noqa: E402
from ffengine.index import DEFAULT_REDUCTION, Index  # noqa: E402
from ffengine.prior import fit_priors  # noqa: E402
from ffengine.recommend import PriorRamp, Recommender  # noqa: E402


def screenshot(picture: Image.Image, rng: np.random.Generator) -> bytes:
    """What a shopper's screenshot of a product page does to its picture (the transforms of issue 18)."""
    w, h = picture.size
    share = rng.uniform(0.80, 0.92)
    cw, ch = int(w * share), int(h * share)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = picture.crop((left, top, left + cw, top + ch))
    scale = rng.uniform(0.7, 2.0)
    img = img.resize((max(8, int(cw * scale)), max(8, int(ch * scale))), Image.Resampling.BICUBIC)
    img = img.rotate(float(rng.uniform(-4, 4)), Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255))
    border = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.5 else (255, 255, 255)
    img = ImageOps.expand(img, border=int(rng.integers(0, max(2, img.width // 6))), fill=border)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(55, 91)))
    return buf.getvalue()


def same_picture(products: list[Any]) -> list[str]:
    """Each product's picture digest (a hit may be another product with the very same picture)."""
    return [hashlib.sha256(Path(p.image).read_bytes()).hexdigest() for p in products]


def evaluate(rec: Recommender, queries: np.ndarray, targets: np.ndarray, digests: list[str]) -> dict[str, Any]:
    """``queries (m, 1280)`` features of the copies of rows ``targets (m,)``: hits and distances."""
    index = rec.index
    row_of = rec.row_by_id
    served = rec.recommend_features(queries, 5)
    dist, idx = index.search(queries, 50)
    first, five, cos1, cos5, own, other, demoted = [], [], [], [], [], [], []
    for i, target in enumerate(targets):
        hit = [digests[row_of[r.product.id]] == digests[target] for r in served[i]]
        first.append(bool(hit[:1] and hit[0]))
        five.append(any(hit))
        same = np.array([digests[j] == digests[target] for j in idx[i]])
        cos1.append(bool(same[0]))
        cos5.append(bool(same[:5].any()))
        d = 0.5 * dist[i].astype(np.float64) ** 2  # cosine distance of normalised vectors
        own.append(float(d[same][0]) if same.any() else None)
        other.append(float(d[~same][0]))
        demoted.append(bool(same[0] and not first[-1]))
    return {
        "hit1": float(np.mean(first)),
        "hit5": float(np.mean(five)),
        "cosine_hit1": float(np.mean(cos1)),
        "cosine_hit5": float(np.mean(cos5)),
        "demoted_by_priors": float(np.mean(demoted)),
        "own_distance": own,
        "other_distance": other,
    }


def embed_paths(embedder: Embedder, paths: list[Path], batch: int = 64) -> np.ndarray:
    """``(len(paths), 1280)`` features of photos, decoded as the bot decodes them."""
    return np.concatenate([embedder.embed([load_image(p) for p in paths[i : i + batch]]) for i in range(0, len(paths), batch)])


def nearest_distance(index: Index, feats: np.ndarray) -> list[float]:
    """Each photo's cosine distance to its nearest catalogue picture."""
    dist, _ = index.search(feats, 1)
    return (0.5 * dist[:, 0].astype(np.float64) ** 2).round(4).tolist()


def distribution(values: list[float | None]) -> dict[str, Any]:
    """Percentiles of distances, and the shares at or below the ramp's start and at or above its end."""
    d = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    ramp = PriorRamp()
    out: dict[str, Any] = {f"p{q}": round(float(np.nanpercentile(d, q)), 4) for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)}
    return out | {"share_no_prior": round(float(np.nanmean(d <= ramp.none_until)), 4),
                  "share_full_prior": round(float(np.nanmean(d >= ramp.full_from)), 4), "n": int(np.sum(~np.isnan(d)))}  # fmt: skip


def summarised(found: dict[str, Any]) -> dict[str, Any]:
    """The rates as they are, the distances as distributions (the copies' nearest picture: own or other)."""
    own, other = found.pop("own_distance"), found.pop("other_distance")
    nearest = [o if o is not None and o < x else x for o, x in zip(own, other, strict=True)]
    shoppers = found.pop("shopper_nearest_distance")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in found.items()} | {
        "copy_own_distance": distribution(own),
        "copy_nearest_distance": distribution(nearest),
        "shopper_nearest_distance": {split: distribution(d) for split, d in shoppers.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=SHARED / "datasets" / "catalog-10k" / "products.csv")
    parser.add_argument("--weights", default=str(SHARED / "models" / "mobilenet_v2_imagenet.pth"))
    parser.add_argument("--index", action="append", default=[], help="NAME=DIR: also an index that was built (its own weights)")
    parser.add_argument("--queries", type=Path, default=SHARED / "datasets" / "queries")
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7, help="the copies reported (the ramp was chosen on --seed 18)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "identity.json")
    args = parser.parse_args()
    started = time.perf_counter()
    embedder = Embedder.load(args.weights, "cpu")
    catalogue = embed_catalog(args.catalog, embedder, cache_dir=REPO / "bench" / "out" / "cache", progress=False)
    base = Index(
        catalogue.features, catalogue.products, fingerprint=catalogue.report.fingerprint,
        projection=DEFAULT_REDUCTION.fit(catalogue.features), priors=fit_priors(catalogue.features, [p.category for p in catalogue.products]),
    )  # fmt: skip  # what `index build` writes
    indexes = {"base": (embedder, base)}
    for spec in args.index:
        name, folder = spec.split("=", 1)
        index = Index.load(folder)
        indexes[name] = (Embedder.load(index.manifest["weights"]["path"], "cpu"), index)
    rng = np.random.default_rng(args.seed)
    targets = np.sort(rng.choice(len(catalogue.products), args.products, replace=False))
    copies = [load_image(screenshot(load_image(catalogue.products[t].image), rng)) for t in targets]
    results: dict[str, Any] = {"products": int(args.products), "seed": args.seed, "catalog": str(args.catalog.name),
                               "ramp": {"none_until": PriorRamp().none_until, "full_from": PriorRamp().full_from}, "indexes": {}}  # fmt: skip
    shoppers = {split: read_queries(args.queries, split) for split in ("train", "validation", "test")}
    category_map = read_category_map(args.queries.parent / "query_categories.csv")
    labels = [label for _, label in shoppers["test"]]
    for index_name, (emb, index) in indexes.items():  # the copies, photos and pictures once per index
        digests = same_picture(list(index.products))
        queries = emb.embed(copies)
        photos = {split: embed_paths(emb, [p for p, _ in rows]) for split, rows in shoppers.items()}
        nearest = {s: nearest_distance(index, f) for s, f in photos.items() if s != "test"}
        # the priors always at full weight (as before), and by the best match's distance (now)
        for ramp_name, ramp in (("priors always", None), ("prior ramp", PriorRamp())):
            name, rec = f"{index_name}, {ramp_name}", Recommender(emb, index, ramp=ramp)
            row_targets = np.array([rec.row_by_id[catalogue.products[t].id] for t in targets])
            found = evaluate(rec, queries, row_targets, digests)
            found["shopper_nearest_distance"] = nearest
            found["shopper_test_p5"] = category_precision(rec.recommend_features(photos["test"], 5), labels, category_map).mean
            results["indexes"][name] = summarised(found)
            print(f"{name:28s} hit@1 {found['hit1']:.3f}  hit@5 {found['hit5']:.3f}  plain cosine {found['cosine_hit1']:.3f} / "
                  f"{found['cosine_hit5']:.3f}  demoted by priors {found['demoted_by_priors']:.3f}  shoppers' P@5 (test) "
                  f"{found['shopper_test_p5']:.3f}", flush=True)  # fmt: skip
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
