"""Photo -> answer latency and throughput of the whole bot at 1, 10 and 50 concurrent users.

The unmodified bot (``bot.app.build_application`` + ``bot.runner.running``, polling) runs
against the fake Bot API on 127.0.0.1 with the real MobileNetV2 weights from
``../shared/models`` and an index of ``catalog-10k`` (built once into ``bench/out/bot_load``,
reusing the shared embedding cache ``bench/out/cache``). Users are consumer photos from
``queries/test``. Each simulated user sends a photo, waits for the rating keyboard, sends
the next one (closed loop). The fake and the shoppers run in a child process, so that
"Telegram" (which decodes and thumbnails every uploaded photo) does not share the bot's
event loop; the bot runs here, exactly as ``python -m bot`` runs it.

Latency = from the user's photo being queued at the fake to the bot's keyboard message
arriving there (album already sent), i.e. what a shopper waits, minus Telegram's network.
It includes download, decode, the batcher, the model, the index, the database and
PTB's flood limiter. Each level is run twice: with the production rate limit (30
requests/s, what Telegram allows a bot overall; every answer costs a chat action, an album
and a message) and with the limiter off, which shows what the engine itself sustains.

Writes ``bench/results/bot_load.json`` and prints a table.
Run: ``.venv/bin/python bench/bot_load.py`` (about 2 minutes once the index exists).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
WORK = REPO / "bench" / "out" / "bot_load"
TOKEN = "123456789:AAHbenchTokenForTheLoadTest-abcdefgh"


def ensure_index(catalog: Path, weights: Path, index: Path) -> dict[str, Any]:
    """Build the catalogue index once (cached features make a rebuild fast)."""
    from ffengine.build import build_index
    from ffengine.embedder import Embedder

    if (index / "manifest.json").is_file():
        return {"built": False}
    embedder = Embedder.load(str(weights), "cpu")
    report = build_index(catalog, index, embedder, cache_dir=REPO / "bench" / "out" / "cache", progress=True)
    return {"built": True, "products": report.products, "skipped": len(report.skipped), "seconds": round(report.seconds, 1)}


# ---------------------------------------------------------------- "Telegram" and its users (child process)


class Watcher:
    """Turns the fake's call log into "user N got an answer at t" events, without polling per user."""

    def __init__(self, fake: Any, refusals: dict[str, str], results_text: str) -> None:
        self.fake, self.refusals, self.results_text = fake, refusals, results_text
        self.seen = 0
        self.waiting: dict[int, asyncio.Future] = {}
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        pending: list[Any] = []  # calls whose parameters are still being read
        while True:
            calls = self.fake.calls
            fresh, self.seen = calls[self.seen : len(calls)], len(calls)
            pending = [c for c in pending + [c for c in fresh if c.method == "sendMessage"] if not self.settle(c)]
            await asyncio.sleep(0.002)

    def settle(self, call: Any) -> bool:
        """Resolve the waiting shopper if ``call`` (a finished sendMessage) answers them."""
        if call.result is None:
            return False
        text, chat = call.params.get("text"), call.params.get("chat_id")
        outcome = "ok" if (text or "").startswith(self.results_text) else self.refusals.get(text)  # "Looking for: ..." may follow
        fut = self.waiting.get(chat)
        if outcome and fut and not fut.done():
            fut.set_result((outcome, call.time))
        return True

    def expect(self, chat_id: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[chat_id] = fut
        return fut


async def shopper(fake: Any, watcher: Watcher, uid: int, photos: list[bytes], first: int, n: int, out: list[dict]) -> None:
    """Closed loop: send a photo, wait for the answer, send the next (photos ``first``, ``first + 1``...)."""
    for i in range(n):
        answered = watcher.expect(uid)
        fake.user_sends_photo(uid, photos[(first + i) % len(photos)])
        sent = time.monotonic()  # the update is queued for the bot now
        outcome, at = await asyncio.wait_for(answered, 300)
        out.append({"outcome": outcome, "latency_ms": (at - sent) * 1000})


async def drive(conn: Connection, photo_paths: list[str]) -> None:
    from bot import texts
    from tests.fake_bot_api import FakeBotAPI

    refusals = {texts.BUSY: "busy", texts.ONE_AT_A_TIME: "one_at_a_time", texts.APOLOGY: "error"}
    photos = [Path(p).read_bytes() for p in photo_paths]
    async with FakeBotAPI(token=TOKEN) as fake:
        conn.send(fake.root)
        watcher = Watcher(fake, refusals, texts.RESULTS)
        while (job := await asyncio.to_thread(conn.recv)) is not None:
            users, per_user, first_uid = job
            out: list[dict] = []
            start, cpu = time.monotonic(), time.process_time()
            await asyncio.gather(*(shopper(fake, watcher, first_uid + u, photos, u * per_user, per_user, out) for u in range(users)))
            conn.send((out, time.monotonic() - start, time.process_time() - cpu))
        watcher.task.cancel()


def driver_main(conn: Connection, photo_paths: list[str]) -> None:
    """Child process: the fake Bot API and the simulated shoppers, away from the bot's CPU and loop."""
    asyncio.run(drive(conn, photo_paths))


# ---------------------------------------------------------------- the bot (this process)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def level(conn: Connection, svc: Any, users: int, per_user: int, first_uid: int) -> dict[str, Any]:
    batcher = svc.batcher
    batches, searched, busy = batcher.batches, batcher.searched, batcher.model_seconds
    cpu = time.process_time()  # all of the bot's threads: event loop, model, decoding, database
    conn.send((users, per_user, first_uid))
    out, wall, fake_cpu = await asyncio.to_thread(conn.recv)
    bot_cpu = time.process_time() - cpu
    ok = [r["latency_ms"] for r in out if r["outcome"] == "ok"]
    n_batches, n_searched = batcher.batches - batches, batcher.searched - searched
    # the bot's own log: photo received -> results ready (download, decode, queue, model, index)
    with contextlib.closing(sqlite3.connect(svc.settings.database_url.split(":///", 1)[1])) as con:
        logged = [r[0] for r in con.execute("SELECT latency_ms FROM searches WHERE user_id BETWEEN ? AND ?", (first_uid, first_uid + users))]
    return {
        "users": users,
        "searches": len(out),
        "answered": len(ok),
        "refused": {k: sum(1 for r in out if r["outcome"] == k) for k in ("busy", "one_at_a_time", "error")},
        "latency_p50_ms": round(percentile(ok, 0.5) or 0, 1),
        "latency_p95_ms": round(percentile(ok, 0.95) or 0, 1),
        "latency_mean_ms": round(statistics.fmean(ok), 1) if ok else None,
        "throughput_per_s": round(len(ok) / wall, 2),
        "wall_s": round(wall, 2),
        "mean_batch": round(n_searched / n_batches, 2) if n_batches else None,
        "model_busy_share": round((batcher.model_seconds - busy) / wall, 2),
        "bot_cpu_ms_per_search": round(1000 * bot_cpu / max(1, len(out)), 1),
        "model_ms_per_search": round(1000 * (batcher.model_seconds - busy) / max(1, n_searched), 1),
        "fake_telegram_cpu_ms_per_search": round(1000 * fake_cpu / max(1, len(out)), 1),
        "logged_latency_p50_ms": round(percentile(logged, 0.5) or 0, 1),
        "logged_latency_p95_ms": round(percentile(logged, 0.95) or 0, 1),
    }


@contextlib.asynccontextmanager
async def bot_running(root: str, args: argparse.Namespace, rate_limit: float, **extra: str) -> AsyncIterator[Any]:
    """The bot against the fake Bot API at ``root``; ``extra``: more settings (variables and values)."""
    from bot.app import build_application
    from bot.config import BotSettings
    from bot.context import services
    from bot.runner import running

    data = WORK / f"data-rate{rate_limit:g}"
    shutil.rmtree(data, ignore_errors=True)
    env = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_API_URL": root,
        "DATABASE_URL": f"sqlite+aiosqlite:///{data / 'ff.db'}",
        "FFENGINE_WEIGHTS": str(args.weights),
        "FFENGINE_INDEX": str(args.index),
        "FFENGINE_DEVICE": args.device,
        "FFENGINE_DATA_DIR": str(data),
        "BOT_RATE_LIMIT": f"{rate_limit:g}",
        **extra,
    }
    settings = BotSettings.from_env(env)
    app = build_application(settings)
    async with running(app, settings):
        yield services(app)


