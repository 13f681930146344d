"""``python -m train`` / ``ffengine-train``: fine-tune, retrain from feedback, simulate, list and roll back versions.

Settings come from the environment (and ``.env``): ``FFENGINE_WEIGHTS``, ``FFENGINE_INDEX``,
``FFENGINE_DEVICE``, ``FFENGINE_DATA_DIR``, ``DATABASE_URL``, ``FFENGINE_EVAL_QUERIES``,
``TRAIN_KEEP_REJECTED``. Without ``FFENGINE_WEIGHTS`` the weights file ``FFENGINE_INDEX`` records is used.
Progress goes to stderr, a summary to stdout; ``--json`` adds one JSON object as the
last line of stdout. A problem a person can fix prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ffengine.cli import program_name
from ffengine.config import EngineSettings, database_url, env_str, load_dotenv_file
from ffengine.errors import FFError
from train.labels import DEFAULT_ATTRIBUTES

#: Commands that load weights (the others only read the database): without FFENGINE_WEIGHTS, the index's own.
LOADS_A_MODEL = ("finetune", "feedback", "simulate", "catalog")


def progress_printer() -> Callable[[float, str], None]:
    def show(fraction: float, text: str) -> None:
        print(f"[{fraction:4.0%}] {text}", file=sys.stderr, flush=True)

    return show


def emit(summary: str, payload: dict[str, Any], as_json: bool) -> None:
    print(summary)
    if as_json:
        print(json.dumps(payload, default=str, sort_keys=True))


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def share(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {number}")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program_name("train"), description="Fine-tune, retrain from feedback, simulate, list and roll back model versions.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd: argparse.ArgumentParser, *, db: bool = True) -> None:
        cmd.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        if db:
            cmd.add_argument("--database-url", help="SQLAlchemy URL (default: DATABASE_URL or the data dir's SQLite file)")

    def evaluation(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--queries", type=Path, help="labelled shopper photos (labels.csv) to compare on; default FFENGINE_EVAL_QUERIES")
        cmd.add_argument("--categories", type=Path, help="query_categories.csv (default: beside the queries folder)")
        cmd.add_argument("--eval-limit", type=positive, help="score on this many validation photos (a seeded subsample)")
        cmd.add_argument("--name", help="name of the new model version (default <kind>-<UTC time>)")
        cmd.add_argument("--no-activate", action="store_true", help="register the new version but leave the active one")

    ft = sub.add_parser("finetune", help="train the garment-kind head on labelled shoppers' photos and the catalogue (optionally the last backbone blocks first)")
    ft.add_argument("--catalog", type=Path, help="products CSV/JSONL (default FFENGINE_CATALOG)")
    ft.add_argument("--mode", choices=("auto", "frozen-prefix", "full"), default="auto", help="auto: full on a GPU, frozen-prefix on a CPU")
    ft.add_argument("--train-from", type=int, default=19,
                    help="first backbone block fine-tuned on the catalogue's labels before the kind head (0-18); 19 = the kind head only (default: %(default)s)")
    ft.add_argument("--epochs", type=positive, default=6, help="backbone fine-tuning epochs (default: %(default)s)")
    ft.add_argument("--limit", type=positive, help="train on this many products (a seeded subset)")
    ft.add_argument("--views", type=int, default=2, help="augmented shopper-like views per product")
    ft.add_argument("--batch-size", type=positive, default=64, help="backbone fine-tuning batch size (default: %(default)s)")
    ft.add_argument("--lr", type=float, default=1e-3, help="backbone fine-tuning learning rate of its label head (default: %(default)s)")
    ft.add_argument("--min-label-count", type=positive, default=10, help="keep attribute=value labels seen this often")
    ft.add_argument("--attributes", default=",".join(DEFAULT_ATTRIBUTES), help="catalogue columns used as labels (comma-separated)")
    evaluation(ft)
    common(ft)

    fb = sub.add_parser("feedback", help="retrain the search from logged 👍/👎 (what /retrain runs)")
    fb.add_argument("--min-searches", type=positive, help="rated searches needed (default 40)")
    fb.add_argument("--min-pairs", type=positive, help="(👍, 👎) pairs needed (default 100)")
    fb.add_argument("--metric-steps", type=positive, help="optimisation steps of the metric (default 200)")
    evaluation(fb)
    common(fb)

    sim = sub.add_parser("simulate", help="simulated shoppers rate results; retrain; compare precision@5 on test photos")
    sim.add_argument("--catalog", type=Path, required=True, help="products CSV/JSONL")
    sim.add_argument("--queries", type=Path, required=True, help="labelled photos with train/validation/test splits (labels.csv)")
    sim.add_argument("--categories", type=Path, help="query_categories.csv (default: beside the queries folder)")
    sim.add_argument("--workdir", type=Path, help="where the index, versions, cache and database go (default <data dir>/simulate)")
    sim.add_argument("--catalog-limit", type=positive, default=4000, help="first N catalogue products (default 4000)")
    sim.add_argument("--all-products", action="store_true", help="use the whole catalogue")
    sim.add_argument("--shoppers", type=positive, default=1500, help="train photos sent by simulated shoppers (default 1500)")
    sim.add_argument("--test-limit", type=positive, help="score on this many test photos (default all)")
    sim.add_argument("--eval-limit", type=positive, help="validation photos used to decide promotion (default all)")
    sim.add_argument("--rate-share", type=share, default=1.0, help="chance a shopper rates each result (default 1)")
    sim.add_argument("--metric-steps", type=positive, help="optimisation steps of the metric (default 200)")
    common(sim)

    cat = sub.add_parser("catalog", help="a changed catalogue as a new active version: only new and changed pictures are embedded")
    cat.add_argument("--catalog", type=Path, help="the whole catalogue as it is now, CSV/JSONL (default FFENGINE_CATALOG)")
    cat.add_argument("--name", help="name of the new model version (default catalog-<UTC time>)")
    cat.add_argument("--no-activate", action="store_true", help="register the new version but leave the active one")
    common(cat)

    models = sub.add_parser("models", help="list model versions")
    common(models)
    rb = sub.add_parser("rollback", help="make an earlier model version active again")
    rb.add_argument("version", help="version name (or id)")
    common(rb)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    load_dotenv_file()
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = EngineSettings.from_env()
        if args.command in LOADS_A_MODEL:
            settings = settings.with_index_weights()
        url = args.database_url or database_url()
        return COMMANDS[args.command](args, settings, url)
    except FFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, an unwritable data folder: the run has removed what it wrote
        print(f"error: {exc}; the active model version is unchanged", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the active model version is unchanged", file=sys.stderr)
        return 130


def cmd_finetune(args: argparse.Namespace, settings: EngineSettings, url: str) -> int:
    from ffengine.errors import ConfigError
    from train.finetune import FinetuneOptions
    from train.finetune_run import FinetuneRunOptions, finetune_catalog

    catalog = args.catalog or settings.catalog
    if catalog is None:
        raise ConfigError("no catalogue: pass --catalog PRODUCTS_CSV or set FFENGINE_CATALOG")
    training = FinetuneOptions(
        mode=args.mode, train_from=args.train_from, epochs=args.epochs, limit=args.limit, views=args.views, batch_size=args.batch_size,
        lr=args.lr, min_label_count=args.min_label_count, attributes=tuple(a.strip() for a in args.attributes.split(",") if a.strip()),
    )
    opts = FinetuneRunOptions(training, args.queries, args.categories, eval_limit=args.eval_limit, name=args.name)
    result = finetune_catalog(url, settings, catalog, options=opts, progress=progress_printer(), activate=not args.no_activate)
    m = result.metrics
    learned = [f"kind head on {m['kind_photos']} shoppers' photos + {m['kind_products']} products"] if "kind_photos" in m else []
    learned += [f"held-out micro-F1 {m['micro_f1']:.3f} on {m['labels']} labels"] if "micro_f1" in m else []
    summary = f"{result.status}: {result.reason}\n{'; '.join(learned)}; {m.get('seconds', 0):.0f} s"
    emit(summary, result.to_json(), args.json)
    return 0


def cmd_feedback(args: argparse.Namespace, settings: EngineSettings, url: str) -> int:
    from train.feedback import FeedbackOptions, retrain_from_feedback

    opts = FeedbackOptions(eval_queries=args.queries, eval_categories=args.categories, eval_limit=args.eval_limit, name=args.name)
    if args.min_searches:
        opts = replace(opts, min_searches=args.min_searches)
    if args.min_pairs:
        opts = replace(opts, min_pairs=args.min_pairs)
    if args.metric_steps:
        opts = replace(opts, metric=replace(opts.metric, steps=args.metric_steps))
    result = retrain_from_feedback(url, settings, progress=progress_printer(), options=opts, activate=not args.no_activate)
    emit(f"{result.status}: {result.reason}", result.to_json(), args.json)
    return 0


def cmd_simulate(args: argparse.Namespace, settings: EngineSettings, url: str) -> int:
    from train.feedback import FeedbackOptions
    from train.simulate import SimulationOptions, simulate

    workdir = (args.workdir or settings.data_dir / "simulate").resolve()
    explicit = args.database_url or env_str(os.environ, "DATABASE_URL")
    if not explicit:  # our own database: start it afresh each time (the cache is kept)
        for stale in workdir.glob("simulate.db*"):
            stale.unlink()
        shutil.rmtree(workdir / "models", ignore_errors=True)
        url = f"sqlite+aiosqlite:///{workdir / 'simulate.db'}"
    sim_settings = replace(settings, data_dir=workdir, index_dir=workdir / "index")
    opts = SimulationOptions(
        catalog_limit=None if args.all_products else args.catalog_limit,
        shoppers=args.shoppers,
        test_limit=args.test_limit,
        rate_share=args.rate_share,
        feedback=FeedbackOptions(eval_limit=args.eval_limit),
    )
    if args.metric_steps:
        opts = replace(opts, feedback=replace(opts.feedback, metric=replace(opts.feedback.metric, steps=args.metric_steps)))
    result = asyncio.run(simulate(args.catalog, args.queries, sim_settings, url, opts, categories=args.categories, progress=progress_printer()))
    fb = result.feedback
    summary = (
        f"category precision@5 on {result.test_photos} test photos: before {result.before:.3f}, after {result.after:.3f} "
        f"({'promoted' if result.promoted else 'not promoted'}: {result.reason})\n"
        f"feedback: {fb['searches']} searches, {fb['ratings']} ratings ({fb['likes']} 👍, {fb['dislikes']} 👎); "
        f"catalogue {result.catalog_products} products; retraining {result.seconds['retrain']:.0f} s, total {result.seconds['total']:.0f} s"
    )
    emit(summary, result.to_json(), args.json)
    return 0


def with_db(url: str, work: Callable[[Any], Any]) -> Any:
    from ffengine.db import Database

    async def go() -> Any:
        db = await Database.open(url)
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(go())


def cmd_catalog(args: argparse.Namespace, settings: EngineSettings, url: str) -> int:
    from ffengine.errors import ConfigError
    from train.catalogue import update_catalogue_async

    catalog = args.catalog or settings.catalog
    if catalog is None:
        raise ConfigError("no catalogue: pass --catalog PRODUCTS_CSV or set FFENGINE_CATALOG")
    result = with_db(url, lambda db: update_catalogue_async(db, settings, Path(catalog), name=args.name, progress=progress_printer(), activate=not args.no_activate))
    emit(f"{result.status}: {result.reason}", result.to_json(), args.json)
    return 0


def cmd_models(args: argparse.Namespace, settings: EngineSettings, url: str) -> int:
    from train.versions import describe

    async def work(db: Any) -> list[dict[str, Any]]:
        return [describe(v) for v in await db.list_model_versions()]

    versions = with_db(url, work)
    lines = [f"{'*' if v['active'] else ' '} {v['name']:<32} {v['created_at'][:19]}  {v['notes'] or ''}"[:160] for v in versions]
    emit("\n".join(lines) or "no model versions yet", {"versions": versions}, args.json)
    return 0


def cmd_rollback(args: argparse.Namespace, settings: EngineSettings, url: str) -> int:
    from train.versions import describe, rollback

    async def work(db: Any) -> dict[str, Any]:
        return describe(await rollback(db, args.version))

    version = with_db(url, work)
    emit(f"{version['name']} is now the active model version", {"active": version}, args.json)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, EngineSettings, str], int]] = {
    "finetune": cmd_finetune,
    "feedback": cmd_feedback,
    "simulate": cmd_simulate,
    "catalog": cmd_catalog,
    "models": cmd_models,
    "rollback": cmd_rollback,
}

if __name__ == "__main__":
    sys.exit(main())
