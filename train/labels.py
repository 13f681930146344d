"""Multi-label targets from catalogue attributes, and the study's metric (micro-F1).

The study fine-tuned MobileNetV2 to predict a product's attributes at once
(type, colour, gender, ...): each ``attribute=value`` pair seen often enough in the
training split is one label, and a product has one positive per attribute it carries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: Attributes of ``products.csv`` used as labels (``category`` .. ``gender`` are Product fields,
#: the rest come from ``Product.extra``).
DEFAULT_ATTRIBUTES = ("category", "sub_category", "colour", "gender", "usage")


class Labelled(Protocol):
    """What a product must offer (``ffengine.catalog.Product`` does)."""

    @property
    def extra(self) -> dict[str, str]: ...


def attribute_value(product: Labelled, attribute: str) -> str | None:
    """The product's value for ``attribute`` (a field or an ``extra`` column); blank counts as missing."""
    value = getattr(product, attribute, None)
    if value is None:
        value = product.extra.get(attribute)
    value = str(value).strip() if value is not None else ""
    return value or None


@dataclass(frozen=True)
class LabelSet:
    """An ordered vocabulary of ``attribute=value`` labels."""

    names: tuple[str, ...]

    @classmethod
    def fit(cls, products: Iterable[Labelled], attributes: Sequence[str] = DEFAULT_ATTRIBUTES, min_count: int = 10) -> LabelSet:
        """Every ``attribute=value`` seen at least ``min_count`` times, in a stable order."""
        counts = Counter(f"{a}={v}" for p in products for a in attributes if (v := attribute_value(p, a)) is not None)
        return cls(tuple(sorted(name for name, n in counts.items() if n >= min_count)))

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, products: Sequence[Labelled]) -> np.ndarray:
        """``(n, L)`` float32 multi-hot targets (labels outside the vocabulary are ignored)."""
        position = {name: i for i, name in enumerate(self.names)}
        attributes = sorted({name.split("=", 1)[0] for name in self.names})
        out = np.zeros((len(products), len(self.names)), dtype=np.float32)
        for row, product in enumerate(products):
            for attribute in attributes:
                value = attribute_value(product, attribute)
                col = position.get(f"{attribute}={value}")
                if col is not None:
                    out[row, col] = 1.0
        return out


def micro_f1(targets: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> float:
    """Micro-averaged F1 over all (product, label) decisions; ``scores`` are probabilities."""
    predicted = scores >= threshold
    truth = targets >= 0.5
    tp = float(np.logical_and(predicted, truth).sum())
    fp = float(np.logical_and(predicted, ~truth).sum())
    fn = float(np.logical_and(~predicted, truth).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
