"""Recommendation quality: what each step of "See the garment" adds, measured with the shipped code.

    .venv/bin/python bench/quality.py                 # ../shared data and weights: ~46 min on 2 busy cores
    .venv/bin/python bench/quality.py --skip-cli      # in-process numbers only (~43 min)

Two numbers per variant, both on catalog-10k:

* **category precision@5** of the consumer photos (``queries/``, splits train / validation / test),
  overall and per class: hits among the five results, a hit being a product whose ``category``
  ``query_categories.csv`` lists for the photo's class;
* **colour agreement@5**: every catalogue product as a query, its own picture left out of its five
  results (its copies too); the share of the first four others with the same ``colour`` column.

Variants (``VARIANTS``): (a) the study: crop preprocessing, raw 1280-d, BallTree, plain top 5;
(b) the previous default: crop, L2, exact, duplicates collapsed; (c) the whole picture, L2;
(d) whole + the category prior; (e) whole + the garment-kind head (trained by ``train.kinds`` on the
catalogue and the ``train`` photos only), with the category prior's weight 0 and at its default
(``e``: what a fine-tuned model with a kind head ships); (f) crop + the category prior.
In-process variants embed with ONNX Runtime (float32) through ``embed_catalog`` with the cache in
``bench/out/cache`` (the first run embeds ~13k photos per preprocessing: 2-4 min each on 2 cores, once).
Most of the time goes to ranking with priors (one query at a time in ``Recommender``, 20-60 ms each):
colour@5 asks 9,583 queries per variant, the weight sweeps 3,409 per weight.

Prior weights are chosen on train + validation only (the kind-head variants on validation only: the
head has seen the train photos); ``test`` is scored only at each variant's chosen weight. Then, end to
end as shipped: ``ffengine index build --no-cache`` + ``ffengine recommend --json`` on the test photos
(the category prior only: the shared weights have no kind head). Writes ``bench/results/quality.json``,
``docs/quality.png`` (12 fixed validation photos, results of (b) beside (e)) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
sys.path[:0] = [str(REPO), str(REPO / "bench")]
STUDY_TEST_PRECISION = 0.655
SPLITS = ("train", "validation", "test")

from ffengine.build import embed_catalog  # noqa: E402
from ffengine.catalog import Product  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.evaluate import PrecisionReport, category_precision, embed_photos, read_category_map, read_queries  # noqa: E402
from ffengine.index import Index, Reduction  # noqa: E402
from ffengine.prior import CATEGORY_WEIGHT, KIND_WEIGHT, LinearHead, Priors, fit_priors  # noqa: E402
from ffengine.recommend import Recommendation, Recommender, same_picture_as_any  # noqa: E402
from ffengine.weights import fingerprint, resolve_weights  # noqa: E402

# ---------------------------------------------------------------- data


@dataclass
class Photos:
    """The labelled consumer photos of every split and what counts as a hit for each label."""

    paths: dict[str, list[Path]]
    labels: dict[str, list[str]]
    category_map: dict[str, frozenset[str]]


@dataclass
class Embedded:
    """One preprocessing (``fit``): its embedder, the catalogue's features and every split's photo features."""

    fit: str
    embedder: Embedder
    products: list[Product]
    features: np.ndarray
    queries: dict[str, np.ndarray] = field(default_factory=dict)


def read_photos(data: Path) -> Photos:
    rows = {s: read_queries(data / "queries", s) for s in SPLITS}
    return Photos({s: [p for p, _ in r] for s, r in rows.items()}, {s: [lab for _, lab in r] for s, r in rows.items()}, read_category_map(data / "query_categories.csv"))


def make_embedder(weights: Path, fit: str) -> Embedder:
    """The shared weights with ``fit`` preprocessing ("whole" or the study's "crop"), float32 ONNX Runtime."""
    resolved = resolve_weights(str(weights))
    prep = replace(resolved.preprocess, fit=fit)
    digest = resolved.fingerprint.split("-")[0]
    return Embedder(replace(resolved, preprocess=prep, fingerprint=fingerprint(digest, prep)), "cpu", runtime="onnx")


def embed_everything(data: Path, weights: Path, fit: str, photos: Photos, cache: Path) -> Embedded:
    """Catalogue + all query photos through the shipped pipeline (``embed_catalog``), cached by model fingerprint."""
    embedder = make_embedder(weights, fit)
    catalog = embed_catalog(data / "catalog-10k" / "products.csv", embedder, cache_dir=cache, progress=True)
    out = Embedded(fit, embedder, list(catalog.products), catalog.features)
    for s in SPLITS:
        out.queries[s] = embed_photos(photos.paths[s], embedder, cache_dir=cache, progress=True)
    return out


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way to rank. ``prior``: None, "category" or "kind" (the kind head plus the category prior).

    ``sweep`` lists the weights tried (category weight, or kind weight with ``prior="kind"``);
    ``tune_on`` the splits that choose among them.
    """

    key: str
    name: str
    fit: str
    reduction: Reduction = Reduction(None, True)
    backend: str = "exact"
    prior: str | None = None
    category_weight: float = 0.0
    kind_weight: float = 0.0
    sweep: tuple[float, ...] = ()
    tune_on: tuple[str, ...] = ("train", "validation")
    plain: bool = False  # the study: the index's own top k, no duplicate collapse

    def at(self, weight: float) -> Variant:
        """This variant with the swept weight set to ``weight``."""
        return replace(self, kind_weight=weight) if self.prior == "kind" else replace(self, category_weight=weight)

    def setting(self) -> str:
        if self.prior is None:
            return "-"
        kind = f", kind {self.kind_weight:g}" if self.prior == "kind" else ""
        return f"category {self.category_weight:g}{kind}"


CATEGORY_SWEEP = (0.02, 0.05, 0.1)
KIND_SWEEP = (0.2, 0.5, 1.0)
VALIDATION = ("validation",)
VARIANTS = (
    # the study's BallTree is an exact search: the "exact" backend finds the same neighbours
    Variant("a", "study: crop, raw 1280-d, BallTree, plain top 5", "crop", Reduction(None, False), plain=True),
    Variant("b", "previous default: crop, L2, exact", "crop"),
    Variant("c", "whole picture, L2", "whole"),
    Variant("d", "whole + category prior", "whole", prior="category", sweep=CATEGORY_SWEEP),
    Variant("e0", "whole + kind head (category weight 0)", "whole", prior="kind", sweep=KIND_SWEEP, tune_on=VALIDATION),
    Variant("e", "whole + kind head + category prior (shipped)", "whole", prior="kind", category_weight=CATEGORY_WEIGHT, sweep=KIND_SWEEP, tune_on=VALIDATION),
    Variant("f", "crop + category prior", "crop", prior="category", sweep=CATEGORY_SWEEP),
)


def reweighted(priors: Priors, category: float, kind: float) -> Priors:
    """``priors`` with other term weights: the same as calling ``fit_priors`` with them (the fit never reads them)."""
    weights = {"category": category, "kind": kind}
    return replace(priors, terms=tuple(replace(t, weight=weights[t.name]) for t in priors.terms))


class Ranker:
    """Builds each variant's index from the embedded data, fitting each kind of prior once."""

    def __init__(self, embedded: dict[str, Embedded], kind_head: LinearHead) -> None:
        self.embedded = embedded
        self.kind_head = kind_head
        self._priors: dict[tuple[str, bool], Priors] = {}

    def priors(self, v: Variant) -> Priors | None:
        if v.prior is None:
            return None
        key = (v.fit, v.prior == "kind")
        if key not in self._priors:
            e = self.embedded[v.fit]
            head = self.kind_head if v.prior == "kind" else None
            self._priors[key] = fit_priors(e.features, [p.category for p in e.products], kind_head=head)  # type: ignore[assignment]
        return reweighted(self._priors[key], v.category_weight, v.kind_weight)

    def index(self, v: Variant) -> Index:
        e = self.embedded[v.fit]
        return Index(
            e.features, e.products, fingerprint=e.embedder.fingerprint, projection=v.reduction.fit(e.features),
            backend=v.backend, priors=self.priors(v),
        )  # fmt: skip

    def rank(self, v: Variant, index: Index, feats: np.ndarray, k: int) -> list[list[Recommendation]]:
        """The shipped ``Recommender`` (priors, duplicates collapsed), or the index's plain top ``k`` for the study."""
        if not v.plain:
            return Recommender(self.embedded[v.fit].embedder, index).recommend_features(feats, k)
        dist, idx = index.search(feats, k)
        return as_results(index.products, idx, dist)


def as_results(products: Sequence[Product], idx: np.ndarray, dist: np.ndarray) -> list[list[Recommendation]]:
    return [[Recommendation(products[j], float(d), r + 1) for r, (j, d) in enumerate(zip(row, drow, strict=True))] for row, drow in zip(idx, dist, strict=True)]


# ---------------------------------------------------------------- scores


def colour_agreement(results: Sequence[Sequence[Recommendation]], products: Sequence[Product], features: np.ndarray, others: int = 4) -> float:
    """``results[q]`` are catalogue product ``q``'s own results: leave out its picture (and copies of it,
    as ``Recommender`` defines them), then the share of the first ``others`` with ``q``'s colour."""
    row_of = {p.id: i for i, p in enumerate(products)}
    scores = []
    for q, recs in enumerate(results):
        colour = products[q].colour
        if not colour:
            continue
        rest = [r for r in recs if not same_picture_as_any(row_of[r.product.id], [q], products, features)][:others]
        scores.append(sum(r.product.colour == colour for r in rest) / others)
    return float(np.mean(scores)) if scores else 0.0


def pooled(reports: dict[str, PrecisionReport], splits: Sequence[str]) -> float:
    """Mean precision over the photos of ``splits`` together."""
    return sum(reports[s].mean * reports[s].n for s in splits) / sum(reports[s].n for s in splits)


def precision(ranker: Ranker, v: Variant, index: Index, photos: Photos, splits: Sequence[str]) -> dict[str, PrecisionReport]:
    feats = ranker.embedded[v.fit].queries
    return {s: category_precision(ranker.rank(v, index, feats[s], 5), photos.labels[s], photos.category_map) for s in splits}


def colour_at5(ranker: Ranker, v: Variant, index: Index) -> float:
    """Colour agreement@5 of the whole catalogue as queries (6 asked: the query's own picture comes back too)."""
    e = ranker.embedded[v.fit]
    return colour_agreement(ranker.rank(v, index, e.features, 12 if v.plain else 6), e.products, e.features)


def tune(ranker: Ranker, v: Variant, photos: Photos) -> tuple[Variant, list[dict[str, object]]]:
    """Each weight of ``v.sweep`` on train + validation (never test); the best by ``v.tune_on`` wins (ties: the smaller)."""
    rows = []
    for w in v.sweep:
        reports = precision(ranker, v.at(w), ranker.index(v.at(w)), photos, ("train", "validation"))
        rows.append({"weight": w, "setting": v.at(w).setting(), "train": reports["train"].mean, "validation": reports["validation"].mean,
                     "train+validation": pooled(reports, ("train", "validation")), "chosen_by": pooled(reports, v.tune_on)})  # fmt: skip
        print(f"  {v.key} {v.at(w).setting():24s} train {reports['train'].mean:.3f}  validation {reports['validation'].mean:.3f}", flush=True)
    best = max(rows, key=lambda r: (r["chosen_by"], -r["weight"]))  # type: ignore[operator]
    return v.at(best["weight"]), rows  # type: ignore[arg-type]


def score(ranker: Ranker, v: Variant, photos: Photos) -> dict[str, object]:
    """Everything at the chosen setting: precision on every split (test included) and colour@5."""
    t0 = time.perf_counter()
    index = ranker.index(v)
    reports = precision(ranker, v, index, photos, SPLITS)
    colour = colour_at5(ranker, v, index)
    print(f"  {v.key} {v.setting():24s} " + "  ".join(f"{s} {r.mean:.3f}" for s, r in reports.items()) + f"  colour@5 {colour:.3f}", flush=True)
    return {"key": v.key, "name": v.name, "setting": v.setting(), "category_weight": v.category_weight, "kind_weight": v.kind_weight,
            **{s: r.to_json() for s, r in reports.items()}, "colour@5": colour, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


# ---------------------------------------------------------------- end to end, as shipped


def score_cli(out_lines: list[str], labels: dict[str, str], cmap: dict[str, frozenset[str]]) -> PrecisionReport:
    """Precision@5 from ``ffengine recommend --json`` output (one object per photo)."""
    results, names = [], []
    for line in out_lines:
        row = json.loads(line)
        if "error" in row:
            raise SystemExit(f"ffengine recommend failed on {row['photo']}: {row['error']}")
        recs = [
            Recommendation(Product(id=r["id"], title=r["title"], url=r["url"], image=r["image"], category=r["category"]), r["distance"], r["rank"])
            for r in row["results"]
        ]
        results.append(recs)
        names.append(labels[row["photo"]])
    return category_precision(results, names, cmap)


def run_cli(data: Path, weights: Path, photos: Photos) -> dict[str, object]:
    """``ffengine index build --no-cache`` on catalog-10k, then ``ffengine recommend --json`` on the test photos."""
    index_dir = REPO / "bench" / "out" / "quality-index-10k"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "ffengine"]
    t0 = time.perf_counter()
    build = subprocess.run(
        [*base, "index", "build", "--catalog", str(data / "catalog-10k" / "products.csv"), "--out", str(index_dir),
         "--weights", str(weights), "--device", "cpu", "--no-cache", "--quiet"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    t1 = time.perf_counter()
    test = [str(p) for p in photos.paths["test"]]
    rec = subprocess.run(
        [*base, "recommend", "--index", str(index_dir), "--weights", str(weights), "--device", "cpu", "--json", *test],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    t2 = time.perf_counter()
    report = score_cli(rec.stdout.splitlines(), dict(zip(test, photos.labels["test"], strict=True)), photos.category_map)
    print(f"  cli: test {report.mean:.3f} (build {t1 - t0:.0f} s, recommend {t2 - t1:.0f} s)", flush=True)
    return {"test": report.to_json(), "build_summary": build.stdout.strip(), "build_seconds": round(t1 - t0, 1),
            "recommend_seconds": round(t2 - t1, 1), "photos": len(test)}  # fmt: skip


# ---------------------------------------------------------------- reports


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def split_table(scored: dict[str, dict], cli: dict[str, object] | None) -> str:
    rows = [["study (reported)", "-", "", "", f"{STUDY_TEST_PRECISION:.3f}", ""]]
    for key, r in scored.items():
        rows.append([f"({key}) {r['name']}", r["setting"], *[f"{r[s]['mean']:.3f}" for s in SPLITS], f"{r['colour@5']:.3f}"])
    if cli:
        rows.append(["`ffengine index build` + `recommend --json` (whole + category prior, as shipped)", "defaults", "", "", f"{cli['test']['mean']:.3f}", ""])  # type: ignore[index]
    return markdown(rows, ["variant", "prior weights", "train", "validation", "test", "colour@5"])


def class_table(scored: dict[str, dict], split: str) -> str:
    classes = sorted(next(iter(scored.values()))[split]["per_class"])
    rows = [[f"({key})", f"{r[split]['mean']:.3f}", *[f"{r[split]['per_class'][c]:.3f}" for c in classes]] for key, r in scored.items()]
    return markdown(rows, ["variant", "mean", *classes])


def tuning_table(tuning: dict[str, list[dict[str, object]]], chosen: dict[str, Variant]) -> str:
    rows = []
    for key, entries in tuning.items():
        for t in entries:
            mark = "yes" if t["setting"] == chosen[key].setting() else ""
            rows.append([f"({key})", str(t["setting"]), f"{t['train']:.3f}", f"{t['validation']:.3f}", f"{t['train+validation']:.3f}", mark])
    return markdown(rows, ["variant", "prior weights", "train", "validation", "train+validation", "chosen"])


def print_report(result: dict[str, object], chosen: dict[str, Variant]) -> None:
    scored, cli = result["variants"], result["cli_end_to_end"]
    print("\n## Prior weights, tuned on train + validation (kind head: validation only; it was trained on train)\n")
    print(tuning_table(result["tuning"], chosen))  # type: ignore[arg-type]
    print("\n" + "\n".join(f"- {line}" for line in result["chosen_vs_constants"]))  # type: ignore[union-attr]
    print("\n## Category precision@5 per split, colour agreement@5 (catalogue as queries)\n")
    print(split_table(scored, cli))  # type: ignore[arg-type]
    for split in ("validation", "test"):
        print(f"\n## Category precision@5 per class, {split} photos\n")
        print(class_table(scored, split))  # type: ignore[arg-type]


def compare_constants(chosen: dict[str, Variant]) -> list[str]:
    """Whether the shipped constants (ffengine/prior.py) are what this tuning picks."""
    d, e = chosen["d"].category_weight, chosen["e"].kind_weight
    return [
        f"category weight (whole, no kind head): chosen {d:g}; ffengine.prior.CATEGORY_WEIGHT = {CATEGORY_WEIGHT:g}" + ("" if d == CATEGORY_WEIGHT else "  <- differs"),
        f"kind weight (with category weight {CATEGORY_WEIGHT:g}): chosen {e:g}; ffengine.prior.KIND_WEIGHT = {KIND_WEIGHT:g}" + ("" if e == KIND_WEIGHT else "  <- differs"),
        f"kind weight with category weight 0: chosen {chosen['e0'].kind_weight:g}; crop + category prior: chosen {chosen['f'].category_weight:g}",
    ]


def draw_sheet(ranker: Ranker, chosen: dict[str, Variant], photos: Photos, out: Path) -> dict[str, object]:
    """docs/quality.png: 12 fixed validation photos, results of (b) beside those of (e)."""
    from quality_sheet import before_after, pick_photos

    picked = pick_photos(photos.labels["validation"])
    sides = []
    for key in ("b", "e"):
        v = chosen[key]
        feats = ranker.embedded[v.fit].queries["validation"][picked]
        sides.append(ranker.rank(v, ranker.index(v), feats, 5))
    paths = [photos.paths["validation"][i] for i in picked]
    captions = [f"{photos.labels['validation'][i]} ({p.name})" for i, p in zip(picked, paths, strict=True)]
    titles = (f"before: (b) {chosen['b'].name}", f"after: (e) {chosen['e'].name}, {chosen['e'].setting()}")
    before_after(paths, captions, sides[0], sides[1], titles, out)
    return {"path": str(out.relative_to(REPO)), "photos": [str(p.relative_to(p.parents[2])) for p in paths], "bytes": out.stat().st_size}


def main(argv: Sequence[str] | None = None) -> int:
    from train.kinds import fit_kind_head

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--sheet", type=Path, default=REPO / "docs" / "quality.png")
    parser.add_argument("--skip-cli", action="store_true", help="skip the end-to-end ffengine build/recommend run")
    args = parser.parse_args(argv)
    data, weights = args.shared / "datasets", args.shared / "models" / "mobilenet_v2_imagenet.pth"
    load_before, started = os.getloadavg(), time.perf_counter()

    photos = read_photos(data)
    embedded = {fit: embed_everything(data, weights, fit, photos, args.cache) for fit in ("whole", "crop")}
    assert [p.id for p in embedded["whole"].products] == [p.id for p in embedded["crop"].products]
    whole = embedded["whole"]
    head = fit_kind_head(whole.features, [p.category for p in whole.products], photos.category_map, whole.queries["train"], photos.labels["train"])
    ranker = Ranker(embedded, head)
    embedded_s = time.perf_counter() - started

    tuning, chosen, scored = {}, {}, {}
    for v in VARIANTS:
        chosen[v.key], tuning[v.key] = tune(ranker, v, photos) if v.sweep else (v, [])
        scored[v.key] = score(ranker, chosen[v.key], photos)
    tuning = {k: t for k, t in tuning.items() if t}
    sheet = draw_sheet(ranker, chosen, photos, args.sheet)
    cli = None if args.skip_cli else run_cli(data, weights, photos)

    result = {
        "what": "category precision@5 of query photos vs catalog-10k (query_categories.csv) and colour agreement@5 (catalogue as queries, "
        "own picture left out, same colour among the first 4 others); prior weights tuned on train+validation, test scored at the chosen ones",
        "weights": weights.name,
        "runtime": "onnx float32 (in process); the CLI run uses the shipped default runtime",
        "fingerprints": {fit: e.embedder.fingerprint for fit, e in embedded.items()},
        "catalogue": len(whole.products),
        "queries": {s: len(v) for s, v in photos.paths.items()},
        "study_reported_test": STUDY_TEST_PRECISION,
        "tuning": tuning,
        "chosen_vs_constants": compare_constants(chosen),
        "variants": scored,
        "sheet": sheet,
        "cli_end_to_end": cli,
        "seconds": {"embedding_and_kind_head": round(embedded_s, 1), "total": round(time.perf_counter() - started, 1)},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result, chosen)
    print(f"\nwrote {args.out.relative_to(REPO)} and {sheet['path']} ({sheet['bytes'] / 1e6:.1f} MB); {result['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
