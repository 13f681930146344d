"""``python -m train`` as an admin runs it: real processes, a real SQLite file, a tiny generated store.

The network is a random-init MobileNetV2 saved as a real weights file, so nothing here needs
../shared or a download; what is checked is the plumbing an admin relies on: versions made,
registered, activated or not, listed, rolled back, and errors as one clear line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.models import mobilenet_v2

from ffengine.build import build_index
from ffengine.embedder import Embedder
from ffengine.index import Index
from ffengine.weights import Preprocess, resolve_weights, save_weights
from tests.test_train_finetune import COLOURS, garment
from train.__main__ import main

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("Tshirts", "Jeans", "Caps")
QUERY_LABELS = {"t-shirt": "Tshirts", "pants": "Jeans", "hat": "Caps"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 products (3 categories x 2 colours), 9 labelled shopper photos, random weights, a base index."""
    root = tmp_path_factory.mktemp("train-store")
    (root / "images").mkdir()
    rows = ["id,title,url,image,category,colour,gender,usage"]
    for i in range(36):
        colour = "Red" if i % 2 else "Blue"
        garment(COLOURS[colour], i).save(root / "images" / f"{i}.jpg", quality=90)
        rows.append(f"sku{i},Item {i},https://shop.example/{i},images/{i}.jpg,{CATEGORIES[i % 3]},{colour},{'Men' if i % 4 < 2 else 'Women'},Casual")
    (root / "products.csv").write_text("\n".join(rows) + "\n")
    queries = root / "queries"
    labels = ["image,split,label"]
    for split, offset in (("validation", 100), ("train", 200)):
        for j, label in enumerate(sorted(QUERY_LABELS) * 3):
            (queries / split / label).mkdir(parents=True, exist_ok=True)
            garment(COLOURS["Red"], offset + j).rotate(10, fillcolor=(90, 80, 70)).save(queries / split / label / f"{j}.jpg")
            labels.append(f"{split}/{label}/{j}.jpg,{split},{label}")
    (queries / "labels.csv").write_text("\n".join(labels) + "\n")
    (root / "query_categories.csv").write_text(
        "query_label,catalog_categories\n" + "".join(f"{k},{v}\n" for k, v in QUERY_LABELS.items())
    )
    torch.manual_seed(3)
    save_weights(mobilenet_v2(weights=None).state_dict(), root / "base.pth", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))
    build_index(root / "products.csv", root / "data" / "index", Embedder.load(str(root / "base.pth"), "cpu"), progress=False)
    return root


def settings_env(store: Path, db: Path) -> dict[str, str]:
    return {
        "FFENGINE_WEIGHTS": str(store / "base.pth"),
        "FFENGINE_DEVICE": "cpu",
        "FFENGINE_DATA_DIR": str(db.parent / "data"),
        "FFENGINE_INDEX": str(store / "data" / "index"),
        "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "TRAIN_KEEP_REJECTED": "1",  # a rejected version must stay loadable for the rollback checks
    }


