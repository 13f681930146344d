"""Photo -> the k most similar products, nearest first, without duplicates, optionally filtered.

Catalogues list the same picture under several product ids (re-listings, colour
variants photographed once). Showing a shopper five copies of one picture is
useless, so results whose image reference or backbone features are identical
collapse into the first (nearest) one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ffengine.catalog import Product
from ffengine.errors import IndexLoadError
from ffengine.images import ImageSource, load_image
from ffengine.index import Index, as_features, model_mismatch
from ffengine.items import COLOUR_WEIGHT, Item, colour_histogram, colour_match, find_items, with_margin

if TYPE_CHECKING:  # torch is only needed once a photo is embedded
    from ffengine.embedder import Embedder

#: Searched vectors closer than this (relative to their length) count as the same picture.
DUPLICATE_TOLERANCE = 1e-4
#: Candidates the index's shortlist gives the prior ranking (its bound on everything else).
PRIOR_SHORTLIST = 400
#: With a filter that keeps less than this share of the catalogue, search its rows exactly instead of over-fetching.
SUBSET_SHARE = 0.25
#: Candidates an item search takes from its category by the features alone, before colour re-ranks them.
ITEM_SHORTLIST = 200
#: An item's search widens from its category to the category's family (``sub_category``) below this many products.
MIN_ITEM_PRODUCTS = 20
#: The catalogue column that names a category's family, where a store has one.
FAMILY_FIELD = "sub_category"

Filters = Mapping[str, str | Collection[str]]
#: Product fields a caller may filter on; a catalogue's extra columns (e.g. ``master_category``) work too.
FILTER_FIELDS = ("category", "gender", "colour", "currency")
#: Fields read for every product in one pass, the first time a filter, an item search or an id needs one.
TABLE_FIELDS = (*FILTER_FIELDS, FAMILY_FIELD)


@dataclass(frozen=True)
class PriorRamp:
    """How much of the priors a photo gets, from how close its best match is (the cosine distance of the
    searched vectors): none up to ``none_until`` (a copy of a catalogue picture, as a screenshot is: its own
    product comes first, whatever the priors think of its kind), all from ``full_from`` on (a shopper's own
    photo, like no picture: the priors decide between what looks alike), in proportion between.
    ``bench/identity.py`` measures both kinds of photo; the defaults lie between them."""

    none_until: float = 0.17
    full_from: float = 0.24

    def __call__(self, nearest: np.ndarray) -> np.ndarray:
        """``(m,)`` cosine distance of each photo's nearest picture -> ``(m,)`` weight of its priors, 0..1."""
        return np.clip((nearest - self.none_until) / max(self.full_from - self.none_until, 1e-9), 0.0, 1.0)


@dataclass(frozen=True)
class Recommendation:
    """One suggested product: its distance to the query (lower = more similar) and 1-based rank."""

    product: Product
    distance: float
    rank: int


def normalise_filters(filters: Filters | None) -> dict[str, frozenset[str]]:
    """``{"category": "Shirts", "gender": ["Men", "Unisex"]}`` -> case-folded sets of accepted values."""
    out: dict[str, frozenset[str]] = {}
    for name, value in (filters or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"filter names must be non-empty strings, got {name!r}")
        values = [value] if isinstance(value, str) or not isinstance(value, Collection) else list(value)
        if not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"filter {name!r} needs a string or a non-empty list of strings, got {value!r}")
        out[name] = frozenset(v.strip().casefold() for v in values)
    return out


def folded(value: str | None) -> str:
    """A field's value as filters compare it: stripped and case-folded, "" for none."""
    return (value or "").strip().casefold()


@dataclass(frozen=True)
class Column:
    """One field of every product: ``codes (n,) int32`` into ``values``, its distinct values as the catalogue has them."""

    codes: np.ndarray
    values: list[str | None]

    @classmethod
    def of(cls, raw: Iterable[str | None]) -> Column:
        seen: dict[str | None, int] = {}
        codes = np.fromiter((seen.setdefault(value, len(seen)) for value in raw), dtype=np.int32)
        return cls(codes, list(seen))

    def matches(self, wanted: Collection[str]) -> np.ndarray:
        """``(n,)`` bool: the products whose value, case-folded, is one of ``wanted``."""
        return np.isin(self.codes, [code for code, value in enumerate(self.values) if folded(value) in wanted])


