"""Read a store catalogue (CSV or JSON Lines) into validated :class:`Product` records.

Store exports are messy: a missing title, a price of ``"n/a"``, a duplicated id, a
relative image path. One bad row must not cost the other ten thousand, so every
row is checked on its own; a bad one becomes a :class:`Problem` (file line number
and reason) and the rest imports. Only a file that cannot be read at all, or one
with no usable product, is a :class:`~ffengine.errors.CatalogError`.

Columns (CSV header or JSON keys; case-insensitive, spaces and dashes read as ``_``):
``id, title, url, image`` are required columns (a row whose ``url`` is blank or unusable is kept
without a link); ``price, currency, category, colour``
(or ``color``), ``gender`` are optional; anything else lands in ``Product.extra``.
``image`` is an http(s) URL or a local path relative to the catalogue file.

A catalogue comes from outside, so what it points at is checked here, once for every entry
point: a local image must lie, after links are followed, in the catalogue's folder or a folder
that :data:`~ffengine.config.IMAGE_ROOTS` names (else any file on the machine could be indexed
and sent to shoppers as a product photo), and a product ``url`` that cannot be a link button
(:func:`link_problem`) is dropped with a warning, keeping the product.

What a product may hold is one set of field rules for the importer and the database
(:data:`FIELD_LIMITS`, from which the ``products`` columns take their widths): a row the importer
keeps is a row the bot can store when it starts or switches versions. A value too long for its
field, or holding control characters (PostgreSQL refuses a NUL byte in text), costs the row where
the product cannot do without it (:data:`ROW_FIELDS`: id, title, image, currency) and is cleared
with a warning elsewhere (category, colour, gender: the product still sells without them). In
free text (title, the extra columns) line breaks and tabs are kept and other control characters
become spaces, with a warning. See :func:`field_problem`.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import MappingProxyType
from urllib.parse import SplitResult, urlsplit

from ffengine.config import IMAGE_ROOTS, env_image_roots
from ffengine.errors import CatalogError

#: Catalogue formats by file extension.
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
REQUIRED = ("id", "title", "url", "image")
OPTIONAL = ("price", "currency", "category", "colour", "gender")
ALIASES = {"color": "colour"}
#: Longest accepted product id (ids travel in logs, URLs and the database).
MAX_ID_LENGTH = 200
#: Longest product link kept; Telegram refuses long button URLs, and one bad button fails the whole keyboard.
MAX_URL_LENGTH = 1000
#: Host suffixes reserved for local and private networks: never a shopper's link.
LOCAL_SUFFIXES = ("localhost", "local", "internal", "home.arpa")
#: The longest text each product field may hold, for the importer and the database alike: the
#: ``products`` columns take their widths from here (:mod:`ffengine.db.models`; the id's column is wider).
FIELD_LIMITS: Mapping[str, int] = MappingProxyType(
    {
        "id": MAX_ID_LENGTH,
        "title": 100_000,
        "url": MAX_URL_LENGTH,
        "image": 100_000,
        "category": 128,
        "colour": 64,
        "gender": 64,
        "currency": 8,
    }
)
#: Fields whose bad value costs the whole row; a bad value of any other field is cleared with a warning.
ROW_FIELDS = frozenset({"id", "title", "image", "currency"})
#: Fields of free text (besides the extra columns): line breaks and tabs are kept, other control characters
#: become spaces.
FREE_TEXT = frozenset({"title"})

NUL = "\x00"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Control characters that free text may not hold either (all but tab, line feed and carriage return).
_FREE_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
#: Lone surrogates are what ``errors="surrogateescape"`` makes of bytes that are not UTF-8.
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")


@dataclass(frozen=True)
class Product:
    """One catalogue item as the engine, the index and the bot see it.

    ``image`` is an http(s) URL or a local path, resolved at import (links followed) and
    checked to lie under the allowed folders; ``url`` is the product's page, ``None`` when
    the catalogue gave none a shopper could open; ``extra`` holds the catalogue's other
    columns (e.g. ``sub_category``) as text.
    """

    id: str
    title: str
    url: str | None
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
            strings = {name: data[name] for name in REQUIRED if name != "url"}
        except KeyError as exc:
            raise ValueError(f"product JSON lacks {exc.args[0]!r}: {_preview(data)}") from None
        optional = {name: data.get(name) for name in ("url", "currency", "category", "colour", "gender")}
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
    """Why one row (``line`` in the file, 1-based) or its image was skipped, or (a warning)
    what was dropped from a row that was kept."""

    line: int
    product_id: str | None
    reason: str

    def __str__(self) -> str:
        who = f" (id {self.product_id})" if self.product_id else ""
        return f"line {self.line}{who}: {self.reason}"


@dataclass(frozen=True)
class CatalogReadResult:
    """Usable products in file order, the file line of each, the rows that were skipped,
    and ``warnings`` about kept rows (a link that was dropped)."""

    products: list[Product]
    problems: list[Problem]
    lines: list[int]
    path: Path
    warnings: list[Problem] = field(default_factory=list)


class RowError(ValueError):
    """A row cannot become a product; ``reason`` says why (internal to the reader)."""


class UnsafeImagePath(PermissionError):
    """A local product photo whose path now leads elsewhere than when its catalogue was read."""


def _split(value: str) -> SplitResult | None:
    """``urlsplit(value)``, or ``None`` for text it cannot parse (an unclosed "[" of an IPv6 host)."""
    try:
        return urlsplit(value)
    except ValueError:
        return None


def is_http_url(value: str) -> bool:
    """``http://host/...`` or ``https://host/...`` (the only remote images we fetch); not one that cannot be parsed."""
    parts = _split(value)
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.netloc)


