"""Index build throughput: the shipped pipeline on a whole catalogue vs the study's plain loop.

    .venv/bin/python bench/build_speed.py            # catalog-10k + ../shared weights
    .venv/bin/python bench/build_speed.py --limit 1000 --plain 100   # a quicker look

Measures, on this machine:

* ``build``: :func:`ffengine.build.build_index` from scratch (empty cache): images/s,
  seconds, peak RSS; then ``rebuild``: the same catalogue again with the cache warm;
* ``plain_loop``: what the study did, on the first ``--plain`` images: open with PIL,
  torchvision ``Resize``/``CenterCrop``/``Normalize``, eager PyTorch, one photo at a time;
* ``sequential_shipped``: the shipped embedder one photo at a time (no pipeline), to
  separate what the pipeline brings from what the runtime brings;
* the lowest cosine similarity between pipeline and plain-loop features on that subset
  (speed must not change the answer);
* CPU time per image (all threads): of the whole build, and of decoding and of the model
  each run alone. CPU time is what a busy machine distorts least: 2000 / (CPU ms per
  image) bounds what two idle cores could do.

Writes ``bench/results/build_speed.json``. Other work on the machine skews the numbers:
the load average before and after is recorded; run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))


def plain_loop(paths: list[str], weights: Path) -> tuple[np.ndarray, float]:
    """The study's extractor, verbatim in spirit: PIL + torchvision transforms + batch of one."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.models import mobilenet_v2

    meta = json.loads(weights.with_suffix(".json").read_text())
    model = mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    features = model.features.eval()
    prep = transforms.Compose(
        [
            transforms.Resize(meta["resize"]),
            transforms.CenterCrop(meta["input_size"]),
            transforms.ToTensor(),
            transforms.Normalize(meta["mean"], meta["std"]),
        ]
    )
    out = []
    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            x = prep(Image.open(path).convert("RGB")).unsqueeze(0)
            out.append(features(x).mean(dim=(2, 3))[0].numpy())
    return np.stack(out), time.perf_counter() - started


def sequential(paths: list[str], embedder: object) -> float:
    from ffengine.images import load_image

    started = time.perf_counter()
    for path in paths:
        embedder.embed([load_image(path)])  # type: ignore[attr-defined]
    return time.perf_counter() - started


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def cpu_s() -> float:
    """CPU seconds used by this process so far, all threads (ONNX Runtime's pool included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stage_costs(paths: list[str], embedder: object, batch_size: int) -> dict[str, float]:
    """CPU ms per image of each stage run alone (read + decode + prepare, then the model), and the model's img/s."""
    from ffengine.images import load_image

    started = cpu_s()
    pixels = np.concatenate([embedder.prepare([load_image(Path(p).read_bytes())]) for p in paths])  # type: ignore[attr-defined]
    decode = cpu_s() - started
    started, wall = cpu_s(), time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        embedder.embed_arrays(pixels[i : i + batch_size])  # type: ignore[attr-defined]
    model, wall = cpu_s() - started, time.perf_counter() - wall
    return {
        "decode_prepare": round(1000 * decode / len(paths), 2),
        "model": round(1000 * model / len(paths), 2),
        # the ceiling for a build on this machine: the model alone on pre-decoded pictures, all cores
        "model_only_img_s": round(len(paths) / wall, 1),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=SHARED / "datasets" / "catalog-10k" / "products.csv")
    parser.add_argument("--weights", type=Path, default=SHARED / "models" / "mobilenet_v2_imagenet.pth")
    parser.add_argument("--limit", type=int, help="only the first N products")
    parser.add_argument("--plain", type=int, default=300, help="images for the plain-loop comparison (default 300)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "build_speed.json")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    for need in (args.catalog, args.weights):
        if not need.exists():
            print(f"needs {need} (../shared data); not present", file=sys.stderr)
            return 2

    from ffengine.build import BATCH_SIZE, build_index
    from ffengine.catalog import read_catalog
    from ffengine.embedder import Embedder

    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "catalog": str(args.catalog),
        "weights": str(args.weights),
    }
    started = time.perf_counter()
    embedder = Embedder.load(str(args.weights), "cpu", runtime=args.runtime)
    result["model_load_s"] = round(time.perf_counter() - started, 2)
    result["runtime"] = embedder.runtime
    options = {"batch_size": args.batch_size or BATCH_SIZE}
    if args.workers:
        options["workers"] = args.workers
    result["pipeline"] = {"batch_size": options["batch_size"], "workers": args.workers or os.cpu_count()}

    with tempfile.TemporaryDirectory(prefix="ff-bench-") as tmp:
        cache = Path(tmp) / "cache"
        cpu_before = cpu_s()
        build = build_index(args.catalog, Path(tmp) / "index", embedder, cache_dir=cache, progress=args.progress, limit=args.limit, **options)
        result["build"] = {
            "products": build.products,
            "skipped": len(build.skipped),
            "embedded": build.embedded,
            "seconds": round(build.seconds, 2),
            "embed_seconds": round(build.embed_seconds, 2),
            "index_seconds": round(build.index_seconds, 2),
            "images_per_s": round(build.images_per_s, 1),
            "peak_rss_mb": round(peak_rss_mb()),
            "cpu_ms_per_image": round(1000 * (cpu_s() - cpu_before) / build.products, 2),
        }
        print(f"build:   {build.summary(max_problems=3)}", file=sys.stderr)
        rebuild = build_index(args.catalog, Path(tmp) / "index", embedder, cache_dir=cache, progress=args.progress, limit=args.limit, **options)
        result["rebuild_cached"] = {
            "embedded": rebuild.embedded,
            "cached": rebuild.cached,
            "seconds": round(rebuild.seconds, 2),
            "images_per_s": round(rebuild.images_per_s, 1),
        }
        print(f"rebuild: {rebuild.summary(max_problems=0)}", file=sys.stderr)

        from ffengine.index import Index

        index = Index.load(Path(tmp) / "index")
        products = read_catalog(args.catalog, limit=args.plain).products
        paths = [p.image for p in products]
        plain_feats, plain_s = plain_loop(paths, args.weights)
        rows = [i for i, p in enumerate(index.products[: len(products)]) if p.id == products[i].id]
        result["plain_loop"] = {"images": len(paths), "seconds": round(plain_s, 2), "images_per_s": round(len(paths) / plain_s, 1)}
        seq_s = sequential(paths, embedder)
        result["sequential_shipped"] = {"images": len(paths), "seconds": round(seq_s, 2), "images_per_s": round(len(paths) / seq_s, 1)}
        stage_paths = [p.image for p in read_catalog(args.catalog, limit=max(len(paths), 640)).products]
        result["stage_cpu_ms_per_image"] = stage_costs(stage_paths, embedder, options["batch_size"])
        result["min_cosine_pipeline_vs_plain"] = round(cosine_min(index.features[rows], plain_feats[rows]), 5)
    result["speedup_vs_plain_loop"] = round(result["build"]["images_per_s"] / result["plain_loop"]["images_per_s"], 1)  # type: ignore[index]
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
