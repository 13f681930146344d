"""The embedder: shapes, order, ONNX Runtime == PyTorch, ONNX cache, fallbacks, threads, real features."""

from __future__ import annotations

import csv
import logging
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import mobilenet_v2

from ffengine import embedder as embedder_module
from ffengine import runtime_onnx
from ffengine.embedder import Embedder
from ffengine.errors import ConfigError
from ffengine.images import load_image, whole_picture
from ffengine.runtime_onnx import cosine_rows
from ffengine.weights import Preprocess, save_weights

from .conftest import make_image

PREP = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def pictures(n: int, size: tuple[int, int] = (120, 160)) -> list[Image.Image]:
    return [load_image(make_image(seed=i, size=size)) for i in range(n)]


def random_embedder(runtime: str) -> Embedder:
    torch.manual_seed(0)
    return Embedder(None, "cpu", runtime=runtime)


random_embedder_for = random_embedder  # the name the conftest fixture of the same name hides


@pytest.fixture(scope="module")
def onnx_random() -> Embedder:
    embedder = random_embedder("onnx")
    assert embedder.runtime == "onnx"
    return embedder


@pytest.fixture(scope="module")
def torch_random() -> Embedder:
    return random_embedder("torch")


@pytest.fixture(scope="module")
def openvino_random() -> Embedder:
    embedder = random_embedder("openvino")
    assert embedder.runtime == "openvino"
    return embedder


@pytest.fixture
def fresh_memo(monkeypatch):
    """Forget this process's exported models, so the disk cache and the exporter are exercised."""
    monkeypatch.setattr(runtime_onnx, "_memo", OrderedDict())


@pytest.fixture
def weights_file(tmp_path) -> Path:
    torch.manual_seed(5)
    return save_weights(mobilenet_v2(weights=None).state_dict(), tmp_path / "w" / "weights.pth", PREP)


def test_auto_runtime_on_cpu_is_openvino_then_onnx_then_torch(random_embedder, monkeypatch, caplog):
    assert random_embedder.device.type == "cpu" and random_embedder.runtime == "openvino"
    missing = (lambda: False, *embedder_module.CPU_RUNTIMES["openvino"][1:])
    monkeypatch.setitem(embedder_module.CPU_RUNTIMES, "openvino", missing)
    assert random_embedder_for("auto").runtime == "onnx"
    monkeypatch.setitem(embedder_module.CPU_RUNTIMES, "onnx", (lambda: False, *embedder_module.CPU_RUNTIMES["onnx"][1:]))
    with caplog.at_level(logging.WARNING):
        assert random_embedder_for("auto").runtime == "torch"
    assert "openvino is not installed; onnx is not installed" in caplog.text


@pytest.mark.parametrize("which", ["openvino_random", "onnx_random", "torch_random"])
def test_shape_dtype_contiguity(which, request):
    embedder: Embedder = request.getfixturevalue(which)
    feats = embedder.embed(pictures(5))
    assert feats.shape == (5, 1280) and feats.dtype == np.float32 and feats.flags.c_contiguous
    assert np.isfinite(feats).all() and np.abs(feats).max() > 0
    assert embedder.dim == 1280 and embedder.fingerprint == "random-init"
    assert isinstance(embedder.model, torch.nn.Sequential)
    empty = embedder.embed([])
    assert empty.shape == (0, 1280) and empty.dtype == np.float32


@pytest.mark.parametrize("which", ["openvino_random", "onnx_random", "torch_random"])
def test_batch_equals_one_by_one_and_keeps_order(which, request):
    embedder: Embedder = request.getfixturevalue(which)
    imgs = pictures(5)
    together = embedder.embed(imgs, batch_size=2)  # uneven chunks on purpose
    alone = np.concatenate([embedder.embed([img]) for img in imgs])
    assert cosine_rows(together, alone).min() > 0.99999
    np.testing.assert_allclose(together, alone, rtol=1e-3, atol=1e-3 * np.abs(alone).max())
    backwards = embedder.embed(imgs[::-1])
    np.testing.assert_allclose(backwards[::-1], together, rtol=1e-3, atol=1e-3 * np.abs(alone).max())
    # Different pictures give clearly different features (the rows are not all the same).
    assert cosine_rows(together[:-1], together[1:]).max() < 0.9999