async def one_run(args: argparse.Namespace, rate_limit: float, photo_paths: list[str], results: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    driver = ctx.Process(target=driver_main, args=(child_conn, photo_paths), daemon=True)
    driver.start()
    try:
        root = await asyncio.to_thread(conn.recv)
        async with bot_running(root, args, rate_limit) as svc:
            model = svc.models.current
            cfg = svc.settings
            results.update(model_version=model.name, catalogue=len(model.index), runtime=model.embedder.runtime,
                           device=str(model.embedder.device), distinct_photos=len(photo_paths),
                           bot_settings={"queue_size": cfg.queue_size, "batch_size": cfg.batch_size,
                                         "batch_wait_ms": cfg.batch_wait_ms, "concurrent_updates": cfg.concurrent_updates})  # fmt: skip
            # warm-up: every query photo once, so that the products they show have their Telegram
            # file_id (steady state: a catalogue photo is uploaded only the first time it is shown)
            await level(conn, svc, 5, -(-len(photo_paths) // 5), 900_000)
            levels = []
            for n, users in enumerate(args.levels):
                per_user = max(args.min_per_user, args.searches // users)
                row = await level(conn, svc, users, per_user, 1_000_000 * (n + 1))
                levels.append(row)
                print(f"rate {rate_limit:g}/s  users {users:3d}: p50 {row['latency_p50_ms']:7.1f} ms  p95 {row['latency_p95_ms']:7.1f} ms  "
                      f"{row['throughput_per_s']:6.2f}/s  batch {row['mean_batch']}  model busy {row['model_busy_share']:.0%}  "
                      f"cpu/search bot {row['bot_cpu_ms_per_search']} ms (model {row['model_ms_per_search']}) fake {row['fake_telegram_cpu_ms_per_search']} ms  "
                      f"logged p50 {row['logged_latency_p50_ms']} ms  refused {row['refused']}", flush=True)  # fmt: skip
        conn.send(None)  # the bot has stopped: now "Telegram" may go
    finally:
        driver.join(30)
        if driver.is_alive():
            driver.kill()
    return levels


async def run(args: argparse.Namespace) -> dict[str, Any]:
    every = sorted(args.queries.glob("*/*.jpg"))
    photo_paths = [str(p) for p in every[:: max(1, len(every) // args.photos)]][: args.photos]  # all classes
    if not photo_paths:
        raise SystemExit(f"no query photos under {args.queries}")
    results: dict[str, Any] = {"runs": []}
    for rate_limit in args.rate_limits:
        levels = await one_run(args, rate_limit, photo_paths, results)
        results["runs"].append({"rate_limit_per_s": rate_limit, "levels": levels})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=SHARED / "datasets" / "catalog-10k" / "products.csv")
    parser.add_argument("--weights", type=Path, default=SHARED / "models" / "mobilenet_v2_imagenet.pth")
    parser.add_argument("--queries", type=Path, default=SHARED / "datasets" / "queries" / "test")
    parser.add_argument("--index", type=Path, default=WORK / "index-catalog-10k")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 50])
    parser.add_argument("--rate-limits", type=lambda s: [float(x) for x in s.split(",")], default=[30.0, 0.0])
    parser.add_argument("--searches", type=int, default=60, help="searches per level (spread over its users)")
    parser.add_argument("--min-per-user", type=int, default=3)
    parser.add_argument("--photos", type=int, default=40, help="distinct query photos to cycle through (all sent once to warm up)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bot_load.json")
    args = parser.parse_args()
    for path in (args.catalog, args.weights, args.queries):
        if not path.exists():
            raise SystemExit(f"needs {path} (../shared); not present on this machine")
    from bot.logs import setup_logging

    setup_logging([TOKEN], os.environ.get("BOT_LOAD_LOG", "WARNING"))
    WORK.mkdir(parents=True, exist_ok=True)
    build = ensure_index(args.catalog, args.weights, args.index)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = asyncio.run(run(args))
    results.update(
        build=build,
        catalog=str(args.catalog.relative_to(SHARED) if args.catalog.is_relative_to(SHARED) else args.catalog),
        weights=args.weights.name,
        queries=str(args.queries.relative_to(SHARED) if args.queries.is_relative_to(SHARED) else args.queries),
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "load_avg_before": load_before, "load_avg_after": [round(v, 2) for v in os.getloadavg()]},  # fmt: skip
        latency="photo queued at the fake Bot API -> rating keyboard received there (album sent before it)",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