def is_public_address(address: IPv4Address | IPv6Address) -> bool:
    """Whether ``address`` is public unicast: not loopback, private, link-local, multicast,
    reserved or unspecified. An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4)
    is judged by that IPv4 address, which is where it leads."""
    if isinstance(address, IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_link_local or address.is_loopback)


def link_problem(url: str | None) -> str | None:
    """Why ``url`` cannot be a shopper's link, or ``None`` when it can.

    A link must be http(s), short, and lead to a public-looking host (a dotted name outside
    the local suffixes, or a public address): Telegram refuses other link buttons, and one
    refused button fails the whole rating keyboard.
    """
    if not url:
        return "no url"
    if len(url) > MAX_URL_LENGTH:
        return f"url is longer than {MAX_URL_LENGTH} characters"
    if _SPACE_OR_CONTROL.search(url):
        return "url contains spaces or control characters"
    if (parts := _split(url)) is None:
        return f"url cannot be parsed: {url[:80]!r}"
    if parts.scheme not in ("http", "https"):
        return f"url must be an http(s) link, got {url[:80]!r}"
    try:
        host = (parts.hostname or "").rstrip(".")
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return f"url has a malformed host or port: {url[:80]!r}"
    try:
        public = is_public_address(ip_address(host))
    except ValueError:  # a name
        public = "." in host and not (host in LOCAL_SUFFIXES or host.endswith(tuple(f".{s}" for s in LOCAL_SUFFIXES)))
    return None if public else f"url host {host!r} is not a public address"


def is_linkable_url(url: str | None) -> bool:
    """Whether ``url`` can be a link button for a shopper (see :func:`link_problem`)."""
    return link_problem(url) is None


def local_image_path(image: str) -> Path:
    """``image`` (a local :attr:`Product.image`) as a path, if it still resolves to itself.

    The reader stores each local image fully resolved, after checking that it lies under the
    allowed folders. A stored path that now resolves elsewhere had a link swapped in since (or
    comes from an index built before that check): following it could hand any file on the machine
    to a shopper, so :class:`UnsafeImagePath` is raised instead.
    """
    path = Path(image)
    try:
        unchanged = path.resolve() == path
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
        unchanged = False
    if not unchanged:
        raise UnsafeImagePath(errno.EACCES, "the path now leads elsewhere than when the catalogue was read; import it again", image)
    return path


