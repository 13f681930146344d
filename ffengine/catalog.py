"""Read a store catalogue (CSV or JSON Lines) into validated :class:`Product` records.

Store exports are messy: a missing title, a price of ``"n/a"``, a duplicated id, a
relative image path. One bad row must not cost the other ten thousand, so every
row is checked on its own; a bad one becomes a :class:`Problem` (file line number
and reason) and the rest imports. Only a file that cannot be read at all, or one
with no usable product, is a :class:`~ffengine.errors.CatalogError`.

Columns (CSV header or JSON keys; case-insensitive, spaces and dashes read as ``_``):
``id, title, url, image`` are required; ``price, currency, category, colour``
(or ``color``), ``gender`` are optional; anything else lands in ``Product.extra``.
``image`` is an http(s) URL or a local path relative to the catalogue file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ffengine.errors import CatalogError

#: Catalogue formats by file extension.
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
REQUIRED = ("id", "title", "url", "image")
OPTIONAL = ("price", "currency", "category", "colour", "gender")
ALIASES = {"color": "colour"}
#: Longest accepted product id (ids travel in logs, URLs and the database).
MAX_ID_LENGTH = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
#: Lone surrogates are what ``errors="surrogateescape"`` makes of bytes that are not UTF-8.
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")


@dataclass(frozen=True)
class Product:
    """One catalogue item as the engine, the index and the bot see it.

    ``image`` is an absolute local path or an http(s) URL (resolved at import);
    ``extra`` holds the catalogue's other columns (e.g. ``sub_category``) as text.
    """

    id: str
    title: str
    url: str
    image: str
    price: float | None = None
    currency: str | None = None
    category: str | None = None
    colour: str | None = None
    gender: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_remote(self) -> bool:
        """Whether ``image`` must be downloaded."""
        return is_http_url(self.image)

    def to_json(self) -> dict[str, object]:
        """A plain dict for ``products.jsonl`` (round-trips through :meth:`from_json`)."""
        return {
            "id": self.id,
            "title": self.title,
            "url": self.url,
            "image": self.image,
            "price": self.price,
            "currency": self.currency,
            "category": self.category,
            "colour": self.colour,
            "gender": self.gender,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Product:
        """Rebuild a product written by :meth:`to_json`; ``ValueError`` if it is malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a product must be a JSON object, got {type(data).__name__}")
        try:
            strings = {name: data[name] for name in REQUIRED}
        except KeyError as exc:
            raise ValueError(f"product JSON lacks {exc.args[0]!r}: {_preview(data)}") from None
        optional = {name: data.get(name) for name in ("currency", "category", "colour", "gender")}
        price = data.get("price")
        extra = data.get("extra") or {}
        bad = [k for k, v in strings.items() if not isinstance(v, str) or not v]
        bad += [k for k, v in optional.items() if v is not None and not isinstance(v, str)]
        if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float))):
            bad.append("price")
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            bad.append("extra")
        if bad:
            raise ValueError(f"product JSON has malformed {', '.join(bad)}: {_preview(data)}")
        return cls(
            **strings,  # type: ignore[arg-type]
            price=None if price is None else float(price),  # type: ignore[arg-type]
            **optional,  # type: ignore[arg-type]
            extra=dict(extra),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Problem:
    """Why one row (``line`` in the file, 1-based) or its image was skipped."""

    line: int
    product_id: str | None
    reason: str

    def __str__(self) -> str:
        who = f" (id {self.product_id})" if self.product_id else ""
        return f"line {self.line}{who}: {self.reason}"


@dataclass(frozen=True)
class CatalogReadResult:
    """Usable products in file order, the file line of each, and the rows that were skipped."""

    products: list[Product]
    problems: list[Problem]
    lines: list[int]
    path: Path


class RowError(ValueError):
    """A row cannot become a product; ``reason`` says why (internal to the reader)."""


def is_http_url(value: str) -> bool:
    """``http://host/...`` or ``https://host/...`` (the only remote images we fetch)."""
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def normalise_key(key: str) -> str:
    """``"Sub Category"`` -> ``"sub_category"``; ``"Color"`` -> ``"colour"``."""
    name = re.sub(r"[\s\-]+", "_", key.strip().lower())
    return ALIASES.get(name, name)


def read_catalog(path: str | os.PathLike[str], *, limit: int | None = None) -> CatalogReadResult:
    """Read and validate a ``.csv`` / ``.jsonl`` catalogue; stop after ``limit`` usable products.

    Raises :class:`CatalogError` when the file is missing, of unknown format, has no
    header / required columns, or yields no usable product.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(FORMATS))
        raise CatalogError(f"{path}: unknown catalogue format {path.suffix or '(no extension)'!r}; use one of {known}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalogue file not found") from None
    except IsADirectoryError:
        raise CatalogError(f"{path}: is a directory, not a catalogue file") from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalogue ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    rows = _csv_rows(text, path) if kind == "csv" else _jsonl_rows(text)
    base = Path(os.path.abspath(path.parent))

    products: list[Product] = []
    lines: list[int] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        if isinstance(row, RowError):
            problems.append(Problem(line, None, str(row)))
            continue
        try:
            product = product_from_row(row, base)
        except RowError as exc:
            problems.append(Problem(line, _row_id(row), str(exc)))
            continue
        if product.id in first_line:
            problems.append(Problem(line, product.id, f"duplicate id (first seen on line {first_line[product.id]}); kept the first"))
            continue
        first_line[product.id] = line
        products.append(product)
        lines.append(line)
        if limit is not None and len(products) >= limit:
            break
    if not products:
        raise CatalogError(no_usable_product(path, problems))
    return CatalogReadResult(products, problems, lines, path)


def no_usable_product(path: Path, problems: list[Problem]) -> str:
    """The message for a catalogue that yields nothing, with the first reasons."""
    if not problems:
        return f"{path}: the catalogue has no products"
    shown = "; ".join(str(p) for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{path}: no usable product; {len(problems)} row(s) skipped: {shown}{more}"


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, object] | RowError]]:
    """Yield ``(line, row dict)`` per CSV record; the line is where the record starts."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(f"{path}: the catalogue is empty") from None
    except csv.Error as exc:
        raise CatalogError(f"{path}: cannot read the CSV header ({exc})") from None
    keys = [normalise_key(h) for h in header]
    if _NOT_UTF8.search("".join(header)):
        raise CatalogError(f"{path}: the header is not UTF-8 text; save the file as UTF-8")
    dupes = sorted({k for k in keys if keys.count(k) > 1 and k})
    if dupes:
        raise CatalogError(f"{path}: duplicate column(s) {', '.join(dupes)} (note: 'color' is read as 'colour')")
    missing = [name for name in REQUIRED if name not in keys]
    if missing:
        raise CatalogError(f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(k for k in keys if k)}")
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, RowError(f"unreadable CSV record ({exc})")
            continue
        if not record or all(not v.strip() for v in record):
            continue  # blank line
        if len(record) > len(keys):
            yield start, RowError(f"row has {len(record)} fields but the header has {len(keys)} (an unquoted comma?)")
            continue
        yield start, {k: v for k, v in zip(keys, record, strict=False) if k}


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, object] | RowError]]:
    """Yield ``(line, row dict)`` per non-blank JSON Lines line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if _NOT_UTF8.search(line):
            yield number, RowError("line is not UTF-8 text")
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield number, RowError(f"not valid JSON ({exc.args[0] if exc.args else exc})")
            continue
        if not isinstance(obj, dict):
            yield number, RowError(f"expected a JSON object, got {type(obj).__name__}")
            continue
        row: dict[str, object] = {}
        for key, value in obj.items():
            name = normalise_key(str(key))
            if name in row:
                yield number, RowError(f"key {name!r} given twice ('color' is read as 'colour')")
                break
            row[name] = value
        else:
            yield number, row


def product_from_row(row: Mapping[str, object], base: Path) -> Product:
    """Validate one row (normalised keys) into a :class:`Product`; raise :class:`RowError`."""
    if any(isinstance(v, str) and _NOT_UTF8.search(v) for v in row.values()):
        raise RowError("row is not UTF-8 text; save the file as UTF-8")
    pid = _text(row, "id")
    if pid is None:
        raise RowError("missing id")
    if len(pid) > MAX_ID_LENGTH or _CONTROL.search(pid):
        raise RowError(f"id must be at most {MAX_ID_LENGTH} printable characters")
    title = _text(row, "title")
    if title is None:
        raise RowError("missing title")
    url = _text(row, "url")
    if url is None:
        raise RowError("missing url")
    if not is_http_url(url):
        raise RowError(f"url must be an http(s) link, got {url[:80]!r}")
    image = _text(row, "image")
    if image is None:
        raise RowError("missing image")
    currency = _text(row, "currency")
    if currency is not None:
        currency = currency.upper()
        if not _CURRENCY.match(currency):
            raise RowError(f"currency must be a 3-letter code such as EUR, got {currency[:20]!r}")
    extra = {k: v for k, v in ((k, _text(row, k)) for k in row if k not in REQUIRED and k not in OPTIONAL) if v is not None}
    return Product(
        id=pid,
        title=title,
        url=url,
        image=_resolve_image(image, base),
        price=_price(row.get("price")),
        currency=currency,
        category=_text(row, "category"),
        colour=_text(row, "colour"),
        gender=_text(row, "gender"),
        extra=extra,
    )


def _text(row: Mapping[str, object], key: str) -> str | None:
    """A field as stripped text (JSON numbers and structures as their JSON); blank -> None."""
    value = row.get(key)
    if value is None:
        return None
    if key == "id" and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise RowError(f"id must be text or a whole number, got {json.dumps(value)[:40]}")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.strip()
    return text or None


def _price(value: object) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"bad price {json.dumps(value)[:40]}: expected a number such as 19.99")
    try:
        price = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise RowError(f"bad price {str(value)[:40]!r}: expected a number such as 19.99") from None
    if not math.isfinite(price) or price < 0:
        raise RowError(f"bad price {str(value)[:40]!r}: must be a finite number >= 0")
    return price


def _resolve_image(value: str, base: Path) -> str:
    """http(s) URLs stay; anything else is a local path, made absolute against the catalogue folder."""
    if is_http_url(value):
        return value
    scheme = urlsplit(value).scheme
    if "://" in value or (scheme and len(scheme) > 1):
        raise RowError(f"image must be an http(s) URL or a local path, got {value[:80]!r}")
    return os.path.abspath(base / value)


def _row_id(row: Mapping[str, object]) -> str | None:
    """The row's id for a problem report, if it has a usable one."""
    try:
        pid = _text(row, "id")
    except RowError:
        return None
    return pid[:MAX_ID_LENGTH] if pid else None


def _preview(data: object) -> str:
    return json.dumps(data, default=str)[:120]
