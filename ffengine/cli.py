"""``ffengine``: build an index, get recommendations for photos, upgrade the database.

    ffengine index build --catalog products.csv --out data/index [--weights FILE] [--device cpu]
    ffengine index info [DIR]
    ffengine recommend --index data/index [--k 5] [--json] [--items] [--sheet sheet.png] photo.jpg ...
    ffengine db upgrade

Settings come from the environment (and ``.env``): ``FFENGINE_WEIGHTS``, ``FFENGINE_DEVICE``,
``FFENGINE_INDEX``, ``FFENGINE_DATA_DIR``, ``DATABASE_URL``; flags override them. Without
``--weights`` or ``FFENGINE_WEIGHTS``, ``recommend`` uses the weights file the index records.
``recommend --json`` writes nothing but its JSON lines to stdout: whatever else prints
(a library's download notice) goes to stderr.
Exit codes: 0 success (``recommend``: at least one photo worked), 1 every photo failed,
2 an error that stops the command (bad setting, missing weights or index, unwritable output),
printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ffengine.config import DEFAULT_WEIGHTS, EngineSettings, check_device, check_runtime, database_url, load_dotenv_file, shown_url
from ffengine.errors import FFError, ImageRejected
from ffengine.index import BACKENDS, DEFAULT_BACKEND

if TYPE_CHECKING:
    from PIL import Image

    from ffengine.index import Index
    from ffengine.items import Item
    from ffengine.recommend import Recommendation
    from ffengine.sheet import SheetRow

#: Photos embedded per forward pass by ``recommend`` (bounds memory for long photo lists).
RECOMMEND_BATCH = 32


def program_name(module: str) -> str:
    """The command as the user typed it, for usage lines: the console script's name, or
    ``python -m MODULE`` (where Python's own default would say ``__main__.py``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return f"python -m {module}" if name in ("", "-c", "-m", "__main__.py") else name


def package_version() -> str:
    """The installed FocusedFashion version (``--version``, the bot's start-up line)."""
    try:
        return version("focusedfashion")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version``: the program's name and :func:`package_version` (what a bug report needs first)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def settings_from(args: argparse.Namespace) -> EngineSettings:
    """Environment settings with ``--weights`` / ``--device`` / ``--runtime`` / ``--index`` applied on top."""
    settings = EngineSettings.from_env()
    if getattr(args, "weights", None):
        settings = replace(settings, weights=args.weights, weights_chosen=True)
    if getattr(args, "device", None):
        settings = replace(settings, device=check_device(args.device, "--device"))
    if getattr(args, "runtime", None):
        settings = replace(settings, runtime=check_runtime(args.runtime, "--runtime"))
    if getattr(args, "index", None):
        settings = replace(settings, index_dir=Path(args.index))
    return settings


def load_embedder(settings: EngineSettings):  # -> Embedder (imported lazily: torch is slow to import)
    from ffengine.embedder import Embedder

    return Embedder.load(settings.weights, settings.device, runtime=settings.runtime)


# ---------------------------------------------------------------- index


def cmd_index_build(args: argparse.Namespace) -> int:
    from ffengine.build import build_index
    from ffengine.index import Reduction

    settings = settings_from(args)
    embedder = load_embedder(settings)
    options: dict[str, object] = {"backend": args.backend}
    if args.pca is not None:
        options["projection"] = Reduction(dims=args.pca or None, normalize_input=not args.no_l2)
    cache = None if args.no_cache else (args.cache or settings.cache_dir)
    report = build_index(args.catalog, args.out, embedder, cache_dir=cache, progress=not args.quiet, **options)
    print(report.summary(max_problems=args.show_skipped))
    return 0


def cmd_index_update(args: argparse.Namespace) -> int:
    from ffengine.build import update_index

    settings = settings_from(args).with_index_weights()  # the weights the index was built with, unless --weights
    cache = None if args.no_cache else (args.cache or settings.cache_dir)
    report = update_index(args.catalog, settings.index_dir, args.out, load_embedder(settings), cache_dir=cache, progress=not args.quiet)
    print(report.summary(max_problems=args.show_skipped))
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from ffengine.index import Index, Reduction

    index = Index.load(settings_from(args).index_dir)
    m = index.manifest
    recipe = m["projection"].get("recipe")
    try:
        space = Reduction(**recipe).label() if recipe else "a learned projection"
    except (TypeError, ValueError):
        space = "unknown projection recipe"
    weights = m.get("weights") or {}
    made_by = weights.get("path") or weights.get("url") or "not recorded (pass --weights to use this index)"
    sha = f" (sha256 {weights['sha256']})" if "sha256" in weights else ""
    lines = [
        f"{Path(index.path or '.').resolve()}: {len(index)} products, created {m.get('created', '?')}",
        f"  model      {index.fingerprint}; weights {made_by}{sha}",
        f"  features   {m['dim']}-d, searched as {m['vector_dim']}-d ({space})",
        f"  search     {search_in_effect(index)}",
        f"  catalogue  {str(m.get('catalog_hash', '?'))[:16]}",
    ]
    print("\n".join(lines))
    return 0


def search_in_effect(index: Index) -> str:
    """The backend with its options, and what the loaded index does with them: small catalogues are
    scanned exactly whatever the options say."""
    options = ", ".join(f"{k}={v}" for k, v in index.options.items()) or "no options"
    return f"backend {index.backend} {options}: {index.searcher.describe()}"


# ---------------------------------------------------------------- recommend


def cmd_recommend(args: argparse.Namespace) -> int:
    """``recommend``: only our result lines reach stdout, anything else printed meanwhile goes to stderr."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return recommend(args, out)


def recommend(args: argparse.Namespace, out: TextIO) -> int:
    from ffengine.images import load_image
    from ffengine.index import Index
    from ffengine.recommend import Recommender, normalise_filters

    if args.k < 1:
        raise FFError(f"--k must be at least 1, got {args.k}")
    settings = settings_from(args).with_index_weights()
    index = Index.load(settings.index_dir)
    recommender = Recommender(load_embedder(settings), index)
    filters = {name: value for name, value in (("category", args.category), ("gender", args.gender)) if value}
    try:
        recommender.filter_mask(normalise_filters(filters))  # refuse an unknown filter before any work
    except ValueError as exc:
        raise FFError(str(exc)) from None
    if args.items and (index.priors is None or index.priors.category_head is None):
        raise FFError(f"--items needs an index whose catalogue has categories; {settings.index_dir} has none")
    sheet_rows: list[SheetRow] = []
    worked = 0
    for start in range(0, len(args.photos), RECOMMEND_BATCH):
        chunk = args.photos[start : start + RECOMMEND_BATCH]
        images, errors = {}, {}
        for photo in chunk:
            try:
                images[photo] = load_image(photo)
            except ImageRejected as exc:
                errors[photo] = str(exc)
        answers = dict(zip(images, recommender.answer_photos(list(images.values()), args.k, filters), strict=True)) if images else {}
        for photo in chunk:
            if photo in errors:
                report_error(photo, errors[photo], args.json, out)
                sheet_rows.append(sheet_row(None, photo, (), errors[photo]))
                continue
            worked += 1
            answer = answers[photo]
            items = [(item, recommender.recommend_item(images[photo], item, args.k)[1]) for item in answer.items] if args.items else []
            classes = recommender.photo_classes(answer.features[None])[0]
            report_results(photo, answer.recommendations, args.json, classes, items, out)
            sheet_rows.append(sheet_row(images[photo], photo, answer.recommendations, None, [item for item, _ in items]))
            sheet_rows += [sheet_row(images[photo], photo, recs, None, [item]) for item, recs in items]
    if args.sheet and sheet_rows:
        from ffengine.sheet import contact_sheet

        path = contact_sheet(sheet_rows, args.sheet, k=args.k)
        print(f"contact sheet: {path}", file=sys.stderr)
    return 0 if worked else 1


def sheet_row(
    image: Image.Image | None, photo: str, recs: Sequence[Recommendation], error: str | None, items: Sequence[Item] = ()
) -> SheetRow:
    """A contact-sheet row; with one item, the row shows that item's box and results."""
    from ffengine.sheet import SheetRow

    if len(items) == 1:
        caption = f"{items[0].category} {items[0].probability:.0%} in {Path(photo).name}"
    else:
        caption = Path(photo).name
    return SheetRow(image, caption, recs, error, boxes=[(item.box, item.category) for item in items])


def results_json(recs: Sequence[Recommendation]) -> list[dict[str, object]]:
    return [
        {
            "id": r.product.id,
            "title": r.product.title,
            "url": r.product.url,
            "image": r.product.image,
            "category": r.product.category,
            "rank": r.rank,
            "distance": round(r.distance, 6),
        }
        for r in recs
    ]


def report_results(
    photo: str,
    recs: Sequence[Recommendation],
    as_json: bool,
    classes: dict[str, list[dict[str, object]]],
    items: Sequence[tuple[Item, Sequence[Recommendation]]],
    out: TextIO,
) -> None:
    """One photo's results on ``out``; ``classes`` (``{"category": [{"name", "p"}, ...], "kind": [...]}``) are what
    the priors saw; ``items`` the ``(Item, results)`` of ``--items``."""
    if as_json:
        line: dict[str, object] = {"photo": photo, **{f"{name}_guess": top for name, top in classes.items()}, "results": results_json(recs)}
        if items:
            line["items"] = [{**item.to_json(), "results": results_json(found)} for item, found in items]
        print(json.dumps(line, ensure_ascii=False), file=out, flush=True)
        return
    guesses = "; ".join(f"{name}: " + ", ".join(f"{c['name']} {c['p']:.0%}" for c in top) for name, top in classes.items())
    print(f"{photo}" + (f"  ({guesses})" if guesses else ""), file=out)
    print_results(recs, "  ", out)
    for item, found in items:
        print(f"  item: {item.category} ({item.probability:.0%}), box {item.box}", file=out)
        print_results(found, "    ", out)


def print_results(recs: Sequence[Recommendation], indent: str, out: TextIO) -> None:
    for r in recs:
        print(f"{indent}{r.rank}. {r.product.title} [{r.product.category or '-'}]  distance {r.distance:.3f}  {r.product.url}", file=out)


def report_error(photo: str, message: str, as_json: bool, out: TextIO) -> None:
    """An unreadable photo: a JSON line on ``out`` with ``--json``, otherwise a line on stderr."""
    if as_json:
        print(json.dumps({"photo": photo, "error": message}, ensure_ascii=False), file=out, flush=True)
    else:
        print(f"{photo}: {message}", file=sys.stderr)


# ---------------------------------------------------------------- db


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from ffengine.db.migrate import upgrade_to_head

    url = database_url()
    shown = shown_url(url)
    try:
        upgrade_to_head(url)
    except (SQLAlchemyError, OSError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        raise FFError(f"cannot upgrade the database {shown}: {type(exc).__name__}: {detail}") from None
    print(f"database {shown} is at the latest schema")
    return 0


# ---------------------------------------------------------------- parser


def add_model_flags(parser: argparse.ArgumentParser, otherwise: str = DEFAULT_WEIGHTS) -> None:
    """``--weights`` (``otherwise``: what is used without it or $FFENGINE_WEIGHTS), ``--device``, ``--runtime``."""
    parser.add_argument("--weights", help=f"torchvision weights name or .pth file with JSON sidecar (default: $FFENGINE_WEIGHTS, else {otherwise})")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: $FFENGINE_DEVICE or auto)")
    parser.add_argument("--runtime", help="CPU runtime: auto, openvino, onnx or torch (default: $FFENGINE_RUNTIME or auto)")


def add_build_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, help="embedding and remote-image cache directory (default: $FFENGINE_DATA_DIR/cache)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding or remote-image cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list at most N skipped rows (default 20)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("ffengine"), description="FocusedFashion engine: index a catalogue, recommend products for photos.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", help="build or inspect a product index")
    index_cmds = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = index_cmds.add_parser("build", help="embed a catalogue's photos and write an index directory")
    build.add_argument("--catalog", required=True, type=Path, help="catalogue file (.csv or .jsonl)")
    build.add_argument("--out", required=True, type=Path, help="index directory to write (replaced atomically)")
    add_model_flags(build)
    build.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help=f"search backend (default: {DEFAULT_BACKEND})")
    build.add_argument(
        "--pca", type=int, metavar="DIMS", help="search a PCA of the features cut to DIMS dimensions (0: keep them all); default: no PCA, every dimension, L2-normalised"
    )
    build.add_argument("--no-l2", action="store_true", help="with --pca: do not L2-normalise features first")
    add_build_flags(build)
    build.set_defaults(func=cmd_index_build)
    update = index_cmds.add_parser(
        "update", help="write a new index for a changed catalogue from an existing one: only new and changed pictures are embedded"
    )
    update.add_argument("--catalog", required=True, type=Path, help="the whole catalogue as it is now (.csv or .jsonl)")
    update.add_argument("--index", help="the index to start from, left unchanged (default: $FFENGINE_INDEX or $FFENGINE_DATA_DIR/index)")
    update.add_argument("--out", required=True, type=Path, help="the new index directory")
    add_model_flags(update)
    add_build_flags(update)
    update.set_defaults(func=cmd_index_update)
    info = index_cmds.add_parser("info", help="describe an index directory")
    info.add_argument("index", nargs="?", help="index directory (default: $FFENGINE_INDEX)")
    info.set_defaults(func=cmd_index_info)

    rec = commands.add_parser("recommend", help="the most similar products for each photo")
    rec.add_argument("photos", nargs="+", metavar="PHOTO", help="photo files")
    rec.add_argument("--index", help="index directory (default: $FFENGINE_INDEX or $FFENGINE_DATA_DIR/index)")
    rec.add_argument("--k", type=int, default=5, help="results per photo (default 5)")
    rec.add_argument("--json", action="store_true", help='one JSON object per photo and line: {"photo", "results"} or {"photo", "error"}')
    rec.add_argument(
        "--items", action="store_true", help='also find the garments in each photo and search each one ("items": category, probability, box, results)'
    )
    rec.add_argument("--sheet", type=Path, metavar="OUT.png", help="also draw a contact sheet: each photo beside its results")
    rec.add_argument("--category", help="only products of this catalogue category")
    rec.add_argument("--gender", help="only products for this gender")
    add_model_flags(rec, otherwise="the weights file the index records")
    rec.set_defaults(func=cmd_recommend)

    db = commands.add_parser("db", help="database maintenance")
    db_cmds = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_cmds.add_parser("upgrade", help="apply database migrations up to the latest schema ($DATABASE_URL)")
    upgrade.set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ffengine`` console script and ``python -m ffengine``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_dotenv_file()
        return int(args.func(args))
    except (FFError, OSError) as exc:  # OSError: an unwritable --out or --sheet, a full disk
        print(f"ffengine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ffengine: interrupted", file=sys.stderr)
        return 130
