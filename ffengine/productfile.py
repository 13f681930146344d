"""An index's products, read from its ``products.jsonl`` a line at a time, when asked for.

Parsing every line of a large catalogue into a :class:`Product` takes longer than the rest of loading an
index and holds a small object per product, while a search shows five. So the file's line starts are found
once, and a line is read (``os.pread``: through the page cache that replicas on one host share, without
mapping the file into the process, where the kernel would map its neighbours in too) and becomes a
product when it is asked for. Whole columns (a filter's field, the ids) are read by the callers that need
them, once, and kept there.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np

from ffengine.catalog import Product

#: The fields of a :class:`Product`: a line holding exactly these is made a product without its ``__init__``.
PRODUCT_FIELDS = frozenset(f.name for f in dataclasses.fields(Product))
#: Bytes of the file read at a time to find its line ends.
SCAN_BYTES = 1 << 26
#: Lines parsed together when the whole file is read (one ``json.loads`` per chunk).
PARSE_LINES = 20_000


class ProductLineError(ValueError):
    """A line of the file is not a product; ``line`` is its 1-based number."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line} {why}")
        self.line = line


def line_starts(fh: BinaryIO) -> np.ndarray:
    """``(n + 1,)`` int64: where each of the ``n`` newline-terminated lines of ``fh`` starts, then its end. Read
    in blocks rather than through the map, so that the pages of lines nobody asks for are not mapped in."""
    ends, at = [], 0
    while block := fh.read(SCAN_BYTES):
        ends.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + at + 1)
        at += len(block)
    starts = np.concatenate([np.zeros(1, np.int64), *ends]).astype(np.int64)
    return starts if starts[-1] == at else np.append(starts, at)  # a last line without its newline


def as_product(row: Any, line: int) -> Product:
    """A parsed line as a product. One with every field (as :meth:`Product.to_json` writes) is made by filling
    its ``__dict__`` (a third of the time of ``Product(**row)``); others (older files) go through ``__init__``."""
    if type(row) is dict and row.keys() == PRODUCT_FIELDS:
        product = object.__new__(Product)
        product.__dict__.update(row)
        return product
    try:
        return Product(**row)
    except TypeError as exc:  # not an object, or not a product's fields
        raise ProductLineError(line, f"is not a product ({exc})") from None


class ProductFile(Sequence[Product]):
    """The products of a ``products.jsonl`` (one :meth:`Product.to_json` a line, row order), read on access.

    Not validated field by field (:meth:`Product.from_json`): the index manifest's sha256 vouches that this is
    the file ``write_index`` wrote from validated products. The first line is parsed at opening, so a file of
    another kind is refused there; :class:`ProductLineError` names any other line that is not a product.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("rb")  # closed with this object
        self._starts = line_starts(self._file)
        if len(self):
            self[0]

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, i: int) -> Product: ...
    @overload
    def __getitem__(self, i: slice) -> list[Product]: ...
    def __getitem__(self, i: int | slice) -> Product | list[Product]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = operator.index(i)
        row = row + len(self) if row < 0 else row
        if not 0 <= row < len(self):
            raise IndexError(f"product row {i} out of range for {len(self)} products")
        return as_product(self._parse(self._starts[row], self._starts[row + 1], row + 1), row + 1)

    def __iter__(self) -> Iterator[Product]:
        """Every product in row order, a chunk of lines per parse, the garbage collector off meanwhile
        (a million new objects would set off full collections for nothing)."""
        for start in range(0, len(self), PARSE_LINES):
            stop = min(start + PARSE_LINES, len(self))
            enabled = gc.isenabled()
            gc.disable()
            try:
                rows = self._parse(self._starts[start], self._starts[stop], start + 1, many=True)
                chunk = [as_product(row, start + n) for n, row in enumerate(rows, 1)]
            finally:
                if enabled:
                    gc.enable()
            yield from chunk

    def _parse(self, begin: int, end: int, line: int, *, many: bool = False) -> Any:
        text = os.pread(self._file.fileno(), int(end - begin), int(begin)).decode("utf-8").rstrip("\n")
        try:
            return json.loads("[" + text.replace("\n", ",\n") + "]") if many else json.loads(text)
        except ValueError as exc:  # line numbers of one parse of many lines are kept by the ",\n" joins
            raise ProductLineError(line + getattr(exc, "lineno", 1) - 1, "is not JSON") from None
