"""The garment-kind head: what kind of garment a picture shows, learned from shoppers' photos and product shots.

A store's own category prior (:mod:`ffengine.prior`) is fitted on product shots only, so it is
unsure of a dress on a bed. The kind head is trained on labelled shoppers' photos as well as on
the catalogue (whose categories are mapped to kinds by a table such as
``query_categories.csv``), on frozen backbone features; it then ships inside the weights file
(:func:`ffengine.weights.save_weights` with ``kind_head=``) and serves any store, since each
store's categories get their kind distribution from their own pictures at index build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ffengine.prior import LinearHead, fit_head

#: Kind of a product whose category no kind claims (bags, watches, ...): it is learned too, so that
#: a photo of a handbag does not pull towards the nearest garment.
OTHER_KIND = "other"
#: L2 penalty per weight; one shopper photo weighs as much as this many product shots (chosen on validation).
KIND_L2 = 1e-5
PHOTO_WEIGHT = 6.0


def catalogue_targets(categories: Sequence[str | None], kind_map: Mapping[str, frozenset[str]], kinds: Sequence[str]) -> np.ndarray:
    """``(n, K)`` kind distribution of each product: uniform over the kinds its category belongs to,
    else :data:`OTHER_KIND` (the last of ``kinds``)."""
    targets = np.zeros((len(categories), len(kinds)), np.float32)
    for i, category in enumerate(categories):
        for k, kind in enumerate(kinds[:-1]):
            if category and category in kind_map.get(kind, ()):
                targets[i, k] = 1.0
    targets[targets.sum(axis=1) == 0, -1] = 1.0
    return targets / targets.sum(axis=1, keepdims=True)


def fit_kind_head(
    catalogue: np.ndarray,
    categories: Sequence[str | None],
    kind_map: Mapping[str, frozenset[str]],
    photos: np.ndarray,
    photo_labels: Sequence[str],
    *,
    l2: float = KIND_L2,
    photo_weight: float = PHOTO_WEIGHT,
) -> LinearHead:
    """Fit the head on ``catalogue (n, D)`` features with their categories and ``photos (m, D)`` with their kinds.

    ``kind_map`` maps each kind (a shopper-photo label) to the catalogue categories that are that kind.
    """
    kinds = [*sorted(kind_map), OTHER_KIND]
    unknown = sorted(set(photo_labels) - set(kind_map))
    if unknown:
        raise ValueError(f"photo labels without a kind mapping: {', '.join(unknown)}")
    photo_targets = np.eye(len(kinds), dtype=np.float32)[[kinds.index(label) for label in photo_labels]]
    feats = np.concatenate([catalogue, photos]).astype(np.float32)
    targets = np.concatenate([catalogue_targets(categories, kind_map, kinds), photo_targets])
    weights = np.concatenate([np.ones(len(catalogue), np.float32), np.full(len(photos), photo_weight, np.float32)])
    return fit_head(feats, targets, kinds, l2=l2, sample_weight=weights, max_iter=80)
