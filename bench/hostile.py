"""What hostile pictures cost: CPU and peak memory per file, and another shopper's wait while six arrive.

    .venv/bin/python bench/hostile.py                      # this checkout's decoder; ~3 minutes
    .venv/bin/python bench/hostile.py --code /tmp/old      # another checkout's (e.g. a worktree of an older commit)

1. **Per file**: each file of ``tests/hostile_images.py`` (the probes of issue 20) and two ordinary
   photos for scale, decoded by ``ffengine.images.load_image`` in a fresh process each (the
   decoder imported from ``--code``): CPU seconds, peak resident-set growth (``VmHWM``, which sees
   Pillow's allocations outside Python's), and the outcome.
2. **Another shopper**: the unmodified bot (``bench/bot_load.py``'s harness: fake Bot API and users in
   a child process, real weights, an index of the first ``--products`` of catalog-10k) while six
   users send one bomb each as image files, again and again; a seventh sends ordinary consumer
   photos one after another. Reported: that shopper's photo -> rating keyboard p50/p95, beside the
   same with no bombs. The per-user rate limit is off, so every bomb reaches the decoder.

Writes ``bench/results/hostile.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import bot_load  # noqa: E402 - the whole-bot harness, reused
from tests import hostile_images  # noqa: E402

SHARED = bot_load.SHARED
WORK = REPO / "bench" / "out" / "hostile"
BOMBERS = 6
SHOPPER = 7_000

DECODE_ONE = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
from ffengine.errors import ImageRejected
from ffengine.images import load_image

def high_water_kib():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # restart the high-water mark here, forgetting the imports' own
before, cpu = high_water_kib(), time.process_time()
try:
    outcome = "decoded %dx%d" % load_image(sys.argv[1]).size
except ImageRejected as exc:
    outcome = "refused: " + exc.reason
print(json.dumps({"outcome": outcome, "cpu_s": time.process_time() - cpu, "peak_mib": (high_water_kib() - before) / 1024}))
"""


#: The probes of issue 20: what each is, the name a bomber sends it under, and how it is made.
PROBES: tuple[tuple[str, str, Callable[[], bytes]], ...] = (
    ("progressive JPEG, 3,000 repeated scans, 8000x6000", "scans.jpg", hostile_images.progressive_scan_bomb),
    ("TIFF 64x64 in one 32768x32768 deflate tile", "tile.tif", hostile_images.tiff_tile_bomb),
    ("PNG, EXIF Orientation 6 + a 9,000,000-entry tag", "exif.png", lambda: hostile_images.exif_bomb("PNG")),
    ("WebP, EXIF Orientation 6 + a 9,000,000-entry tag", "exif.webp", lambda: hostile_images.exif_bomb("WEBP")),
    ("BMP RLE8, 12000x4000, one pixel a row", "rle.bmp", hostile_images.bmp_rle_bomb),
)


def hostile_files() -> dict[str, bytes]:
    """The probes, and two ordinary pictures of the largest kinds a phone sends."""
    from tests.test_images import encode
    from tests.test_images_hostile import photo_like

    photo = photo_like(4_000, 3_000)
    return {description: make() for description, _, make in PROBES} | {
        "ordinary: 12 MP progressive JPEG": encode(photo, "JPEG", progressive=True, quality=90),
        "ordinary: 12 MP PNG": encode(photo, "PNG", compress_level=1),
    }


def per_file(code: Path, files: dict[str, bytes]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, data) in enumerate(files.items()):
            path = Path(tmp) / f"file{n}"
            path.write_bytes(data)
            done = subprocess.run([sys.executable, "-c", DECODE_ONE, str(path), str(code)], capture_output=True, text=True, timeout=900, check=True)
            row = {"file": name, "bytes": len(data), **json.loads(done.stdout)}
            row["cpu_s"], row["peak_mib"] = round(row["cpu_s"], 3), round(row["peak_mib"], 1)
            rows.append(row)
            print(f"{name:52s} {len(data) / 1e6:7.2f} MB  cpu {row['cpu_s']:7.2f} s  +{row['peak_mib']:7.1f} MiB  {row['outcome']}", flush=True)
    return rows


# ---------------------------------------------------------------- the bot with bombs arriving (child: "Telegram")


async def bomber(fake: Any, uid: int, bomb: tuple[str, bytes], stop: asyncio.Event, sent: list[int]) -> None:
    """Send the bomb as an image file, wait for any answer, send it again, until told to stop."""
    name, data = bomb
    while not stop.is_set():
        before = len(fake.messages_to(uid))
        fake.user_sends_document(uid, data, file_name=name, mime_type="image/" + name.rsplit(".", 1)[1])
        sent.append(uid)
        while len(fake.messages_to(uid)) <= before + 1 and not stop.is_set():  # the file itself, then the reply
            await asyncio.sleep(0.01)


