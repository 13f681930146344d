"""``ffengine`` as a person runs it: real processes, real files, random-but-real weights files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import mobilenet_v2

from ffengine.cli import main
from ffengine.index import DEFAULT_BACKEND, Index
from ffengine.weights import Preprocess, save_weights
from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[1]
GOOD = 6  # products with a readable photo


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    """``python -m ffengine ARGS`` in ``cwd`` with a clean FFENGINE_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FFENGINE_") and k != "DATABASE_URL"}
    base.update({"FFENGINE_DATA_DIR": str(cwd / "data"), "PYTHONPATH": str(REPO)}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "ffengine", *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout)


def random_weights(path: Path, seed: int) -> Path:
    """A real MobileNetV2 weights file + sidecar (random init, so no download and no ../shared needed)."""
    torch.manual_seed(seed)
    return save_weights(mobilenet_v2(weights=None).state_dict(), path, Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny store: 6 good products, a row without title, a missing photo, a photo that is not an image."""
    root = tmp_path_factory.mktemp("store")
    (root / "images").mkdir()
    rows = ["id,title,url,image,category,gender"]
    for i in range(GOOD):
        (root / "images" / f"{i}.jpg").write_bytes(make_image(i * 11 + 3, size=(120, 160)))
        rows.append(f"sku{i},Shirt number {i},https://shop.example/sku{i},images/{i}.jpg,{'Shirts' if i % 2 else 'Jeans'},Men")
    rows.append("sku-notitle,,https://shop.example/x,images/0.jpg,Shirts,Men")  # line 8: broken row
    rows.append("sku-lost,Lost photo,https://shop.example/lost,images/missing.jpg,Shirts,Men")  # line 9
    (root / "images" / "junk.jpg").write_bytes(b"this is not a jpeg at all")
    rows.append("sku-junk,Junk photo,https://shop.example/junk,images/junk.jpg,Shirts,Men")  # line 10
    (root / "products.csv").write_text("\n".join(rows) + "\n")
    random_weights(root / "model-a.pth", seed=1)
    random_weights(root / "model-b.pth", seed=2)
    proc = run("index", "build", "--catalog", "products.csv", "--out", "idx", "--weights", "model-a.pth", "--device", "cpu", cwd=root)
    assert proc.returncode == 0, proc.stderr
    (root / "build.out").write_text(proc.stdout)
    (root / "build.err").write_text(proc.stderr)
    return root


def test_build_reports_products_and_skipped_rows_with_reasons(store: Path) -> None:
    out, err = (store / "build.out").read_text(), (store / "build.err").read_text()
    assert f"{GOOD} products indexed" in out and "3 skipped" in out
    assert "line 8" in out and "title" in out
    assert "line 9 (id sku-lost)" in out and "not found" in out
    assert "line 10 (id sku-junk)" in out and "not an image" in out
    assert "images/s" in out
    assert "embedding" in err and "img" in err  # the progress bar
    index = Index.load(store / "idx")
    assert [p.id for p in index.products] == [f"sku{i}" for i in range(GOOD)]
    assert index.features.shape == (GOOD, 1280)


def test_recommend_json_with_a_good_and_a_bad_photo_and_a_sheet(store: Path) -> None:
    (store / "query.png").write_bytes(make_image(2 * 11 + 3, size=(120, 160), fmt="PNG"))  # product sku2's picture, as PNG
    (store / "broken.jpg").write_bytes(make_image(5)[:200])
    proc = run(
        "recommend", "--index", "idx", "--weights", "model-a.pth", "--device", "cpu", "--runtime", "onnx", "--k", "3", "--json",
        "--sheet", "sheet.png", "query.png", "broken.jpg", cwd=store,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["photo"] for line in lines] == ["query.png", "broken.jpg"]
    good, bad = lines
    assert [r["id"] for r in good["results"]][0] == "sku2" and len(good["results"]) == 3
    first = good["results"][0]
    assert set(first) >= {"id", "title", "url", "image", "distance"}
    assert first["title"] == "Shirt number 2" and first["url"] == "https://shop.example/sku2"
    assert Path(first["image"]).is_absolute() and first["distance"] < 0.5
    assert [r["distance"] for r in good["results"]] == sorted(r["distance"] for r in good["results"])
    assert "results" not in bad and "damaged" in bad["error"]
    guess = good["category_guess"]  # what the category prior saw: the store's categories, most likely first
    assert {g["name"] for g in guess} == {"Shirts", "Jeans"} and abs(sum(g["p"] for g in guess) - 1) < 1e-3
    assert guess == sorted(guess, key=lambda g: -g["p"]) and "kind_guess" not in good  # no kind head in these weights
    with Image.open(store / "sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > sheet.height > 0
        assert np.asarray(sheet.convert("L")).std() > 10


def test_settings_from_a_dotenv_file_filters_and_human_output(store: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"FFENGINE_INDEX={store / 'idx'}\nFFENGINE_WEIGHTS={store / 'model-a.pth'}\nFFENGINE_DEVICE=cpu\n")
    (tmp_path / "q.jpg").write_bytes(make_image(4))
    proc = run("recommend", "--category", "shirts", "q.jpg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    photo_line = proc.stdout.splitlines()[0]  # the photo, then what the category prior thinks it shows
    assert photo_line.startswith("q.jpg  (category: ") and "Shirts" in photo_line and "Jeans" in photo_line
    shown = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(shown) == GOOD // 2 and all("[Shirts]" in line and "https://shop.example/sku" in line for line in shown)
    assert [line.split(".")[0].strip() for line in shown] == ["1", "2", "3"]


def test_missing_weights_file_is_one_clear_line_and_exit_2(store: Path) -> None:
    proc = run("recommend", "--index", "idx", "--weights", "absent.pth", "q.jpg", cwd=store)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("ffengine: error: FFENGINE_WEIGHTS=absent.pth: no such file")
    assert "Traceback" not in proc.stderr


def in_process(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)``, the function behind the console script, in this process (no second torch import)."""
    for name in [k for k in os.environ if k.startswith("FFENGINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FFENGINE_DATA_DIR", str(cwd / "data"))
    monkeypatch.chdir(cwd)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_photo_failing_exits_1(store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recommend", "--index", "idx", "--weights", "model-a.pth", "--device", "cpu", "--json", "nope.jpg", "products.csv"]
    code, out, _ = in_process(argv, store, monkeypatch, capsys)
    assert code == 1
    errors = [json.loads(line)["error"] for line in out.splitlines()]
    assert "not found" in errors[0] and "not an image" in errors[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "model-b.pth"], "built by another model"),
        (["--weights", "model-a.pth", "--index", "no-index-here"], "No index at"),
        (["--weights", "model-a.pth", "--device", "tpu"], "--device must be one of"),
        (["--weights", "model-a.pth", "--runtime", "tensorrt"], "--runtime must be one of"),
        (["--weights", "model-a.pth", "--k", "0"], "--k must be at least 1"),
        (["--weights", "model-a.pth", "--device", "cpu", "--gender", "men"], "q.jpg: File not found"),
    ],
)
def test_errors_are_one_clear_line(
    store: Path, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = in_process(["recommend", "--index", "idx", *args, "q.jpg"], store, monkeypatch, capsys)
    assert code == (1 if "File not found" in message else 2)
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_unwritable_sheet_is_one_clear_line(store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recommend", "--index", "idx", "--weights", "model-a.pth", "--device", "cpu", "--sheet", "products.csv/s.png", "images/1.jpg"]
    code, out, err = in_process(argv, store, monkeypatch, capsys)
    assert code == 2 and out.startswith("images/1.jpg  (category: ") and "\n  1. Shirt number 1 [Shirts]" in out
    assert len(err.strip().splitlines()) == 1 and err.startswith("ffengine: error: ") and "products.csv" in err


def test_index_info_describes_the_index(store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(["index", "info", "idx"], store, monkeypatch, capsys)
    assert code == 0 and f"{GOOD} products" in out and f"backend {DEFAULT_BACKEND}" in out
    assert Index.load(store / "idx").fingerprint in out


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ff.db'}"
    for _ in range(2):  # idempotent
        proc = run("db", "upgrade", cwd=tmp_path, env={"DATABASE_URL": url})
        assert proc.returncode == 0, proc.stderr
        assert "latest schema" in proc.stdout
    import sqlite3

    with sqlite3.connect(tmp_path / "ff.db") as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
    assert "alembic_version" in tables and len(tables) > 3


def test_db_upgrade_hides_the_password(tmp_path: Path) -> None:
    proc = run("db", "upgrade", cwd=tmp_path, env={"DATABASE_URL": "postgresql+asyncpg://bot:s3cret-pw@127.0.0.1:9/ff"})
    assert proc.returncode == 2
    assert "s3cret-pw" not in proc.stderr + proc.stdout and "***" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("ffengine")
    if not script.exists():
        pytest.skip("the ffengine console script is not installed in this environment (pip install -e .)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "recommend" in proc.stdout and "index" in proc.stdout


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip().endswith(version("focusedfashion"))
    with pytest.raises(SystemExit) as done:
        main(["index", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "default: no PCA, every dimension" in text and "tuned" not in text


@pytest.fixture
def own_weights(store: Path, tmp_path: Path) -> Path:
    """A copy of the store's index whose manifest records a weights file of its own (which tests may move)."""
    from ffengine.index import weights_record, write_index

    for suffix in (".pth", ".json"):
        (tmp_path / f"w{suffix}").write_bytes((store / f"model-a{suffix}").read_bytes())
    built = Index.load(store / "idx")
    write_index(
        tmp_path / "idx", built.features, built.products, fingerprint=built.fingerprint, catalog_hash="copy",
        preprocess=built.manifest["preprocess"], weights=weights_record(str(tmp_path / "w.pth")),
    )  # fmt: skip
    (tmp_path / "q.jpg").write_bytes(make_image(4))
    return tmp_path


def test_the_index_remembers_its_weights(own_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No --weights, no FFENGINE_WEIGHTS: the file the index records (no download of torchvision's weights)."""
    from ffengine.index import sha256_file

    code, out, err = in_process(["index", "info", "idx"], own_weights, monkeypatch, capsys)
    assert code == 0 and f"weights {own_weights / 'w.pth'} (sha256 {sha256_file(own_weights / 'w.pth')})" in out
    code, out, err = in_process(["recommend", "--index", "idx", "--device", "cpu", "--json", "q.jpg"], own_weights, monkeypatch, capsys)
    assert code == 0 and len(json.loads(out)["results"]) == 5, err


def test_moved_or_changed_weights_are_named_with_the_way_to_point_at_them(
    own_weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ffengine.index import sha256_file

    weights = own_weights / "w.pth"
    digest = sha256_file(weights)
    argv = ["recommend", "--index", "idx", "--device", "cpu", "q.jpg"]
    weights.rename(own_weights / "moved.pth")
    code, out, err = in_process(argv, own_weights, monkeypatch, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"{weights} (sha256 {digest}), which is not there any more" in err and "--weights FILE or FFENGINE_WEIGHTS" in err
    (own_weights / "moved.pth").rename(own_weights / "moved-again.pth")  # pointing at the moved file works
    (own_weights / "moved-again.json").write_bytes((own_weights / "w.json").read_bytes())
    code, out, err = in_process([*argv[:-1], "--weights", "moved-again.pth", "q.jpg"], own_weights, monkeypatch, capsys)
    assert code == 0 and out.startswith("q.jpg"), err
    weights.write_bytes((own_weights / "moved-again.pth").read_bytes() + b"\0")
    code, out, err = in_process(argv, own_weights, monkeypatch, capsys)
    assert code == 2 and f"{weights} (sha256 {digest}), which has changed since" in err and "FFENGINE_WEIGHTS" in err


def test_recommend_json_stdout_is_only_json_lines(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What libraries print (torch's "Downloading: ..."), warnings and unreadable photos stay off stdout."""
    import shutil

    from ffengine.embedder import Embedder

    load = Embedder.load

    def noisy_load(*args: object, **kwargs: object) -> Embedder:
        print('Downloading: "https://download.pytorch.org/models/x.pth" to /root/.cache/x.pth')
        return load(*args, **kwargs)

    monkeypatch.setattr(Embedder, "load", staticmethod(noisy_load))
    shutil.copytree(store / "idx", tmp_path / "idx.old")  # only the copy an interrupted update left: a logged warning
    (tmp_path / "q.jpg").write_bytes(make_image(4))
    (tmp_path / "broken.jpg").write_bytes(make_image(5)[:200])
    argv = ["recommend", "--index", "idx", "--weights", str(store / "model-a.pth"), "--device", "cpu", "--json", "q.jpg", "broken.jpg", "nope.jpg"]
    code, out, err = in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 0 and "Downloading" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["photo"] for line in lines] == ["q.jpg", "broken.jpg", "nope.jpg"]
    assert "results" in lines[0] and "error" in lines[1] and "error" in lines[2]


def test_index_info_shows_the_search_in_effect(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Info says what the loaded index does with its options: codes and a shortlist, or an exact scan when small."""
    from ffengine.catalog import Product
    from ffengine.index import PQ_MIN_ROWS, write_index

    n = PQ_MIN_ROWS + 10
    feats = np.random.default_rng(0).standard_normal((n, 1280)).astype(np.float32)
    products = [Product(f"p{i}", f"Product {i}", None, f"/img/{i}.jpg") for i in range(n)]
    write_index(tmp_path / "big", feats, products, fingerprint="random-init", catalog_hash="random")
    code, out, _ = in_process(["index", "info", "big"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "coarse_dims=128, shortlist=400" in out and "400 candidates from 64 4-bit codes of a 128-d PCA copy" in out
    code, out, _ = in_process(["index", "info", str(store / "idx")], tmp_path, monkeypatch, capsys)
    assert code == 0 and "exact scan" in out  # too few products for codes or a shortlist


def test_dotenv_paths_are_relative_to_its_folder(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``FFENGINE_DATA_DIR=data`` in the project's .env finds the project's data from any sub-folder."""
    import shutil
    from unittest import mock

    shutil.copytree(store / "idx", tmp_path / "data" / "index")
    (tmp_path / ".env").write_text("FFENGINE_DATA_DIR=data\n")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in [k for k in os.environ if k.startswith("FFENGINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path / "sub" / "deeper")
    with mock.patch.dict(os.environ):  # what main() loads from .env goes away after the test
        code = main(["index", "info"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'data' / 'index'}: {GOOD} products")


def test_index_update_writes_a_new_index_embedding_only_the_new_picture(store: Path, tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    shutil.copytree(store / "images", shop / "images")
    lines = (store / "products.csv").read_text().splitlines()[: GOOD + 1]  # the good products
    (shop / "images" / "new.jpg").write_bytes(make_image(99, size=(100, 150)))
    rows = [lines[0], *lines[2:], "sku-new,New shirt,https://shop.example/new,images/new.jpg,Shirts,Men"]  # sku0 gone
    (shop / "products.csv").write_text("\n".join(rows) + "\n")
    proc = run("index", "update", "--catalog", "products.csv", "--index", str(store / "idx"), "--out", "idx2", "--quiet", cwd=shop)
    assert proc.returncode == 0, proc.stderr
    assert f"{GOOD} products indexed (1 embedded, {GOOD - 1} reused from the previous index, 0 from cache" in proc.stdout
    assert sorted(p.id for p in Index.load(shop / "idx2").products) == sorted([f"sku{i}" for i in range(1, GOOD)] + ["sku-new"])
    same = run("index", "update", "--catalog", "products.csv", "--index", str(store / "idx"), "--out", str(store / "idx"), cwd=shop)
    assert same.returncode == 2 and "writes a new index" in same.stderr