@dataclass(frozen=True)
class SearchPlan:
    """How to search under a filter: exactly over its rows when it is narrow, else over-fetch and drop."""

    rows: np.ndarray | None  # search only these rows (a narrow filter)
    mask: np.ndarray | None  # drop candidates outside this mask (a broad filter)
    limit: int  # most candidates there are
    fetch: int  # candidates asked for first

    @classmethod
    def make(cls, n: int, allowed: np.ndarray | None, k: int) -> SearchPlan:
        if allowed is None:
            return cls(None, None, n, min(k * 2 + 8, n))
        rows = np.flatnonzero(allowed)
        if len(rows) < SUBSET_SHARE * n:
            return cls(rows, None, len(rows), min(k * 2 + 8, len(rows)))
        return cls(None, allowed, n, min(k * 8 + 16, n))


@dataclass(frozen=True)
class PhotoAnswer:
    """A shopper's photo answered: its ``(1280,)`` features, the products, and the items it shows (most likely first)."""

    features: np.ndarray
    recommendations: list[Recommendation]
    items: list[Item]


class Recommender:
    """Embedder + index made by the same model; refuses a pair that does not match."""

    def __init__(self, embedder: Embedder, index: Index, ramp: PriorRamp | None = PriorRamp()) -> None:
        """``ramp``: the priors' weight by the best match's distance (:class:`PriorRamp`; ``None``: always all of it)."""
        if embedder.fingerprint != index.fingerprint:
            where = str(index.path or "(in memory)")
            raise IndexLoadError(model_mismatch(where, index.fingerprint, index.manifest.get("preprocess"), embedder.fingerprint))
        if embedder.dim != index.dim:
            raise IndexLoadError(f"the index holds {index.dim}-d features but the model makes {embedder.dim}-d ones")
        self.embedder = embedder
        self.index = index
        self.ramp = ramp
        self._group_rows = index.priors.group_rows() if index.priors is not None else []
        self._masks: dict[tuple[tuple[str, frozenset[str]], ...], np.ndarray] = {}
        self._families: dict[str, str] | None = None

    def recommend(self, image: Image.Image | ImageSource, k: int = 5, filters: Filters | None = None) -> list[Recommendation]:
        """One picture (PIL image, bytes or path) -> up to ``k`` recommendations.

        CPU/GPU-bound: call it from a worker thread in async code. Raises ``ImageRejected`` on bad input.
        """
        img = image if isinstance(image, Image.Image) else load_image(image)
        return self.recommend_features(self.embedder.embed([img]), k, filters)[0]

    def recommend_features(self, feats: np.ndarray, k: int = 5, filters: Filters | None = None) -> list[list[Recommendation]]:
        """``(m, 1280)`` backbone features -> for each row, up to ``k`` recommendations, nearest first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        feats = as_features(feats, self.index.dim, "query features")
        wanted = normalise_filters(filters)
        allowed = self.filter_mask(wanted) if wanted else None
        plan = SearchPlan.make(len(self.index), allowed, k)
        if plan.limit == 0:
            return [[] for _ in feats]
        if self.index.priors is not None:
            bonus = self.index.priors.bonus(feats)  # (m, G)
            near = self.index.search(feats, min(PRIOR_SHORTLIST, len(self.index)))  # one batched search, the bound's source
            if self.ramp is not None:  # a copy of a catalogue picture: its own product first (identity before kind)
                bonus = bonus * self.ramp(0.5 * near[0][:, 0].astype(np.float64) ** 2)[:, None].astype(np.float32)
            return [self.ranked(feats[i], bonus[i], (near[0][i], near[1][i]), k, plan) for i in range(len(feats))]
        dist, idx = self.candidates(feats, plan.fetch, plan)  # one batched search for every query
        out = []
        for i, q in enumerate(feats):
            picked, fetch = self.collapse(dist[i], idx[i], k, plan.mask), plan.fetch
            while len(picked) < k and fetch < plan.limit:  # duplicates or filtered rows ate the candidates
                fetch = min(fetch * 4, plan.limit)
                d, ix = self.candidates(q[None, :], fetch, plan)
                picked = self.collapse(d[0], ix[0], k, plan.mask)
            out.append(picked)
        return out

    def answer_photos(self, images: Sequence[Image.Image], k: int = 5, filters: Filters | None = None) -> list[PhotoAnswer]:
        """Pictures -> for each, ``k`` products for the whole photo and its likely items (blocking model work)."""
        head = self.index.priors.category_head if self.index.priors is not None else None
        if head is None:  # no items to find: the maps are not needed
            feats = self.embedder.embed(images)
            return [PhotoAnswer(f, r, []) for f, r in zip(feats, self.recommend_features(feats, k, filters), strict=True)]
        feats, maps = self.embedder.embed_with_maps(images)
        recs = self.recommend_features(feats, k, filters)
        proba = head.proba(feats)
        return [
            PhotoAnswer(feats[i], recs[i], find_items(head, proba[i], maps[i], *img.size)) for i, img in enumerate(images)
        ]

    def recommend_item(self, image: Image.Image, item: Item, k: int = 5) -> tuple[np.ndarray, list[Recommendation]]:
        """The crop of ``item`` -> its ``(1280,)`` features and ``k`` products of its category (or family),
        ranked by features and colour. ``ValueError`` when the index has no such category."""
        rows = self.item_rows(item.category, k)
        crop = image.crop(with_margin(item.box, *image.size))
        pixels = self.embedder.prepare([crop])
        feats = self.embedder.embed_arrays(pixels)
        return feats[0], self.ranked_by_colour(feats, colour_histogram(pixels[0]), rows, k)

    def more_like(self, product_id: str, k: int = 5) -> tuple[np.ndarray, list[Recommendation]]:
        """A catalogue product as the query: its ``(1280,)`` features and ``k`` others like it, never itself
        or a copy of its picture. ``KeyError`` when the index does not hold ``product_id``."""
        row = self.row_by_id[product_id]
        feats = np.asarray(self.index.features[row : row + 1], dtype=np.float32)  # float16 in a written index
        recs = self.recommend_features(feats, k + 1 + 4, None)[0]  # room for the product and copies of it
        others = [r for r in recs if not same_picture_as_any(self.row_by_id[r.product.id], [row], self.index.products, self.index.vectors)]
        return feats[0], [Recommendation(r.product, r.distance, rank) for rank, r in enumerate(others[:k], 1)]

    @cached_property
    def _table(self) -> tuple[dict[str, Column], dict[str, int]]:
        """The :data:`TABLE_FIELDS` columns and the rows by product id, from one pass over the products (an
        index reads its products on access, and at a million products that pass is what costs)."""
        raw: dict[str, list[str | None]] = {name: [] for name in TABLE_FIELDS}
        by_id: dict[str, int] = {}
        for row, product in enumerate(self.index.products):
            by_id[product.id] = row
            for name in FILTER_FIELDS:
                raw[name].append(getattr(product, name))
            raw[FAMILY_FIELD].append(product.extra.get(FAMILY_FIELD))
        return {name: Column.of(values) for name, values in raw.items()}, by_id

    @property
    def row_by_id(self) -> dict[str, int]:
        """Product id -> index row."""
        return self._table[1]

    def column(self, name: str) -> Column:
        """Every product's ``name``: a filter field or a catalogue column (kept once some product has it)."""
        columns = self._table[0]
        column = columns.get(name) or Column.of(p.extra.get(name) for p in self.index.products)
        return column if column.values == [None] else columns.setdefault(name, column)

    def item_rows(self, category: str, k: int) -> np.ndarray:
        """Rows an item of ``category`` is searched in: the category's, or its family's where the category is small."""
        rows = np.flatnonzero(self.filter_mask({"category": frozenset([category.strip().casefold()])}))
        if len(rows) == 0:
            raise ValueError(f"this catalogue has no products in category {category!r}")
        family = self.family_of(category)
        if len(rows) < max(MIN_ITEM_PRODUCTS, k) and family:
            rows = np.flatnonzero(self.filter_mask({FAMILY_FIELD: frozenset([family])}))
        return rows

    def family_of(self, category: str) -> str:
        """The family (:data:`FAMILY_FIELD`, case-folded) most of ``category``'s products have; "" without one."""
        if self._families is None:
            categories, families = self.column("category"), self.column(FAMILY_FIELD)
            votes: dict[str, Counter[str]] = {}
            for (cat, family), count in Counter(zip(categories.codes.tolist(), families.codes.tolist(), strict=True)).items():
                votes.setdefault(folded(categories.values[cat]), Counter())[folded(families.values[family])] += count
            self._families = {cat: count.most_common(1)[0][0] for cat, count in votes.items()}
        return self._families.get(category.strip().casefold(), "")

    def ranked_by_colour(self, feats: np.ndarray, colour: np.ndarray, rows: np.ndarray, k: int) -> list[Recommendation]:
        """``k`` of ``rows`` by cosine similarity plus :data:`COLOUR_WEIGHT` times the colour match, duplicates
        collapsed: the :data:`ITEM_SHORTLIST` most similar by features, re-ranked with their colours."""
        dist, idx = self.index.search_rows(feats, rows, ITEM_SHORTLIST)
        score = -0.5 * dist[0].astype(np.float64) ** 2
        priors = self.index.priors
        if priors is not None and priors.colours is not None:
            score -= COLOUR_WEIGHT * (1.0 - colour_match(colour, priors.colours[idx[0]]))  # a distance stays >= 0
        if priors is not None:
            score += priors.bonus(feats)[0][priors.product_group[idx[0]]]  # one category: the same for all; a family: not
        order = np.lexsort((idx[0], -score))
        return self.collapse((-score[order]).astype(np.float32), idx[0][order], k, None)

    def photo_classes(self, feats: np.ndarray, k: int = 3) -> list[dict[str, list[dict[str, object]]]]:
        """Each photo's most likely categories (and garment kinds), with probabilities; ``{}`` without priors."""
        priors = self.index.priors
        return priors.top_classes(as_features(feats, self.index.dim, "query features"), k) if priors else [{} for _ in feats]

    def ranked(self, q: np.ndarray, bonus: np.ndarray, near: tuple[np.ndarray, np.ndarray], k: int, plan: SearchPlan) -> list[Recommendation]:
        """Up to ``k`` products by similarity plus their group's prior bonus, duplicates collapsed.

        ``near``: the query's :data:`PRIOR_SHORTLIST` nearest rows ``(dist (s,), rows (s,))``, nearest first.
        """
        allowed = plan.mask if plan.rows is None else self._rows_mask(plan.rows)
        fetch = plan.fetch
        while True:
            dist, idx = self.prior_candidates(q, bonus, near, fetch, allowed)
            picked = self.collapse(dist, idx, k, None)
            if len(picked) >= k or fetch >= plan.limit:
                return picked
            fetch = min(fetch * 4, plan.limit)

    def prior_candidates(
        self, q: np.ndarray, bonus: np.ndarray, near: tuple[np.ndarray, np.ndarray], fetch: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``fetch`` best rows by ``-d^2/2 + bonus[group]``, as ``(ranking distance (c,), rows (c,))``, best first.

        ``near``, from the index's own shortlist, gives the :data:`PRIOR_SHORTLIST` most similar products, scored
        exactly; no product outside it is more similar than its last. A group is then searched in
        full only while that bound plus the group's bonus could still enter the ``fetch`` best,
        highest bonus first, so a confident prior costs one or two group searches and a flat one none.
        The ranking distance is ``d^2/2 - bonus``: for L2-normalised vectors, cosine distance minus the bonus.
        """
        group = self.index.priors.product_group  # type: ignore[union-attr]
        d, ix = near[0].astype(np.float64), near[1]
        floor = -0.5 * d[-1] ** 2 if len(ix) < len(self.index) else -np.inf
        keep = allowed[ix] if allowed is not None else np.ones(len(ix), bool)
        rows_found, scores_found = [ix[keep]], [-0.5 * d[keep] ** 2 + bonus[group[ix[keep]]]]
        threshold = fetch_best(scores_found, fetch)
        for g in np.argsort(-bonus, kind="stable"):
            if floor + bonus[g] < threshold:
                break  # groups come in falling bonus order: none after this one can make it either
            rows = self._group_rows[g] if allowed is None else self._group_rows[g][allowed[self._group_rows[g]]]
            if len(rows) == 0:
                continue
            dg, ig = self.index.search_rows(q[None, :], rows, fetch)
            rows_found.append(ig[0])
            scores_found.append(-0.5 * dg[0].astype(np.float64) ** 2 + float(bonus[g]))
            threshold = fetch_best(scores_found, fetch)
        rows, first = np.unique(np.concatenate(rows_found), return_index=True)  # a row found twice has one exact score
        scores = np.concatenate(scores_found)[first]
        order = np.lexsort((rows, -scores))[:fetch]
        return (-scores[order]).astype(np.float32), rows[order]

    def _rows_mask(self, rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(self.index), bool)
        mask[rows] = True
        return mask

    def candidates(self, feats: np.ndarray, fetch: int, plan: SearchPlan) -> tuple[np.ndarray, np.ndarray]:
        """``fetch`` nearest rows per query, ordered by (distance, row) so duplicates resolve the same way every time."""
        if plan.rows is not None:
            dist, idx = self.index.search_rows(feats, plan.rows, fetch)
        else:
            dist, idx = self.index.search(feats, fetch)
        order = np.lexsort((idx, dist), axis=1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

    def filter_mask(self, wanted: dict[str, frozenset[str]]) -> np.ndarray:
        """Boolean mask of the products that pass every filter (cached per filter)."""
        key = tuple(sorted(wanted.items(), key=lambda kv: kv[0]))
        mask = self._masks.get(key)
        if mask is None:
            mask = np.ones(len(self.index), bool)
            for name, values in wanted.items():
                column = self.column(name)
                if name not in FILTER_FIELDS and column.values == [None]:
                    raise ValueError(f"cannot filter on {name!r}: not one of {', '.join(FILTER_FIELDS)} nor a catalogue column")
                mask &= column.matches(values)
            if len(self._masks) >= 64:
                self._masks.clear()
            self._masks[key] = mask
        return mask

    def collapse(self, dist: np.ndarray, idx: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Recommendation]:
        """Walk candidates nearest-first; skip filtered-out rows and duplicates of kept ones."""
        products, feats = self.index.products, self.index.vectors  # the vectors: searching never reads the raw features
        kept: list[int] = []
        out: list[Recommendation] = []
        for d, row in zip(dist.tolist(), idx.tolist(), strict=True):
            if allowed is not None and not allowed[row]:
                continue
            product = products[row]  # read once: an index reads its products on access
            if kept and (any(r.product.image == product.image for r in out) or same_features_as_any(row, kept, feats)):
                continue
            kept.append(row)
            out.append(Recommendation(product, float(d), len(out) + 1))
            if len(out) == k:
                break
        return out


def same_picture_as_any(row: int, kept: list[int], products: Sequence[Product], feats: np.ndarray) -> bool:
    """Same image file as a kept row, or vectors within :data:`DUPLICATE_TOLERANCE` of one: copies of a picture."""
    image = products[row].image
    return any(products[other].image == image for other in kept) or same_features_as_any(row, kept, feats)


def same_features_as_any(row: int, kept: list[int], feats: np.ndarray) -> bool:
    """Vectors within :data:`DUPLICATE_TOLERANCE` of a kept row's (relative to its length)."""
    others = feats[kept].astype(np.float32)  # (len(kept), d): one vectorised comparison per candidate (float16 in an index)
    gaps = np.linalg.norm(others - feats[row], axis=1)
    return bool((gaps <= DUPLICATE_TOLERANCE * np.maximum(np.linalg.norm(others, axis=1), 1e-6)).any())


def fetch_best(scores: list[np.ndarray], fetch: int) -> float:
    """The ``fetch``-th best score found so far (``-inf`` while fewer are known): what a candidate must beat."""
    found = np.concatenate(scores)
    return float(np.partition(found, len(found) - fetch)[len(found) - fetch]) if len(found) >= fetch else -np.inf
