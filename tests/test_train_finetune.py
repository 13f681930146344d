"""Fine-tuning: labels, label-preserving augmentation, and tiny real training runs (random-init network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ffengine.catalog import Product
from ffengine.embedder import Embedder
from ffengine.images import load_image
from ffengine.weights import resolve_weights
from train.augment import background_mask, shopper_view
from train.errors import TrainingError
from train.finetune import FinetuneOptions, FrozenNet, finetune, frozen_runner, view_rng
from train.labels import LabelSet, micro_f1

COLOURS = {"Red": (200, 30, 30), "Blue": (30, 40, 200)}


def garment(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (84, 112)) -> Image.Image:
    """A studio shot: a coloured, slightly textured shape on white."""
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), 255, np.uint8)
    top, left = int(rng.integers(8, 20)), int(rng.integers(8, 20))
    block = np.clip(np.array(colour) + rng.normal(0, 12, size=(size[1] - 2 * top, size[0] - 2 * left, 3)), 0, 255)
    arr[top : size[1] - top, left : size[0] - left] = block.astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def catalogue(tmp_path: Path, n: int = 24) -> list[Product]:
    products = []
    for i in range(n):
        colour = "Red" if i % 2 else "Blue"
        category = ("Tshirts", "Jeans", "Caps")[i % 3]
        path = tmp_path / f"p{i}.jpg"
        garment(COLOURS[colour], i).save(path, quality=90)
        products.append(
            Product(id=f"p{i}", title=f"item {i}", url=f"https://shop.example/{i}", image=str(path), category=category, colour=colour,
                    gender="Women" if i % 4 < 2 else "Men", extra={"usage": "Casual"})
        )
    return products


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(0)
    return Embedder(None, "cpu", runtime="torch")


# ---------------------------------------------------------------- labels


def test_labels_come_from_attributes_seen_often_enough(tmp_path: Path) -> None:
    products = catalogue(tmp_path, 12)
    labels = LabelSet.fit(products, ("category", "colour", "usage", "sub_category"), min_count=4)
    assert labels.names == (
        "category=Caps", "category=Jeans", "category=Tshirts", "colour=Blue", "colour=Red", "usage=Casual"
    )
    y = labels.encode(products[:2])
    assert y.dtype == np.float32 and y.shape == (2, 6)
    assert y[0].tolist() == [0, 0, 1, 1, 0, 1]  # p0: Tshirts, Blue, Casual
    assert LabelSet.fit(products, ("colour",), min_count=7).names == ()  # 6 of each: below the bar


def test_micro_f1() -> None:
    truth = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    assert micro_f1(truth, truth) == 1.0
    assert micro_f1(truth, np.zeros_like(truth)) == 0.0
    # predicted: (0,0) tp, (0,1) fp, (1,1) tp; missed (0,2): tp=2, fp=1, fn=1 -> 4/6
    assert micro_f1(truth, np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.4]])) == pytest.approx(4 / 6)


# ---------------------------------------------------------------- augmentation


def test_shopper_views_replace_the_studio_background_but_keep_the_colour() -> None:
    img = garment(COLOURS["Red"], 1, size=(168, 224))
    for seed in range(12):
        view = np.asarray(shopper_view(img, np.random.default_rng(seed), background_p=1.0)).astype(int)
        r, g, b = view[..., 0], view[..., 1], view[..., 2]
        garment_px = (r > g + 40) & (r > b + 40)
        assert garment_px.mean() > 0.1, "the red garment is still there, still red"
        corners = view[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners < 240).any(), "the white backdrop was replaced"
        # brightness/contrast scale the channels together: red stays clearly red (no hue shift)
        hue_ok = (r[garment_px] > 1.8 * g[garment_px]).mean()
        assert hue_ok > 0.95


def test_a_white_product_is_not_eaten_by_the_backdrop() -> None:
    arr = np.full((224, 168, 3), 255, np.uint8)
    arr[30:200, 30:140] = 248  # a white shirt, barely darker than the studio white
    img = Image.fromarray(arr, "RGB")
    assert background_mask(img).mean() > 0.9  # everything looks like backdrop...
    view = np.asarray(shopper_view(img, np.random.default_rng(0), background_p=1.0))
    assert (view > 150).mean() > 0.5  # ...so the background is left alone rather than painting over the shirt


def test_views_are_reproducible() -> None:
    img = garment(COLOURS["Blue"], 3)
    a = shopper_view(img, view_rng(7, "p1", 1))
    b = shopper_view(img, view_rng(7, "p1", 1))
    c = shopper_view(img, view_rng(7, "p1", 2))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


# ---------------------------------------------------------------- training runs


def test_frozen_prefix_run_writes_loadable_weights_and_trains_only_the_tail(tmp_path: Path, embedder: Embedder) -> None:
    products = catalogue(tmp_path)
    out = tmp_path / "model" / "weights.pth"
    seen: list[str] = []
    opts = FinetuneOptions(mode="frozen-prefix", train_from=17, epochs=3, batch_size=8, views=1, min_label_count=3, lr=3e-3)
    result = finetune(products, embedder, out, opts, progress=lambda f, t: seen.append(t))

    assert result.mode == "frozen-prefix" and result.products_train + result.products_holdout == 24 and result.skipped == 0
    assert 0.0 <= result.micro_f1 <= 1.0 and len(result.history) == 3
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["labels"] == result.labels and "colour=Red" in sidecar["labels"]
    assert sidecar["mode"] == "frozen-prefix" and sidecar["base"] == "random-init" and sidecar["train_from"] == 17

    resolved = resolve_weights(str(out))  # the engine's loader: checks names, shapes, sha256
    base = {f"features.{k}": v for k, v in embedder.model.state_dict().items()}
    assert torch.equal(resolved.state_dict["features.0.0.weight"], base["features.0.0.weight"])  # frozen
    assert torch.equal(resolved.state_dict["features.16.conv.0.0.weight"], base["features.16.conv.0.0.weight"])
    assert not torch.equal(resolved.state_dict["features.18.0.weight"], base["features.18.0.weight"])  # trained
    tuned = Embedder.load(str(out), "cpu")
    img = load_image(products[0].image)
    assert tuned.fingerprint != embedder.fingerprint
    assert not np.allclose(tuned.embed([img]), embedder.embed([img]))
    assert any("epoch 3/3" in line for line in seen)


def test_frozen_blocks_give_the_same_output_in_onnx_runtime_and_pytorch(embedder: Embedder) -> None:
    net = FrozenNet(embedder.model[:17], embedder, pooled=False)
    assert not net.training  # BatchNorm must use running statistics
    run = frozen_runner(net, embedder)
    pixels = embedder.prepare([garment(COLOURS["Red"], s) for s in range(3)])
    with torch.inference_mode():
        want = net(torch.from_numpy(pixels)).numpy()
    got = run(pixels)
    assert got.shape == want.shape == (3, 160, 7, 7)
    assert np.allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
    assert not net.training  # exporting did not flip it to training mode


def test_full_run_trains_every_block(tmp_path: Path, embedder: Embedder) -> None:
    products = catalogue(tmp_path, 8)
    out = tmp_path / "full.pth"
    result = finetune(products, embedder, out, FinetuneOptions(mode="full", epochs=1, batch_size=4, views=1, min_label_count=2, workers=0))
    assert result.mode == "full" and result.train_from == 0
    state = resolve_weights(str(out)).state_dict
    assert not torch.equal(state["features.0.0.weight"], embedder.model.state_dict()["0.0.weight"])


def test_head_only_run_is_a_linear_probe(tmp_path: Path, embedder: Embedder) -> None:
    products = catalogue(tmp_path, 12)
    out = tmp_path / "probe.pth"
    finetune(products, embedder, out, FinetuneOptions(mode="frozen-prefix", train_from=19, epochs=1, batch_size=4, views=1, min_label_count=2))
    state = resolve_weights(str(out)).state_dict
    base = embedder.model.state_dict()
    assert all(torch.equal(state[f"features.{k}"], v) for k, v in base.items())


def test_unusable_catalogues_are_refused_clearly(tmp_path: Path, embedder: Embedder) -> None:
    products = catalogue(tmp_path, 6)
    bare = [Product(id=p.id, title=p.title, url=p.url, image=p.image) for p in products]
    with pytest.raises(TrainingError, match="fewer than 2 labels"):
        finetune(bare, embedder, tmp_path / "x.pth", FinetuneOptions(min_label_count=2, epochs=1))
    missing = [Product(id=p.id, title=p.title, url=p.url, image=str(tmp_path / "nope.jpg"), category=p.category) for p in products]
    with pytest.raises(TrainingError, match="readable local product photos"):
        finetune(missing, embedder, tmp_path / "x.pth", FinetuneOptions(epochs=1, min_label_count=1))
    with pytest.raises(TrainingError, match="train_from"):
        finetune(products, embedder, tmp_path / "x.pth", FinetuneOptions(mode="frozen-prefix", train_from=25))
    assert not (tmp_path / "x.pth").exists()
