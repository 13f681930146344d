"""Which item? Items from the category head's activation maps, item search by crop and colour, "more like this"."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffengine.build import build_index
from ffengine.catalog import Product
from ffengine.cli import main as cli_main
from ffengine.embedder import Embedder
from ffengine.index import Index, Reduction
from ffengine.items import (
    COLOUR_BINS,
    Item,
    cam_box,
    class_map,
    colour_histogram,
    colour_match,
    find_items,
    valid_box,
    with_margin,
)
from ffengine.prior import RARE_CLASS, LinearHead, fit_priors
from ffengine.recommend import Recommender
from tests.test_cli import random_weights

RED, BLUE, WHITE = (220, 20, 30), (20, 40, 200), (250, 250, 250)


def flat(colour: tuple[int, int, int], size: int = 224) -> np.ndarray:
    return np.full((size, size, 3), colour, np.uint8)


def test_colour_histograms_tell_colours_apart_and_sum_to_one() -> None:
    red, blue, white = (colour_histogram(flat(c)) for c in (RED, BLUE, WHITE))
    assert red.shape == (COLOUR_BINS,) and red.dtype == np.float32
    assert all(abs(float(h.sum()) - 1) < 1e-5 for h in (red, blue, white))
    assert colour_match(red, red[None])[0] == pytest.approx(1.0)
    assert colour_match(red, np.stack([blue, white])).max() < 0.01
    centre_red = flat(BLUE)
    centre_red[36:188, 36:188] = RED  # red in the middle (46% of the picture), blue around it
    mixed = colour_histogram(centre_red)
    assert colour_match(mixed, red[None])[0] > 0.46 + 0.1  # the centre counts most
    assert colour_match(mixed, red[None])[0] > colour_match(mixed, blue[None])[0]


def test_the_box_covers_the_hot_cells_in_the_photos_own_pixels() -> None:
    cam = np.zeros((7, 7), np.float32)
    cam[0:2, 5:7] = 1.0  # top right
    left, top, right, bottom = cam_box(cam, 700, 350)
    assert 400 <= left < 600 and top == 0 and right == 700 and 0 < bottom <= 175
    assert with_margin((0, 0, 100, 100), 105, 105, 0.1) == (0, 0, 105, 105)
    assert with_margin((50, 50, 60, 60), 200, 200, 0.5) == (45, 45, 65, 65)
    assert valid_box((0, 0, 10, 10), 10, 10) and not valid_box((5, 0, 5, 10), 10, 10) and not valid_box((0, 0, 11, 10), 10, 10)


def test_items_are_the_likely_categories_each_boxed_where_its_map_is_hot() -> None:
    dim = 4
    weight = np.zeros((dim, 3), np.float32)
    weight[0, 0] = weight[1, 1] = weight[2, 2] = 1.0
    head = LinearHead(("Shirts", "Jeans", RARE_CLASS), weight, np.zeros(3, np.float32))
    fmap = np.zeros((dim, 7, 7), np.float32)
    fmap[0, 0:3, :] = 1.0  # "Shirts" channel: the top rows
    fmap[1, 4:7, :] = 1.0  # "Jeans" channel: the bottom rows
    items = find_items(head, np.array([0.6, 0.3, 0.1]), fmap, 100, 200, threshold=0.05)
    assert [i.category for i in items] == ["Shirts", "Jeans"]  # the pooled rare class is never an item
    (_, shirt_top, _, shirt_bottom), (_, jeans_top, _, jeans_bottom) = items[0].box, items[1].box
    assert shirt_top == 0 and shirt_bottom <= 110 and jeans_top >= 90 and jeans_bottom == 200
    np.testing.assert_allclose(class_map(head, fmap, 1), fmap[1])
    assert [i.category for i in find_items(head, np.array([0.6, 0.3, 0.1]), fmap, 100, 200, threshold=0.4)] == ["Shirts"]
    assert len(find_items(head, np.array([0.6, 0.3, 0.1]), fmap, 100, 200, threshold=0.0, limit=1)) == 1


# ---------------------------------------------------------------- the recommender, random weights


def catalogue(tmp_path: Path, n_per: int = 6) -> Path:
    """Red shirts, blue shirts, red jeans and blue jeans, each drawn differently; two identical copies of one picture."""
    folder = tmp_path / "cat"
    folder.mkdir()
    rows = []
    for i in range(n_per * 4):
        category, colour = ("Shirts", "Jeans")[i % 2], (RED, BLUE)[(i // 2) % 2]
        img = Image.new("RGB", (96, 128), WHITE)
        img.paste(Image.new("RGB", (60, 50 + i), colour), (18, 10 if category == "Shirts" else 60))
        img.save(folder / f"{i}.png")
        rows.append({"id": f"p{i}", "title": f"{category} {i}", "url": f"https://shop.example/{i}", "image": f"{i}.png", "category": category, "colour": "Red" if colour == RED else "Blue"})
    (folder / "copy.png").write_bytes((folder / "0.png").read_bytes())
    rows.append({"id": "copy", "title": "same picture", "url": "https://shop.example/copy", "image": "copy.png", "category": "Shirts", "colour": "Red"})
    with (folder / "products.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "products.csv"


@pytest.fixture
def small(tmp_path: Path, random_embedder: Embedder) -> Recommender:
    build_index(catalogue(tmp_path), tmp_path / "idx", random_embedder, progress=False)
    return Recommender(random_embedder, Index.load(tmp_path / "idx"))


def test_the_index_keeps_each_pictures_colour_and_the_category_head(small: Recommender) -> None:
    priors = small.index.priors
    assert priors is not None and priors.category_head is not None and priors.colours is not None
    assert priors.colours.shape == (len(small.index), COLOUR_BINS)
    reds = [i for i, p in enumerate(small.index.products) if p.colour == "Red"]
    blues = [i for i, p in enumerate(small.index.products) if p.colour == "Blue"]
    assert colour_match(priors.colours[reds[0]].astype(np.float32), priors.colours[reds[1:2]])[0] > colour_match(
        priors.colours[reds[0]].astype(np.float32), priors.colours[blues[0:1]]
    )[0]


def test_an_item_search_stays_in_the_items_category_and_prefers_its_colour(small: Recommender) -> None:
    photo = Image.new("RGB", (300, 400), WHITE)
    photo.paste(Image.new("RGB", (200, 150), RED), (50, 200))  # a red garment low in the picture
    [answer] = small.answer_photos([photo])
    assert answer.features.shape == (small.index.dim,) and len(answer.recommendations) == 5
    assert all(valid_box(list(i.box), 300, 400) for i in answer.items) and len(answer.items) <= 4
    feats, found = small.recommend_item(photo, Item("Jeans", 0.5, (40, 190, 260, 360)), k=5)
    assert feats.shape == (small.index.dim,)
    assert len(found) == 5 and {r.product.category for r in found} == {"Jeans"}
    assert found[0].product.colour == "Red"  # the crop is all red: colour decides between look-alikes
    assert [r.rank for r in found] == [1, 2, 3, 4, 5] and all(r.distance >= 0 for r in found)
    with pytest.raises(ValueError, match="no products in category"):
        small.recommend_item(photo, Item("Hats", 0.5, (0, 0, 10, 10)))


def test_more_like_this_never_returns_the_product_or_a_copy_of_its_picture(small: Recommender) -> None:
    feats, found = small.more_like("p0", k=5)
    np.testing.assert_array_equal(feats, small.index.features[small.row_by_id["p0"]])
    ids = [r.product.id for r in found]
    assert len(ids) == 5 and "p0" not in ids and "copy" not in ids
    with pytest.raises(KeyError):
        small.more_like("no-such-product")


def test_a_small_category_widens_to_its_family(tmp_path: Path, random_embedder: Embedder) -> None:
    feats = np.random.default_rng(0).normal(size=(30, random_embedder.dim)).astype(np.float32)
    cats = ["Tshirts"] * 12 + ["Shirts"] * 12 + ["Tunics"] * 3 + ["Jeans"] * 3
    family = {"Tshirts": "Topwear", "Shirts": "Topwear", "Tunics": "Topwear", "Jeans": "Bottomwear"}
    prods = [Product(id=f"p{i}", title=str(i), url=None, image=f"/x/{i}.jpg", category=c, extra={"sub_category": family[c]}) for i, c in enumerate(cats)]
    index = Index(feats, prods, fingerprint=random_embedder.fingerprint, projection=Reduction(None, True).fit(feats), priors=fit_priors(feats, cats))
    rec = Recommender(random_embedder, index)
    assert len(rec.item_rows("Tunics", 5)) == 27 and len(rec.item_rows("Jeans", 5)) == 3  # Bottomwear has no more


def test_recommend_items_json_gives_each_items_box_and_results(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    weights = random_weights(tmp_path / "w.pth", seed=1)
    build_index(catalogue(tmp_path), tmp_path / "idx", Embedder.load(str(weights), "cpu"), progress=False)
    photo = tmp_path / "outfit.jpg"
    img = Image.new("RGB", (300, 400), WHITE)
    img.paste(Image.new("RGB", (200, 150), RED), (50, 200))
    img.save(photo)
    monkeypatch.delenv("FFENGINE_WEIGHTS", raising=False)
    sheet = tmp_path / "s.png"
    assert cli_main(["recommend", "--index", str(tmp_path / "idx"), "--items", "--json", "--sheet", str(sheet), str(photo)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    got = json.loads(line)
    assert len(got["results"]) == 5 and got["items"], got
    for item in got["items"]:
        assert valid_box(item["box"], 300, 400) and 0 < item["probability"] <= 1
        assert {r["category"] for r in item["results"]} == {item["category"]}
    assert Image.open(sheet).height > 0


# ---------------------------------------------------------------- real weights, real outfit photos


@pytest.mark.shared
@pytest.mark.slow
def test_on_held_out_outfit_photos_items_are_found_and_the_item_search_matches_colour(shared, real_weights: Path, tmp_path: Path) -> None:
    """A catalogue subset is the store; other apparel shots (garments on models) are the outfit photos."""
    data = shared("datasets", "catalog-10k")
    rows = list(csv.DictReader((data / "products.csv").open(encoding="utf-8")))
    store, queries = rows[:1500], [r for r in rows[1500:] if r["master_category"] == "Apparel"][:60]
    with (tmp_path / "store.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "image": str(data / r["image"])} for r in store)
    embedder = Embedder.load(str(real_weights), "cpu")
    os.environ["FFENGINE_IMAGE_ROOTS"] = str(data)
    try:
        build_index(tmp_path / "store.csv", tmp_path / "idx", embedder, progress=False)
    finally:
        del os.environ["FFENGINE_IMAGE_ROOTS"]
    rec = Recommender(embedder, Index.load(tmp_path / "idx"))
    found, whole, item = 0, [], []
    for row in queries:
        image = Image.open(io.BytesIO((data / row["image"]).read_bytes())).convert("RGB")
        [answer] = rec.answer_photos([image])
        picked = next((i for i in answer.items if i.category == row["category"]), None)
        if picked is None:
            continue
        found += 1
        restricted = rec.recommend_features(answer.features[None], 5, {"category": row["category"]})[0]
        whole.append(np.mean([r.product.colour == row["colour"] for r in restricted]))
        item.append(np.mean([r.product.colour == row["colour"] for r in rec.recommend_item(image, picked)[1]]))
    assert found / len(queries) >= 0.85
    assert np.mean(item) > np.mean(whole) + 0.05, (np.mean(item), np.mean(whole))