def run(store: Path, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m train ARGS`` in a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FFENGINE_") and k != "DATABASE_URL"}
    env.update(settings_env(store, db), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=db.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The same entry point in this process (no interpreter start-up per call): returns what ``run`` would."""

    def call(store: Path, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        for name in [k for k in os.environ if k.startswith("FFENGINE_")]:
            monkeypatch.delenv(name)
        for name, value in settings_env(store, db).items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(db.parent)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["train", *args], code, out, err)

    return call


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_models_rollback_and_errors_on_a_fresh_database(store: Path, tmp_path: Path, cli) -> None:
    db = tmp_path / "ff.db"
    listing = run(store, db, "models", "--json")  # once as a real process; the rest in-process
    assert "no model versions yet" in listing.stdout and last_json(listing) == {"versions": []}

    bad = cli(store, db, "rollback", "nope")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: no model version 'nope'") and "Traceback" not in bad.stderr

    stop = cli(store, db, "feedback", "--json")  # nobody rated anything yet
    result = last_json(stop)
    assert result["status"] == "insufficient" and result["version"] is None and "Not enough feedback" in stop.stdout
    versions = last_json(cli(store, db, "models", "--json"))["versions"]
    assert [(v["name"], v["active"]) for v in versions] == [("base", True)]  # the running setup, registered


def test_finetune_makes_a_version_compared_on_labelled_photos_and_rollback_undoes_it(store: Path, tmp_path: Path, cli) -> None:
    db = tmp_path / "ff.db"
    args = ["finetune", "--catalog", str(store / "products.csv"), "--train-from", "17", "--epochs", "1", "--views", "1", "--batch-size", "8",
            "--min-label-count", "3", "--name", "ft-test", "--json"]
    proc = run(store, db, *args, "--queries", str(store / "queries"))
    result = last_json(proc)
    assert result["version"] == "ft-test" and result["status"] in ("promoted", "rejected")
    m = result["metrics"]
    assert 0 <= m["micro_f1"] <= 1 and m["labels"] >= 2 and m["index_products"] == 36
    assert m["kind_photos"] == 9 and m["kind_classes"] == len(QUERY_LABELS) + 1  # the kind head, on the train photos
    assert {"precision5_before", "precision5_after"} <= set(m) and m["precision5_split"] == "validation"
    assert "[" in proc.stderr and "epoch 1/1" in proc.stderr  # progress on stderr

    folder = tmp_path / "data" / "models" / "ft-test"
    weights = resolve_weights(str(folder / "weights.pth"))
    index = Index.load(folder / "index", expect_fingerprint=weights.fingerprint)  # built by the new weights
    assert len(index) == 36 and json.loads((folder / "metrics.json").read_text())["parent"] == "base"
    versions = {v["name"]: v for v in last_json(cli(store, db, "models", "--json"))["versions"]}
    assert versions["ft-test"]["active"] == (result["status"] == "promoted")
    assert versions["ft-test"]["weights"] == str(folder / "weights.pth")

    back = last_json(cli(store, db, "rollback", "base", "--json"))
    assert back["active"]["name"] == "base"
    forward = last_json(cli(store, db, "rollback", "ft-test", "--json"))
    assert forward["active"]["name"] == "ft-test"

    again = cli(store, db, *args)  # the name is taken: one line, nothing changed
    assert again.returncode == 2 and "already exists" in again.stderr


def test_finetune_without_labelled_photos_is_registered_but_not_activated(store: Path, tmp_path: Path, cli, monkeypatch) -> None:
    db = tmp_path / "ff.db"
    monkeypatch.delenv("FFENGINE_EVAL_QUERIES", raising=False)
    result = last_json(cli(store, db, "finetune", "--catalog", str(store / "products.csv"), "--train-from", "17", "--epochs", "1", "--views", "0",
                           "--min-label-count", "3", "--limit", "24", "--json"))
    assert result["status"] == "unevaluated" and "rollback" in result["reason"]
    versions = last_json(cli(store, db, "models", "--json"))["versions"]
    assert [(v["name"], v["active"]) for v in versions] == [("base", True), (result["version"], False)]


def test_without_ffengine_weights_the_index_weights_are_used(store: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The index records the file it was built with; train registers that, not torchvision's default."""
    db = tmp_path / "ff.db"
    for name in [k for k in os.environ if k.startswith("FFENGINE_")]:
        monkeypatch.delenv(name)
    for name, value in settings_env(store, db).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FFENGINE_WEIGHTS")
    monkeypatch.chdir(tmp_path)
    assert main(["feedback", "--json"]) == 0, capsys.readouterr().err  # nothing rated: registers the base version only
    assert main(["models", "--json"]) == 0
    versions = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["versions"]
    assert [(v["name"], v["weights"]) for v in versions] == [("base", str(store / "base.pth"))]


def test_usage_names_the_command_as_typed() -> None:
    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m train ")
    script = Path(sys.executable).with_name("ffengine-train")
    if script.exists():  # the console script (pip install -e .)
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, whatever the install points at
        proc = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: ffengine-train ")


def test_catalog_on_a_full_disk_says_so_in_one_line_and_changes_nothing(store: Path, tmp_path: Path, cli) -> None:
    from tests.test_privacy_races import fill, small_disk

    db = tmp_path / "ff.db"
    with small_disk(tmp_path / "data") as data:
        assert last_json(cli(store, db, "catalog", "--catalog", str(store / "products.csv"), "--name", "cat-1", "--json"))["status"] == "promoted"
        fill(data)
        failed = cli(store, db, "catalog", "--catalog", str(store / "products.csv"), "--name", "cat-full")
        assert failed.returncode == 2
        assert "No space left on device" in failed.stderr and "unchanged" in failed.stderr
        assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert not (data / "models" / "cat-full").exists()  # what the run wrote is gone
    versions = last_json(cli(store, db, "models", "--json"))["versions"]
    assert [(v["name"], v["active"]) for v in versions] == [("base", False), ("cat-1", True)]


def test_catalog_makes_the_updated_catalogue_the_active_version(store: Path, tmp_path: Path, cli) -> None:
    db = tmp_path / "ff.db"
    result = last_json(cli(store, db, "catalog", "--catalog", str(store / "products.csv"), "--name", "cat-1", "--json"))
    assert result["status"] == "promoted" and result["version"] == "cat-1"
    assert (result["metrics"]["embedded"], result["metrics"]["reused"], result["metrics"]["index_products"]) == (0, 36, 36)
    versions = last_json(cli(store, db, "models", "--json"))["versions"]
    assert [(v["name"], v["active"]) for v in versions] == [("base", False), ("cat-1", True)]
