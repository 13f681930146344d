"""Reading store catalogues: CSV and JSON Lines, bad rows reported by line, the rest kept."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ffengine.catalog import Problem, Product, UnsafeImagePath, is_linkable_url, link_problem, local_image_path, read_catalog
from ffengine.errors import CatalogError, ConfigError

HEADER = "id,title,url,image,price,currency,category,Color,gender,sub_category\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def by_line(problems: list[Problem]) -> dict[int, Problem]:
    return {p.line: p for p in problems}


def test_csv_fields_relative_paths_aliases_and_extra(tmp_path: Path) -> None:
    cat = write(
        tmp_path / "shop" / "products.csv",
        HEADER
        + "p1,Red dress,https://shop.example/p1,images/p1.jpg,19.90,eur,Dresses,Red,Women,Dress\n"
        + "p2,Blue jeans,https://shop.example/p2,https://cdn.example/p2.jpg,,,Jeans,,Men,\n"
        + "p3,Hat,https://shop.example/p3,/abs/hat.png, 7 ,,,,,\n",
    )
    read = read_catalog(cat, image_roots=["/abs"])  # an absolute path is fine under an allowed root
    assert read.problems == []
    assert read.lines == [2, 3, 4]
    p1, p2, p3 = read.products
    assert p1 == Product(
        id="p1",
        title="Red dress",
        url="https://shop.example/p1",
        image=os.path.join(tmp_path, "shop", "images", "p1.jpg"),
        price=19.9,
        currency="EUR",
        category="Dresses",
        colour="Red",
        gender="Women",
        extra={"sub_category": "Dress"},
    )
    assert p1.image == os.path.abspath(p1.image) and not p1.is_remote
    assert p2.image == "https://cdn.example/p2.jpg" and p2.is_remote
    assert (p2.price, p2.currency, p2.colour, p2.extra) == (None, None, None, {})
    assert p3.image == "/abs/hat.png" and p3.price == 7.0


def test_the_catalogue_folder_not_the_working_directory_anchors_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = write(tmp_path / "a" / "b.csv", "id,title,url,image\nx,X,https://s.example/x,../img/x.jpg\n")
    monkeypatch.chdir(tmp_path / "a")
    [product] = read_catalog("b.csv", image_roots=[tmp_path]).products
    assert product.image == str(tmp_path / "img" / "x.jpg")


def test_jsonl_with_numbers_aliases_and_nested_extra(tmp_path: Path) -> None:
    rows = [
        {"id": 17, "title": "Shirt", "url": "https://s.example/17", "image": "i/17.jpg", "price": 25, "color": "White",
         "year": 2011, "sizes": ["S", "M"], "Master Category": "Apparel"},
        {"id": "18", "title": "Skirt", "url": "https://s.example/18", "image": "https://cdn.example/18.jpg", "price": "9.5"},
    ]
    cat = write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    read = read_catalog(cat)
    assert read.problems == [] and read.lines == [1, 2]
    first, second = read.products
    assert first.id == "17" and first.price == 25.0 and first.colour == "White"
    assert first.image == str(tmp_path / "i" / "17.jpg")
    assert first.extra == {"year": "2011", "sizes": '["S", "M"]', "master_category": "Apparel"}
    assert second.price == 9.5 and second.is_remote


def test_broken_csv_rows_are_reported_by_line_and_the_rest_imports(tmp_path: Path) -> None:
    cat = write(
        tmp_path / "p.csv",
        "id,title,url,image,price,currency\n"  # line 1
        "ok1,Fine,https://s.example/1,a.jpg,,\n"  # 2
        ",No id,https://s.example/2,b.jpg,,\n"  # 3
        "n3,,https://s.example/3,c.jpg,,\n"  # 4
        "n4,No image,https://s.example/4,,,\n"  # 5
        "n5,Bad price,https://s.example/5,e.jpg,cheap,\n"  # 6
        "n6,Negative,https://s.example/6,f.jpg,-3,\n"  # 7
        "n7,NaN,https://s.example/7,g.jpg,nan,\n"  # 8
        "n8,Bad currency,https://s.example/8,h.jpg,3,euros\n"  # 9
        "n9,Bad url,javascript:alert(1),i.jpg,,\n"  # 10
        "n10,FTP image,https://s.example/10,ftp://x.example/j.jpg,,\n"  # 11
        "ok1,Duplicate,https://s.example/1b,k.jpg,,\n"  # 12
        "n12,Too,many,fields,https://s.example/12,l.jpg,,\n"  # 13
        '"ok2","Multi\nline title",https://s.example/13,m.jpg,1.5,usd\n'  # 14-15
        "\n"  # 16: blank lines are not rows
        'n14,"bad"quote,https://s.example/14,n.jpg,,\n'  # 17
        "ok3,Short row,https://s.example/15,o.jpg\n",  # 18: trailing optional columns may be left out
    )
    read = read_catalog(cat)
    assert [p.id for p in read.products] == ["ok1", "n9", "ok2", "ok3"]
    assert read.lines == [2, 10, 14, 18]
    assert read.products[2].title == "Multi\nline title" and read.products[2].currency == "USD"
    assert read.products[1].url is None  # kept, without the link
    assert [str(w) for w in read.warnings] == ["line 10 (id n9): url must be an http(s) link, got 'javascript:alert(1)'; imported without a link"]
    problems = by_line(read.problems)
    expected = {
        3: (None, "missing id"),
        4: ("n3", "missing title"),
        5: ("n4", "missing image"),
        6: ("n5", "bad price 'cheap'"),
        7: ("n6", "must be a finite number >= 0"),
        8: ("n7", "must be a finite number >= 0"),
        9: ("n8", "currency must be a 3-letter code"),
        11: ("n10", "image must be an http(s) URL or a local path"),
        12: ("ok1", "duplicate id (first seen on line 2)"),
        13: (None, "row has 8 fields but the header has 6"),
        17: (None, "unreadable CSV record"),
    }
    assert sorted(problems) == sorted(expected)
    for line, (pid, reason) in expected.items():
        assert problems[line].product_id == pid, line
        assert reason in problems[line].reason, (line, problems[line].reason)
    assert str(problems[12]) == "line 12 (id ok1): duplicate id (first seen on line 2); kept the first"


def test_broken_jsonl_lines_are_reported(tmp_path: Path) -> None:
    good = {"id": "a", "title": "A", "url": "https://s.example/a", "image": "a.jpg"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({**good, "id": "b", "colour": "Red", "Color": "Blue"}),
        json.dumps({**good, "id": True}),
        json.dumps({**good, "id": "c", "price": {"amount": 3}}),
        json.dumps({**good, "id": "d", "title": None}),
        json.dumps({**good, "id": "e"}),
    ]
    read = read_catalog(write(tmp_path / "c.ndjson", "\n".join(lines)))
    assert [p.id for p in read.products] == ["a", "e"] and read.lines == [1, 8]
    problems = by_line(read.problems)
    assert "not valid JSON" in problems[2].reason
    assert "expected a JSON object, got list" in problems[3].reason
    assert "'colour' given twice" in problems[4].reason
    assert "id must be text or a whole number" in problems[5].reason and problems[5].product_id is None
    assert "bad price" in problems[6].reason and problems[6].product_id == "c"
    assert problems[7].reason == "missing title"


def test_non_utf8_row_is_skipped_and_bom_is_ignored(tmp_path: Path) -> None:
    body = "\ufeffid,title,url,image\nu1,Caf\u00e9,https://s.example/1,a.jpg\n".encode()
    body += b"u2,Latin-1 caf\xe9,https://s.example/2,b.jpg\n"
    read = read_catalog(write(tmp_path / "p.csv", body))
    assert [p.title for p in read.products] == ["Caf\u00e9"]
    assert read.problems[0].line == 3 and "not UTF-8" in read.problems[0].reason


def test_limit_stops_after_that_many_usable_products(tmp_path: Path) -> None:
    rows = "".join(f"{i},T{i},https://s.example/{i},{i}.jpg\n" for i in range(10))
    read = read_catalog(write(tmp_path / "p.csv", "id,title,url,image\n" + rows), limit=3)
    assert [p.id for p in read.products] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "catalogue file not found"),
        ("products.xlsx", "x", "unknown catalogue format '.xlsx'; use one of .csv, .jsonl, .ndjson"),
        ("noext", "x", "unknown catalogue format '(no extension)'"),
        ("empty.csv", "", "the catalogue is empty"),
        ("header.csv", "id,title,url,image\n", "the catalogue has no products"),
        ("cols.csv", "id,name,url,picture\n1,a,https://s.example/1,x.jpg\n", "missing required column(s) title, image"),
        ("dupe.csv", "id,title,url,image,color,colour\n", "duplicate column(s) colour"),
        ("bad.csv", "id,title,url,image\nx,,https://s.example/1,a.jpg\n,,,\n,x,https://s.example/1,a.jpg\n",
         "no usable product; 2 row(s) skipped: line 2 (id x): missing title; line 4: missing id"),
        ("blank.jsonl", "\n\n", "the catalogue has no products"),
    ],
)
def test_unusable_catalogues_raise_a_clear_catalog_error(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(CatalogError) as err:
        read_catalog(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_a_directory_is_not_a_catalogue(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(CatalogError, match="is a directory"):
        read_catalog(tmp_path / "d.csv")


def test_product_json_round_trip_and_malformed_records() -> None:
    product = Product("1", "T", "https://s.example/1", "/abs/1.jpg", 2.5, "EUR", "Shirts", "Red", "Men", {"year": "2011"})
    data = json.loads(json.dumps(product.to_json()))
    assert Product.from_json(data) == product
    minimal = Product.from_json({"id": "2", "title": "T", "url": "https://s.example/2", "image": "/abs/2.jpg"})
    assert minimal.price is None and minimal.extra == {}
    with pytest.raises(ValueError, match="lacks 'image'"):
        Product.from_json({"id": "1", "title": "T", "url": "u"})
    with pytest.raises(ValueError, match="malformed id, price, extra"):
        Product.from_json({**data, "id": 1, "price": "cheap", "extra": {"year": 2011}})
    with pytest.raises(ValueError, match="must be a JSON object"):
        Product.from_json(["not", "a", "dict"])  # type: ignore[arg-type]


@pytest.mark.shared
def test_real_catalog_10k_reads_cleanly(shared: Callable[..., Path]) -> None:
    csv_path = shared("datasets", "catalog-10k", "products.csv")
    read = read_catalog(csv_path)
    assert read.problems == []
    assert len(read.products) == len({p.id for p in read.products}) == 9583
    first = read.products[0]
    assert first.category and first.gender and first.colour
    assert set(first.extra) == {"sub_category", "master_category", "season", "usage", "year"}
    assert all(Path(p.image).is_file() for p in read.products[:50])


def test_local_images_must_stay_in_the_catalogue_folder_or_an_allowed_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shop, secret = tmp_path / "shop", tmp_path / "secret"
    write(shop / "images" / "ok.jpg", b"jpeg")
    write(secret / "key.jpg", b"not for shoppers")
    (shop / "images" / "link.jpg").symlink_to(secret / "key.jpg")
    (shop / "images" / "dir").symlink_to(secret)
    (shop / "images" / "inside.jpg").symlink_to(shop / "images" / "ok.jpg")
    rows = ["images/ok.jpg", str(secret / "key.jpg"), "../secret/key.jpg", "images/../../secret/key.jpg",
            "images/link.jpg", "images/dir/key.jpg", "/etc/passwd", "images/inside.jpg"]  # fmt: skip
    cat = write(shop / "p.csv", "id,title,url,image\n" + "".join(f"p{i},T,https://s.example/{i},{r}\n" for i, r in enumerate(rows)))
    monkeypatch.delenv("FFENGINE_IMAGE_ROOTS", raising=False)

    read = read_catalog(cat)
    assert [(p.id, p.image) for p in read.products] == [("p0", str(shop / "images" / "ok.jpg")), ("p7", str(shop / "images" / "ok.jpg"))]
    problems = by_line(read.problems)
    assert sorted(problems) == [3, 4, 5, 6, 7, 8]
    assert all("leads outside the catalogue folder" in p.reason and "FFENGINE_IMAGE_ROOTS" in p.reason for p in problems.values())
    assert str(secret / "key.jpg") in problems[6].reason  # where the link leads, for the admin

    monkeypatch.setenv("FFENGINE_IMAGE_ROOTS", f"{secret}{os.pathsep}{tmp_path / 'elsewhere-unused'}")
    with pytest.raises(ConfigError, match="FFENGINE_IMAGE_ROOTS: .*elsewhere-unused.* is not a folder"):
        read_catalog(cat)
    monkeypatch.setenv("FFENGINE_IMAGE_ROOTS", str(secret))  # the setting opens a folder
    opened = read_catalog(cat)
    assert [p.id for p in opened.products] == ["p0", "p1", "p2", "p3", "p4", "p5", "p7"]
    assert {p.image for p in opened.products[1:6]} == {str(secret / "key.jpg")}  # stored resolved
    assert [p.line for p in opened.problems] == [8]


def test_a_stored_photo_path_is_refused_once_a_link_is_swapped_in(tmp_path: Path) -> None:
    write(tmp_path / "shop" / "images" / "a.jpg", b"jpeg")
    write(tmp_path / "secret.txt", b"token")
    [product] = read_catalog(write(tmp_path / "shop" / "p.csv", "id,title,url,image\na,A,https://s.example/a,images/a.jpg\n")).products
    assert local_image_path(product.image) == Path(product.image)
    Path(product.image).unlink()
    Path(product.image).symlink_to(tmp_path / "secret.txt")  # after import: the photo now points elsewhere
    with pytest.raises(UnsafeImagePath, match="leads elsewhere"):
        local_image_path(product.image)


BAD_LINKS = {
    "http://localhost:8080/p": "url host 'localhost' is not a public address",
    "https://shop.example/" + "x" * 3000: "url is longer than 1000 characters",
    "http://10.0.0.1/p": "url host '10.0.0.1' is not a public address",
    "http://[::ffff:127.0.0.1]/p": "url host '::ffff:127.0.0.1' is not a public address",
    "http://intranet/p": "url host 'intranet' is not a public address",
    "https://printer.local/p": "url host 'printer.local' is not a public address",
    "https://shop.example/a b": "url contains spaces or control characters",
    "https://shop.example:99999/p": "url has a malformed host or port",
    "ftp://shop.example/p": "url must be an http(s) link",
    "": "no url",
}


def test_product_links_a_shopper_cannot_open_are_dropped_with_a_warning_and_the_product_kept(tmp_path: Path) -> None:
    rows = [{"id": f"b{i}", "title": "T", "url": url, "image": "a.jpg"} for i, url in enumerate(BAD_LINKS)]
    rows.append({"id": "good", "title": "T", "url": "https://shop.example/p?a=1", "image": "a.jpg"})
    read = read_catalog(write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert read.problems == [] and len(read.products) == len(rows)
    assert [p.url for p in read.products] == [None] * len(BAD_LINKS) + ["https://shop.example/p?a=1"]
    assert [(w.line, w.product_id) for w in read.warnings] == [(i + 1, f"b{i}") for i in range(len(BAD_LINKS))]
    for warning, reason in zip(read.warnings, BAD_LINKS.values(), strict=True):
        assert warning.reason.startswith(reason) and warning.reason.endswith("; imported without a link"), warning
    assert Product.from_json(json.loads(json.dumps(read.products[0].to_json()))) == read.products[0]  # no link survives the index


@pytest.mark.parametrize(
    ("url", "linkable"),
    [(u, False) for u in BAD_LINKS] + [(None, False), ("https://shop.example/p", True), ("http://93.184.216.34/p", True), ("https://www.myntra.com/10000", True)],
)
def test_is_linkable_url(url: str | None, linkable: bool) -> None:
    assert is_linkable_url(url) is linkable
    assert (link_problem(url) is None) is linkable