@pytest.mark.parametrize(("which", "min_cosine"), [("onnx_random", 0.999), ("openvino_random", 0.95)])  # OpenVINO: bf16 where the CPU has it
def test_compiled_runtimes_match_torch_random_init(which, min_cosine, torch_random, request):
    compiled: Embedder = request.getfixturevalue(which)
    for a, b in zip(compiled.model.state_dict().values(), torch_random.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    imgs = pictures(6, size=(200, 150))
    assert cosine_rows(compiled.embed(imgs), torch_random.embed(imgs)).min() > min_cosine


def test_prepare_gives_network_input_in_any_thread(onnx_random):
    imgs = pictures(6, size=(90, 300))
    batch = onnx_random.prepare(imgs)
    assert batch.shape == (6, 224, 224, 3) and batch.dtype == np.uint8 and batch.flags.c_contiguous
    assert np.array_equal(batch[2], whole_picture(imgs[2], 224))  # the default fit: the whole picture
    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, onnx_random.prepare(imgs))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, batch) for r in results.values())


def test_embed_arrays_checks_its_input(onnx_random):
    good = onnx_random.prepare(pictures(2))
    for bad in (good.transpose(0, 3, 1, 2), good.astype(np.float32), good[:, :200, :200], good[0]):
        with pytest.raises(ValueError, match="uint8"):
            onnx_random.embed_arrays(bad)
    assert onnx_random.embed_arrays(good[:0]).shape == (0, 1280)
    # A non-contiguous view is accepted and gives the same answer as a copy.
    spaced = np.zeros((4, *good.shape[1:]), dtype=np.uint8)
    spaced[::2] = good
    view = spaced[::2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(onnx_random.embed_arrays(view), onnx_random.embed_arrays(good))


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="FFENGINE_DEVICE=cuda.*no CUDA GPU"):
        Embedder(None, "cuda")
    with pytest.raises(ConfigError, match="FFENGINE_DEVICE"):
        Embedder(None, "gpu")


def test_unknown_runtime_is_refused():
    with pytest.raises(ConfigError, match="runtime must be one of auto, openvino, onnx, torch"):
        Embedder(None, "cpu", runtime="tensorrt")


COMPILED = pytest.mark.parametrize("runtime", ["onnx", "openvino"])  # both load the exported ONNX file


@COMPILED
def test_onnx_file_is_cached_and_reused(runtime, weights_file, tmp_path, fresh_memo, monkeypatch):
    cache = tmp_path / "onnx"
    first = Embedder.load(str(weights_file), "cpu", runtime=runtime, cache_dir=cache)
    files = list(cache.iterdir())
    assert first.runtime == runtime and len(files) == 1
    assert files[0].name.startswith(first.fingerprint) and files[0].suffix == ".onnx"
    stamp = files[0].stat().st_mtime_ns

    monkeypatch.setattr(runtime_onnx, "_memo", OrderedDict())

    def no_export(*args, **kwargs):
        raise AssertionError("should have used the cached file")

    monkeypatch.setattr(runtime_onnx, "export", no_export)
    second = Embedder.load(str(weights_file), "cpu", runtime=runtime, cache_dir=cache)
    assert second.runtime == runtime and files[0].stat().st_mtime_ns == stamp
    imgs = pictures(3)
    np.testing.assert_array_equal(first.embed(imgs), second.embed(imgs))


@COMPILED
def test_corrupt_cache_file_is_exported_again(runtime, weights_file, tmp_path, fresh_memo, caplog):
    cache = tmp_path / "onnx"
    Embedder.load(str(weights_file), "cpu", runtime=runtime, cache_dir=cache)
    (cached,) = cache.iterdir()
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 3])  # a half-written or damaged file
    runtime_onnx._memo.clear()
    with caplog.at_level(logging.WARNING, logger="ffengine"):
        again = Embedder.load(str(weights_file), "cpu", runtime=runtime, cache_dir=cache)
    assert again.runtime == runtime
    assert "exporting it again" in caplog.text
    assert cached.read_bytes() == good