def normalise_key(key: str) -> str:
    """``"Sub Category"`` -> ``"sub_category"``; ``"Color"`` -> ``"colour"``."""
    name = re.sub(r"[\s\-]+", "_", key.strip().lower())
    return ALIASES.get(name, name)


def read_catalog(
    path: str | os.PathLike[str], *, limit: int | None = None, image_roots: Sequence[str | os.PathLike[str]] | None = None
) -> CatalogReadResult:
    """Read and validate a ``.csv`` / ``.jsonl`` catalogue; stop after ``limit`` usable products.

    Local images must lie in the catalogue's folder or one of ``image_roots`` (default:
    :data:`~ffengine.config.IMAGE_ROOTS` from the environment; :class:`ConfigError` when it names
    something that is not a folder). Raises :class:`CatalogError` when the file is missing, of
    unknown format, has no header / required columns, or yields no usable product.
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
    extra_roots = env_image_roots() if image_roots is None else tuple(Path(r).resolve() for r in image_roots)
    roots = (path.parent.resolve(), *extra_roots)

    products: list[Product] = []
    lines: list[int] = []
    problems: list[Problem] = []
    warnings: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        if isinstance(row, RowError):
            problems.append(Problem(line, None, str(row)))
            continue
        try:
            product, notes = product_from_row(row, roots)
        except Exception as exc:  # noqa: BLE001 - whatever one row holds, it costs that row only
            problems.append(Problem(line, _row_id(row), row_error(exc)))
            continue
        if product.id in first_line:
            problems.append(Problem(line, product.id, f"duplicate id (first seen on line {first_line[product.id]}); kept the first"))
            continue
        first_line[product.id] = line
        products.append(product)
        lines.append(line)
        warnings.extend(Problem(line, product.id, note) for note in notes)
        if limit is not None and len(products) >= limit:
            break
    if not products:
        raise CatalogError(no_usable_product(path, problems))
    return CatalogReadResult(products, problems, lines, path, warnings)


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
        except RecursionError:
            yield number, RowError("not valid JSON (nested too deeply)")
            continue
        except Exception as exc:  # noqa: BLE001 - a line the parser chokes on costs that line only
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


def product_from_row(row: Mapping[str, object], roots: Sequence[Path]) -> tuple[Product, list[str]]:
    """Validate one row (normalised keys) into a :class:`Product`; raise :class:`RowError`.

    ``roots`` are the resolved folders local images may lie in, the catalogue's own first
    (relative paths start there). Also returns notes on what was dropped from the product.
    """
    if any(isinstance(v, str) and _NOT_UTF8.search(v) for v in row.values()):
        raise RowError("row is not UTF-8 text; save the file as UTF-8")
    notes: list[str] = []
    pid = _field(row, "id", notes)
    if pid is None:
        raise RowError("missing id")
    title = _field(row, "title", notes)
    if title is None:
        raise RowError("missing title")
    url = _text(row, "url")
    if (unlinkable := link_problem(url)) is not None:
        notes.append(f"{unlinkable}; imported without a link")
        url = None
    image = _field(row, "image", notes)
    if image is None:
        raise RowError("missing image")
    image = _resolve_image(image, roots)
    if (too_long := field_problem("image", image)) is not None:  # the resolved path is what is stored
        raise RowError(too_long)
    currency = _field(row, "currency", notes)
    if currency is not None:
        currency = currency.upper()
        if not _CURRENCY.match(currency):
            raise RowError(f"currency must be a 3-letter code such as EUR, got {currency[:20]!r}")
    extra_keys = [k for k in row if k not in REQUIRED and k not in OPTIONAL]
    extra = {k: v for k, v in ((k, _field(row, k, notes)) for k in extra_keys) if v is not None}
    product = Product(
        id=pid,
        title=title,
        url=url,
        image=image,
        price=_price(row.get("price")),
        currency=currency,
        category=_field(row, "category", notes),
        colour=_field(row, "colour", notes),
        gender=_field(row, "gender", notes),
        extra=extra,
    )
    return product, notes


def field_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot be the product field ``name`` (longer than :data:`FIELD_LIMITS` allows, or holding
    control characters), or ``None``. Free text (:data:`FREE_TEXT`, the extra columns) may hold line breaks and tabs."""
    limit = FIELD_LIMITS.get(name)
    if limit is not None and len(value) > limit:
        return f"{name} is longer than {limit} characters ({len(value)})"
    found = (_FREE_TEXT_CONTROL if _is_free_text(name) else _CONTROL).search(value)
    if found is None:
        return None
    what = "a NUL byte" if NUL in value else f"the control character {found.group()!r}"
    return f"{name} contains {what}"