async def drive(conn: Connection, photo_paths: list[str]) -> None:
    from bot import texts
    from tests.fake_bot_api import FakeBotAPI

    photos = [Path(p).read_bytes() for p in photo_paths]
    bombs = [(name, make()) for _, name, make in PROBES] + [("scans2.jpg", hostile_images.progressive_scan_bomb(6_000, 6_000))]
    refusals = {texts.BUSY: "busy", texts.ONE_AT_A_TIME: "one_at_a_time", texts.APOLOGY: "error"}
    async with FakeBotAPI(token=bot_load.TOKEN) as fake:
        conn.send(fake.root)
        watcher = bot_load.Watcher(fake, refusals, texts.RESULTS)
        while (job := await asyncio.to_thread(conn.recv)) is not None:
            with_bombs, n, first_uid = job
            stop, sent, out = asyncio.Event(), [], []
            bombers = [asyncio.create_task(bomber(fake, first_uid + 1 + b, bombs[b], stop, sent)) for b in range(BOMBERS if with_bombs else 0)]
            await asyncio.sleep(0.5 if with_bombs else 0)  # the bombs are in flight first
            await bot_load.shopper(fake, watcher, first_uid, photos, 0, n, out)
            stop.set()
            await asyncio.gather(*bombers)
            conn.send((out, len(sent)))
        watcher.task.cancel()


def driver_main(conn: Connection, photo_paths: list[str]) -> None:
    asyncio.run(drive(conn, photo_paths))


async def shopper_latency(args: argparse.Namespace, photo_paths: list[str]) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    driver = ctx.Process(target=driver_main, args=(child, photo_paths), daemon=True)
    driver.start()
    results: dict[str, Any] = {}
    try:
        root = await asyncio.to_thread(conn.recv)
        # no per-user limit: the bombers send again and again, and it would refuse them before the decoder
        async with bot_load.bot_running(root, args, 0.0, BOT_USER_SEARCHES_PER_MINUTE="0") as svc:
            results["bot_settings"] = {"decode_threads": getattr(svc.settings, "decode_threads", None), "queue_size": svc.settings.queue_size}
            for n, (label, with_bombs) in enumerate((("warm-up", False), ("no bombs", False), ("six bombs in flight", True))):
                conn.send((with_bombs, args.searches, SHOPPER + 100 * n))
                out, bombs_sent = await asyncio.to_thread(conn.recv)
                ok = [r["latency_ms"] for r in out if r["outcome"] == "ok"]
                row = {
                    "searches": len(out),
                    "answered": len(ok),
                    "p50_ms": round(bot_load.percentile(ok, 0.5) or 0, 1),
                    "p95_ms": round(bot_load.percentile(ok, 0.95) or 0, 1),
                    "max_ms": round(max(ok, default=0), 1),
                    "bombs_sent": bombs_sent,
                }
                print(f"{label:20s} shopper p50 {row['p50_ms']:8.1f} ms  p95 {row['p95_ms']:8.1f} ms  max {row['max_ms']:8.1f} ms  "
                      f"answered {row['answered']}/{row['searches']}  bombs sent {bombs_sent}", flush=True)
                if label != "warm-up":
                    results[label] = row
        conn.send(None)
    finally:
        driver.join(30)
        if driver.is_alive():
            driver.kill()
    return results


def ensure_small_index(args: argparse.Namespace) -> None:
    from ffengine.build import build_index
    from ffengine.embedder import Embedder

    if not (args.index / "manifest.json").is_file():
        build_index(args.catalog, args.index, Embedder.load(str(args.weights), "cpu"), cache_dir=REPO / "bench" / "out" / "cache", limit=args.products)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose ffengine decodes the files (part 1)")
    parser.add_argument("--catalog", type=Path, default=SHARED / "datasets" / "catalog-10k" / "products.csv")
    parser.add_argument("--weights", type=Path, default=SHARED / "models" / "mobilenet_v2_imagenet.pth")
    parser.add_argument("--queries", type=Path, default=SHARED / "datasets" / "queries" / "test")
    parser.add_argument("--products", type=int, default=1_000, help="catalogue size for part 2")
    parser.add_argument("--searches", type=int, default=20, help="the shopper's photos in each part-2 run")
    parser.add_argument("--skip-bot", action="store_true", help="part 1 only")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile.json")
    args = parser.parse_args()
    args.index, args.device = WORK / f"index-{args.products}", "cpu"
    results: dict[str, Any] = {"code": str(args.code.resolve()), "files": per_file(args.code.resolve(), hostile_files())}
    if not args.skip_bot:
        from bot.logs import setup_logging

        setup_logging([bot_load.TOKEN], "ERROR")
        WORK.mkdir(parents=True, exist_ok=True)
        ensure_small_index(args)
        photo_paths = [str(p) for p in sorted(args.queries.glob("*/*.jpg"))[:: 37][: args.searches]]
        bot_load.WORK = WORK  # its data folders go under this benchmark's
        results["shopper"] = asyncio.run(shopper_latency(args, photo_paths))
        results["shopper"]["latency"] = "the shopper's photo queued at the fake Bot API -> rating keyboard received there"
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_avg": [round(v, 2) for v in os.getloadavg()], "when": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