def test_export_failure_falls_back_to_torch(weights_file, tmp_path, fresh_memo, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtime_onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="ffengine"):
        embedder = Embedder.load(str(weights_file), "cpu", cache_dir=tmp_path / "onnx")
    assert embedder.runtime == "torch"
    assert "exporter exploded" in caplog.text and "PyTorch" in caplog.text
    reference = Embedder.load(str(weights_file), "cpu", runtime="torch")
    imgs = pictures(2)
    np.testing.assert_array_equal(embedder.embed(imgs), reference.embed(imgs))


@COMPILED
def test_unwritable_cache_dir_still_runs_onnx(runtime, weights_file, tmp_path, fresh_memo, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="ffengine"):
        embedder = Embedder.load(str(weights_file), "cpu", runtime=runtime, cache_dir=blocker / "onnx")
    assert embedder.runtime == runtime
    assert "cannot cache the ONNX model" in caplog.text


def test_random_init_is_never_written_to_disk(tmp_path, fresh_memo):
    torch.manual_seed(1)
    Embedder(None, "cpu", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_train_mode_does_not_leak_into_embeddings(torch_random):
    imgs = pictures(3)
    want = torch_random.embed(imgs)
    torch_random.model.train()
    try:
        got = torch_random.embed(imgs)
        assert torch_random.model.training  # left as the trainer set it
    finally:
        torch_random.model.eval()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("which", ["openvino_random", "onnx_random", "torch_random"])
def test_forward_pass_releases_the_gil(which, request):
    embedder: Embedder = request.getfixturevalue(which)
    batch = embedder.prepare(pictures(8))
    ticks = 0
    stop = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.0002)  # gives the GIL back; getting it again needs the other thread to let go

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)  # no forced switches: only code that releases the GIL lets the ticker run
    worker = threading.Thread(target=ticker)
    try:
        worker.start()
        time.sleep(0.01)
        start = ticks
        embedder.embed_arrays(batch)
        during = ticks - start
    finally:
        stop.set()
        sys.setswitchinterval(old)
        worker.join()
    assert during > 5, during


def test_threads_share_one_embedder(onnx_random):
    imgs = pictures(4)
    want = onnx_random.embed(imgs)
    results: list[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        got = onnx_random.embed(imgs)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, want) for r in results)


@pytest.mark.parametrize("which", ["openvino_random", "onnx_random", "torch_random"])
def test_embedding_on_the_callers_thread_gives_the_same_features(which, request):
    embedder: Embedder = request.getfixturevalue(which)
    assert embedder.wants_one_picture_per_thread is (which != "torch_random")
    pixels = embedder.prepare(pictures(6))
    want = embedder.embed_arrays(pixels)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:  # six threads at once, one picture each, as the index build does
        results[i] = embedder.embed_arrays(pixels[i : i + 1], on_caller_thread=True)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = np.stack([results[i] for i in range(6)])
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# --- real weights and real photos --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(real_weights, tmp_path_factory) -> tuple[Embedder, Embedder]:
    cache = tmp_path_factory.mktemp("onnx")
    return (
        Embedder.load(str(real_weights), "cpu", runtime="onnx", cache_dir=cache),
        Embedder.load(str(real_weights), "cpu", runtime="torch"),
    )