def product_problems(product: Product) -> list[str]:
    """What in a built ``product`` breaks the field rules: none for one this reader made, but an index
    written by an older importer (or by hand) may hold such products, which the database then refuses."""
    values = {**{name: getattr(product, name) for name in FIELD_LIMITS}, **product.extra}
    found = (field_problem(name, value) for name, value in values.items() if isinstance(value, str))
    return [problem for problem in found if problem is not None]


def row_error(exc: Exception) -> str:
    """The reason a row was skipped: a :class:`RowError` says it; anything else is named with its type."""
    if isinstance(exc, RowError):
        return str(exc)
    return f"cannot read the row ({type(exc).__name__}: {str(exc)[:120]})"


def _is_free_text(name: str) -> bool:
    return name in FREE_TEXT or name not in FIELD_LIMITS


def _field(row: Mapping[str, object], key: str, notes: list[str]) -> str | None:
    """:func:`_text` held to the field rules (:func:`field_problem`): free text with control characters has them
    made spaces; any other bad value raises :class:`RowError` in a :data:`ROW_FIELDS` field and is cleared elsewhere.
    ``notes`` gets a line for each value changed or cleared."""
    value = _text(row, key)
    if value is None or (problem := field_problem(key, value)) is None:
        return value
    if _is_free_text(key) and len(value) <= FIELD_LIMITS.get(key, len(value)):  # only control characters
        notes.append(f"{problem}; replaced by spaces")
        return _FREE_TEXT_CONTROL.sub(" ", value).strip() or None
    if key in ROW_FIELDS:
        raise RowError(problem)
    notes.append(f"{problem}; imported without it")
    return None


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


def _resolve_image(value: str, roots: Sequence[Path]) -> str:
    """http(s) URLs stay; anything else is a local path, resolved against the catalogue folder
    (``roots[0]``) with links followed, and refused unless it lies under one of ``roots``."""
    if is_http_url(value):
        return value
    parts = _split(value)  # "//[host" is no path either, but has no scheme
    if "://" in value or (parts is not None and len(parts.scheme) > 1):  # a one-letter "scheme" is a Windows drive
        raise RowError(f"image must be an http(s) URL or a local path, got {value[:80]!r}")
    try:
        path = (roots[0] / value).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
        raise RowError(f"image path {value[:80]!r} cannot be resolved ({exc})") from None
    if not any(path.is_relative_to(root) for root in roots):
        raise RowError(f"image {value[:80]!r} leads outside the catalogue folder ({str(path)[:120]}); to allow it, add its folder to {IMAGE_ROOTS}")
    return str(path)


def _row_id(row: Mapping[str, object]) -> str | None:
    """The row's id for a problem report, if it has a usable one."""
    try:
        pid = _text(row, "id")
    except Exception:  # noqa: BLE001 - a report names what it can
        return None
    return pid[:MAX_ID_LENGTH] if pid and not _CONTROL.search(pid) else None


def _preview(data: object) -> str:
    return json.dumps(data, default=str)[:120]
