"""How fast is the embedder on this CPU, and does the fast path still give the same features?

One run measures, on the real MobileNetV2 weights and real catalogue photos:

* model throughput (img/s) at batch 1 and 32 for torch eager fp32, torch channels_last fp32,
  torch channels_last + bf16 autocast, plain ONNX Runtime (default session, whole batch), and
  our ``Embedder.embed_arrays`` as shipped; as ratios to plain ONNX Runtime. The baselines get
  normalised float32 NCHW tensors (model time only); the Embedder gets the uint8 ``prepare``
  output and normalises inside, as it does in production. Configurations are measured
  round-robin (``--rounds``), each timing started only once the CPUs are idle (other
  processes, and the previous configuration's spinning threads, would otherwise be charged
  to it); the median round is reported, the best round too;
* cosine agreement of each with torch eager fp32 on real catalogue and query photos, and
  category precision@5 of query photos against a catalogue subset (quality does not drop);
* the same, for plain ONNX Runtime and ours, while another process keeps one core busy;
* ``prepare`` throughput: decode (``load_image``) + resize/crop (``prepare``) of catalog-10k
  photos and of the larger query photos, 1 and 2 threads, against the foundation's
  resize-then-crop;
* with ``--sweep``: our ONNX runner's one-picture and batch paths, on one core or all.

Writes ``bench/results/embed_speed.json`` and prints a markdown table.
Run: ``.venv/bin/python bench/embed_speed.py`` (about 3-5 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffengine import runtime_onnx  # noqa: E402
from ffengine.embedder import Embedder  # noqa: E402
from ffengine.images import load_image, square_crop  # noqa: E402
from ffengine.runtime_onnx import OnnxRunner, cosine_rows  # noqa: E402
from ffengine.weights import resolve_weights  # noqa: E402

SHARED = Path(os.environ.get("FF_SHARED_DIR", REPO.parent / "shared"))
Run = Callable[[np.ndarray], np.ndarray]


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


QUIET = {"waits": 0, "timed_out": 0}


def quiet(threshold: float = 0.05, timeout: float = 30.0) -> None:
    """Wait until the CPUs are idle (< ``threshold`` busy over 0.5 s), at most ``timeout`` seconds.

    Other processes share this machine, and thread pools (ONNX Runtime's, OpenMP's) keep
    spinning for a while after a call: timing the next configuration on busy cores would
    charge it for someone else's work. Linux only; elsewhere it just pauses briefly.
    """
    QUIET["waits"] += 1
    if not Path("/proc/stat").exists():
        time.sleep(0.3)
        return

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total0, idle0 = sample()
        time.sleep(0.5)
        total1, idle1 = sample()
        if 1 - (idle1 - idle0) / max(1, total1 - total0) < threshold:
            return
    QUIET["timed_out"] += 1


def catalogue_rows() -> list[dict[str, str]]:
    with (SHARED / "datasets" / "catalog-10k" / "products.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def query_rows(split: str = "test") -> list[dict[str, str]]:
    with (SHARED / "datasets" / "queries" / "labels.csv").open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == split]


# --- the configurations ----------------------------------------------------------------------


class Baselines:
    """The issue's reference implementations, all on the same weights."""

    def __init__(self, embedder: Embedder) -> None:
        prep = embedder.preprocess
        self.mean = np.array(prep.mean, np.float32).reshape(1, 3, 1, 1) * 255
        self.std = np.array(prep.std, np.float32).reshape(1, 3, 1, 1) * 255
        net = torch.nn.Sequential(embedder.model, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
        self.eager = net
        import copy

        self.cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (torch.zeros(1, 3, prep.input_size, prep.input_size),), buf, dynamo=False, opset_version=17,
                input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            )  # fmt: skip
        import onnxruntime as ort

        self.ort = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])  # default options

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((batch.transpose(0, 3, 1, 2).astype(np.float32) - self.mean) / self.std)

    def torch_eager(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.eager(torch.from_numpy(x)).numpy()

    def torch_cl(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    def torch_cl_bf16(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return self.cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()

    def onnxruntime(self, x: np.ndarray) -> np.ndarray:
        return self.ort.run(None, {"x": x})[0]


def configs(embedder: Embedder, base: Baselines, others: list[Embedder]) -> dict[str, tuple[Run, bool]]:
    """name -> (function, takes normalised float NCHW rather than uint8 NHWC)."""
    return {
        "torch eager fp32": (base.torch_eager, True),
        "torch channels_last fp32": (base.torch_cl, True),
        "torch channels_last bf16": (base.torch_cl_bf16, True),
        "onnxruntime (plain)": (base.onnxruntime, True),
        **{f"Embedder ({other.runtime})": (other.embed_arrays, False) for other in others},
        f"Embedder ({embedder.runtime}, shipped)": (embedder.embed_arrays, False),
    }


def throughput(
    runs: dict[str, tuple[Run, bool]], pixels: np.ndarray, base: Baselines | None, batch: int, rounds: int, per_round: int, wait_idle: bool = True
) -> dict[str, list[float]]:
    """Round-robin timing; img/s per round for each configuration."""
    inputs = {True: base.normalise(pixels) if base else pixels, False: pixels}
    per: dict[str, list[float]] = {name: [] for name in runs}
    n_batches = max(1, per_round // batch)
    for name, (fn, wants_float) in runs.items():  # warm up (first calls allocate, pick kernels)
        for i in range(2):
            fn(inputs[wants_float][i * batch % len(pixels) :][:batch])
    for _ in range(rounds):
        for name, (fn, wants_float) in runs.items():
            data = inputs[wants_float]
            chunks = [data[(i * batch) % (len(data) - batch + 1) :][:batch] for i in range(n_batches)]
            if wait_idle:
                quiet()
            start = time.perf_counter()
            for chunk in chunks:
                fn(chunk)
            per[name].append(n_batches * batch / (time.perf_counter() - start))
    return per


# --- agreement and quality -------------------------------------------------------------------


def agreement(runs: dict[str, tuple[Run, bool]], pixels: np.ndarray, base: Baselines) -> dict[str, dict[str, float]]:
    ref = np.concatenate([base.torch_eager(base.normalise(pixels[i : i + 16])) for i in range(0, len(pixels), 16)])
    out = {}
    for name, (fn, wants_float) in runs.items():
        data = base.normalise(pixels) if wants_float else pixels
        feats = np.concatenate([fn(data[i : i + 16]) for i in range(0, len(data), 16)])
        cos = cosine_rows(feats, ref)
        out[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    return out


def precision_at_5(runs: dict[str, tuple[Run, bool]], embedder: Embedder, base: Baselines, n_catalogue: int) -> dict:
    """Category precision@5 of the test query photos against ``n_catalogue`` catalogue photos."""
    every = catalogue_rows()
    rows = every[:: max(1, len(every) // n_catalogue)][:n_catalogue]
    root = SHARED / "datasets" / "catalog-10k"
    cat_pixels = prepare_all([root / r["image"] for r in rows], embedder)
    queries = query_rows("test")
    q_pixels = prepare_all([SHARED / "datasets" / "queries" / q["image"] for q in queries], embedder)
    wanted = {}
    with (SHARED / "datasets" / "query_categories.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            wanted[r["query_label"]] = set(r["catalog_categories"].split(";"))
    categories = np.array([r["category"] for r in rows])
    result = {"catalogue_photos": len(rows), "query_photos": len(queries)}
    for name, (fn, wants_float) in runs.items():
        feats = []
        for pixels in (cat_pixels, q_pixels):
            data_fn = (lambda b: fn(base.normalise(b))) if wants_float else fn
            feats.append(np.concatenate([data_fn(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]))
        cat, qry = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in feats)
        top = np.argsort(-(qry @ cat.T), axis=1)[:, :5]
        hits = [np.isin(categories[t], list(wanted[q["label"]])).mean() for t, q in zip(top, queries, strict=True)]
        result[name] = round(float(np.mean(hits)), 4)
    return result


def prepare_all(paths: list[Path], embedder: Embedder) -> np.ndarray:
    with ThreadPoolExecutor(2) as pool:
        return np.stack(list(pool.map(lambda p: embedder.prepare([load_image(p)])[0], paths)))


# --- prepare throughput ----------------------------------------------------------------------


def old_prepare(img, resize: int, size: int) -> np.ndarray:
    """The foundation's version: resize the whole picture, then crop, then convert."""
    from PIL import Image

    w, h = img.size
    scale = resize / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def prepare_speed(paths: list[Path], embedder: Embedder, rounds: int) -> dict[str, float]:
    blobs = [p.read_bytes() for p in paths]  # from memory: measure CPU work, not the disk
    prep = embedder.preprocess
    images = [load_image(b) for b in blobs]

    def best(fn: Callable[[], None], n: int) -> float:
        rates = []
        for _ in range(rounds):
            quiet()
            start = time.perf_counter()
            fn()
            rates.append(n / (time.perf_counter() - start))
        return round(statistics.median(rates), 1)

    def both(b: bytes) -> np.ndarray:
        return embedder.prepare([load_image(b)])[0]

    pool = ThreadPoolExecutor(2)
    out = {
        "photos": len(blobs),
        "mean_size": "x".join(str(int(v)) for v in np.mean([img.size for img in images], axis=0)),
        "decode_img_s": best(lambda: [load_image(b) for b in blobs], len(blobs)),
        "resize_crop_img_s": best(lambda: [embedder.prepare([img]) for img in images], len(images)),
        "resize_crop_foundation_img_s": best(lambda: [old_prepare(img, prep.resize, prep.input_size) for img in images], len(images)),
        "decode_prepare_1_thread_img_s": best(lambda: [both(b) for b in blobs], len(blobs)),
        "decode_prepare_2_threads_img_s": best(lambda: list(pool.map(both, blobs)), len(blobs)),
    }
    pool.shutdown()
    return out


# --- sweep -----------------------------------------------------------------------------------


def sweep(embedder: Embedder, pixels: np.ndarray, rounds: int) -> list[dict]:
    """Our runner's one-picture and batch paths, on one core against all of them."""
    data, _, _ = runtime_onnx.cached_export(embedder._net, embedder.preprocess.input_size, None, "sweep")
    rows = []
    for cores in (1, runtime_onnx.cpu_count()):
        runner = OnnxRunner(data, threads=cores)
        for batch in (1, 32):
            per = throughput({"r": (runner, False)}, pixels, None, batch, rounds, 64)["r"]  # type: ignore[arg-type]
            rows.append({"cores": cores, "batch": batch, "img_s": round(statistics.median(per), 1)})
            print(f"  sweep cores={cores} batch={batch}: {rows[-1]['img_s']} img/s", flush=True)
    return rows


def contended(runs: dict[str, tuple[Run, bool]], pixels: np.ndarray, base: Baselines, rounds: int) -> dict[str, dict[str, float]]:
    """img/s while one other process keeps a core busy (as decode threads do during an index build)."""
    quiet()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        return {
            str(batch): {name: round(statistics.median(v), 1) for name, v in throughput(runs, pixels, base, batch, rounds, 32, wait_idle=False).items()}
            for batch in (1, 32)
        }
    finally:
        hog.kill()
        hog.wait()


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(SHARED / "models" / "mobilenet_v2_imagenet.pth"))
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds per batch size")
    parser.add_argument("--per-round", type=int, default=64, help="images per configuration per round")
    parser.add_argument("--prepare-photos", type=int, default=600)
    parser.add_argument("--quality-catalogue", type=int, default=1500, help="catalogue photos for precision@5 (0: skip)")
    parser.add_argument("--sweep", action="store_true", help="also time the ONNX runner on one core and on all")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed_speed.json")
    args = parser.parse_args()

    load_before = load_avg()
    resolve_weights(args.weights)  # fail early with a clear message
    embedder = Embedder.load(args.weights, "cpu")
    base = Baselines(embedder)
    others = [Embedder.load(args.weights, "cpu", runtime=r) for r in ("onnx", "openvino") if r != embedder.runtime]  # the other runtime(s)
    runs = configs(embedder, base, [o for o in others if o.runtime != "torch"])
    shipped = next(name for name in runs if name.endswith("shipped)"))
    print(f"load average {load_before}; {os.cpu_count()} CPUs; shipped runtime: {embedder.runtime}", flush=True)

    rows = catalogue_rows()
    root = SHARED / "datasets" / "catalog-10k"
    sample = [root / r["image"] for r in rows[:: len(rows) // 64][:64]]
    pixels = prepare_all(sample, embedder)

    speed: dict[str, dict] = {}
    for batch in (1, 32):
        per = throughput(runs, pixels, base, batch, args.rounds, args.per_round)
        speed[str(batch)] = {name: {"median_img_s": round(statistics.median(v), 1), "best_img_s": round(max(v), 1)} for name, v in per.items()}
        ref = speed[str(batch)]["onnxruntime (plain)"]["median_img_s"]
        for row in speed[str(batch)].values():
            row["vs_onnxruntime"] = round(row["median_img_s"] / ref, 2)
        print(f"batch {batch}: " + ", ".join(f"{k} {v['median_img_s']}" for k, v in speed[str(batch)].items()), flush=True)

    duel = {name: run for name, run in runs.items() if name == "onnxruntime (plain)" or name.startswith("Embedder")}
    busy = contended(duel, pixels, base, args.rounds)
    print(f"with one core busy: {busy}", flush=True)

    queries = [SHARED / "datasets" / "queries" / q["image"] for q in query_rows("test")[::12][:32]]
    agree = agreement(runs, np.concatenate([pixels, prepare_all(queries, embedder)]), base)
    quality = precision_at_5(runs, embedder, base, args.quality_catalogue) if args.quality_catalogue else {}
    print(f"precision@5: {quality}", flush=True)

    prep_rows = rows[:: max(1, len(rows) // args.prepare_photos)][: args.prepare_photos]
    prepare = {
        "catalog-10k": prepare_speed([root / r["image"] for r in prep_rows], embedder, 3),
        "queries": prepare_speed([SHARED / "datasets" / "queries" / q["image"] for q in query_rows("train")[: args.prepare_photos]], embedder, 3),
    }
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_avg(),
            "timings_taken_on_idle_cpus": f"{QUIET['waits'] - QUIET['timed_out']} of {QUIET['waits']}",
        },
        "shipped": {"name": shipped, "runtime": embedder.runtime},
        "throughput": speed,
        "throughput_with_one_core_busy": busy,
        "agreement_vs_torch_fp32": agree,
        "precision_at_5": quality,
        "prepare": prepare,
    }
    if args.sweep:
        result["sweep"] = sweep(embedder, pixels, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)


def print_table(result: dict) -> None:
    speed, agree, quality = result["throughput"], result["agreement_vs_torch_fp32"], result["precision_at_5"]
    m = result["machine"]
    print(f"\nload average before {m['load_average_before']}, after {m['load_average_after']}; "
          f"timings started on idle CPUs: {m['timings_taken_on_idle_cpus']}\n")
    print("| configuration | batch 1 img/s | vs ORT | batch 32 img/s | vs ORT | cosine vs fp32 (min) | P@5 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in speed["1"]:
        b1, b32 = speed["1"][name], speed["32"][name]
        p5 = quality.get(name, "")
        print(
            f"| {name} | {b1['median_img_s']} | {b1['vs_onnxruntime']} | {b32['median_img_s']} | {b32['vs_onnxruntime']} "
            f"| {agree[name]['cosine_min']:.6f} | {p5} |"
        )
    busy = result["throughput_with_one_core_busy"]
    print("\nWith one core kept busy by another process (img/s):\n")
    print("| configuration | batch 1 | batch 32 |\n| --- | ---: | ---: |")
    for name in busy["1"]:
        print(f"| {name} | {busy['1'][name]} | {busy['32'][name]} |")
    print("\n| photos | decode | resize+crop | (foundation) | decode+prepare 1 thread | 2 threads |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, p in result["prepare"].items():
        print(
            f"| {name} ({p['mean_size']}) | {p['decode_img_s']} | {p['resize_crop_img_s']} | {p['resize_crop_foundation_img_s']} "
            f"| {p['decode_prepare_1_thread_img_s']} | {p['decode_prepare_2_threads_img_s']} |"
        )
    if "sweep" in result:
        print("\n| cores | batch | img/s |\n| --- | ---: | ---: |")
        for row in result["sweep"]:
            print(f"| {row['cores']} | {row['batch']} | {row['img_s']} |")


if __name__ == "__main__":
    main()