def catalogue_sample(shared, per_category: int, categories: tuple[str, ...]) -> list[tuple[str, Path]]:
    root = shared("datasets", "catalog-10k")
    chosen: dict[str, list[Path]] = {c: [] for c in categories}
    with (root / "products.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            bucket = chosen.get(row["category"])
            if bucket is not None and len(bucket) < per_category:
                bucket.append(root / row["image"])
    return [(c, p) for c, paths in chosen.items() for p in paths]


CATEGORIES = ("Tshirts", "Jeans", "Heels", "Watches", "Handbags", "Sunglasses", "Dresses", "Backpacks")


def test_real_onnx_matches_torch_and_ranks_the_same(real_pair, shared):
    onnx_emb, torch_emb = real_pair
    assert onnx_emb.runtime == "onnx" and torch_emb.runtime == "torch"
    assert onnx_emb.fingerprint == torch_emb.fingerprint
    sample = catalogue_sample(shared, 5, CATEGORIES)
    queries_dir = shared("datasets", "queries", "test")
    queries = sorted(queries_dir.glob("*/*.jpg"))[::60][:8]
    imgs = [load_image(p) for _, p in sample] + [load_image(p) for p in queries]
    a, b = onnx_emb.embed(imgs), torch_emb.embed(imgs)
    assert cosine_rows(a, b).min() > 0.999
    # Quality does not move: each query's five nearest catalogue photos are the same.
    n = len(sample)

    def top5(feats: np.ndarray) -> list[list[int]]:
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        sims = unit[n:] @ unit[:n].T
        return [sorted(np.argsort(-row)[:5].tolist()) for row in sims]

    assert top5(a) == top5(b)


def test_real_openvino_agrees_with_torch_and_ranks_alike(real_pair, real_weights, shared):
    """OpenVINO computes in bfloat16 where the CPU has it: close to fp32, same neighbours for the most part."""
    _, torch_emb = real_pair
    ov_emb = Embedder.load(str(real_weights), "cpu", runtime="openvino")
    assert ov_emb.runtime == "openvino" and ov_emb.fingerprint == torch_emb.fingerprint
    sample = catalogue_sample(shared, 5, CATEGORIES)
    queries = sorted(shared("datasets", "queries", "test").glob("*/*.jpg"))[::60][:8]
    imgs = [load_image(p) for _, p in sample] + [load_image(p) for p in queries]
    a, b = ov_emb.embed(imgs), torch_emb.embed(imgs)
    cos = cosine_rows(a, b)
    assert cos.min() > 0.95 and cos.mean() > 0.985, (cos.min(), cos.mean())
    n = len(sample)

    def top5(feats: np.ndarray) -> list[set[int]]:
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        return [set(np.argsort(-row)[:5].tolist()) for row in unit[n:] @ unit[:n].T]

    overlap = np.mean([len(x & y) / 5 for x, y in zip(top5(a), top5(b), strict=True)])
    assert overlap >= 0.8, overlap


def test_real_features_find_the_same_product_in_another_view(real_pair, shared):
    onnx_emb, _ = real_pair
    sample = catalogue_sample(shared, 2, CATEGORIES)
    originals = [load_image(p) for _, p in sample]

    def another_view(img: Image.Image) -> Image.Image:
        w, h = img.size  # mirrored, cropped off-centre to 85 %, slightly darker
        cropped = ImageOps.mirror(img).crop((int(w * 0.1), int(h * 0.05), int(w * 0.95), int(h * 0.9)))
        return Image.eval(cropped, lambda v: int(v * 0.9))

    base = onnx_emb.embed(originals)
    views = onnx_emb.embed([another_view(img) for img in originals])
    sims = cosine_rows(views[:, None, :].repeat(len(base), 1).reshape(-1, 1280), np.tile(base, (len(views), 1))).reshape(
        len(views), len(base)
    )
    assert (sims.argmax(axis=1) == np.arange(len(views))).all(), sims.argmax(axis=1)
    # ... and a product is nearer to its own other view than to a different product.
    assert (np.diag(sims) > np.sort(sims, axis=1)[:, -2] - 1e-9).all()


def test_matches_the_torchvision_reference_pipeline(real_pair, real_weights, shared):
    """Resize(256) + CenterCrop(224) + Normalize, then features + average pool: the study's extractor."""
    from torchvision import transforms

    from ffengine.weights import resolve_weights

    onnx_emb, _ = real_pair
    resolved = resolve_weights(str(real_weights))
    prep = resolved.preprocess
    reference = mobilenet_v2(weights=None)
    reference.load_state_dict({**reference.state_dict(), **resolved.state_dict})
    reference.eval()
    fit = [transforms.Resize((prep.input_size, prep.input_size))] if prep.fit == "whole" else [transforms.Resize(prep.resize), transforms.CenterCrop(prep.input_size)]
    to_input = transforms.Compose(
        [
            *fit,
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    paths = [p for _, p in catalogue_sample(shared, 1, CATEGORIES)]
    paths += sorted(shared("datasets", "queries", "validation").glob("*/*.jpg"))[::80][:6]
    imgs = [load_image(p) for p in paths]
    with torch.inference_mode():
        want = reference.features(torch.stack([to_input(img) for img in imgs])).mean(dim=(2, 3)).numpy()
    assert cosine_rows(onnx_emb.embed(imgs), want).min() > 0.999  # pixels agree to +-1 (float rounding)
