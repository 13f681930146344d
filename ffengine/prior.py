"""Category priors: rank by what kind of garment a photo shows, not only by how it looks.

Nearest neighbours in feature space follow colour and pattern, so a patterned dress gets
patterned socks. A prior adds ``weight * log P(product's group | photo)`` to the similarity,
where a product's *group* is its catalogue ``category`` (or, without one, the garment kind the
model predicts for its picture). Two sources of ``P``, summed when both are present:

* the **category prior**: a softmax regression on the catalogue's own features and ``category``
  column, fitted at index build (any store has this column; no shopper photo is needed);
* the **kind prior**: a garment-kind head shipped with fine-tuned weights (``train finetune``),
  trained on shoppers' photos as well as product shots, so it knows what a dress on a bed looks
  like. Its classes are not the store's: each group gets the mean kind distribution of its
  products' pictures, so the head serves any store.

Heads read L2-normalised backbone features. Everything is plain arrays + JSON (never pickle).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


#: ``P`` below this counts as this (keeps ``log`` finite for groups a head never predicts).
PROB_FLOOR = 1e-6
#: Group of products without a category (and no kind head to guess one).
NO_GROUP = ""
#: Catalogue categories with fewer pictures than this share one class of the category prior (a
#: category seen once cannot be told from noise; pooling 2..10 made no difference on validation).
MIN_CLASS_COUNT = 2
#: Class that pools the rare categories.
RARE_CLASS = "(rare)"
#: Strength of each prior in the ranking, chosen on train + validation photos (bench/quality.py); the
#: category term stays small beside a kind head, where it still tells a bag from a watch ("other" to the head).
CATEGORY_WEIGHT = 0.02
KIND_WEIGHT = 0.5
#: L2 penalty of the category prior's softmax regression, per feature weight (chosen with the weights).
CATEGORY_L2 = 1e-4
#: L-BFGS steps of the category prior: stopping early regularises it (and keeps the build fast).
CATEGORY_ITERATIONS = 20
#: Share of the catalogue held out to report the category prior's accuracy.
HOLDOUT_SHARE = 0.1


def l2_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class LinearHead:
    """Softmax classifier on L2-normalised features: ``(m, D)`` -> ``(m, C)`` log-probabilities."""

    classes: tuple[str, ...]
    weight: np.ndarray  # (D, C) float32
    bias: np.ndarray  # (C,) float32

    def __post_init__(self) -> None:
        weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[1],) or weight.shape[1] != len(self.classes) or not self.classes:
            raise ValueError(f"a head needs weight (D, C), bias (C,) and C class names; got {weight.shape}, {bias.shape}, {len(self.classes)}")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ValueError("head weights contain NaN or infinity")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    def log_proba(self, feats: np.ndarray) -> np.ndarray:
        z = l2_rows(feats) @ self.weight + self.bias
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def proba(self, feats: np.ndarray) -> np.ndarray:
        return np.exp(self.log_proba(feats))


def fit_head(
    feats: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    *,
    l2: float,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 60,
) -> LinearHead:
    """Softmax regression by L-BFGS: ``feats (n, D)``, ``targets`` class ids ``(n,)`` or distributions ``(n, C)``.

    Soft targets let a product count for several classes (a sweater is both "longsleeve" and
    "outwear"); ``sample_weight`` lets a few shopper photos weigh as much as many product shots.
    """
    import torch  # the engine's runtime does not need torch; fitting does

    x = torch.from_numpy(l2_rows(feats))
    c = len(classes)
    t = torch.from_numpy(np.asarray(targets))
    t = torch.nn.functional.one_hot(t.long(), c).float() if t.ndim == 1 else t.float()
    sw = torch.ones(len(x)) if sample_weight is None else torch.from_numpy(np.asarray(sample_weight, np.float32))
    w = torch.zeros(x.shape[1], c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = -(t * torch.log_softmax(x @ w + b, dim=1)).sum(1)
        loss = (nll * sw).sum() / sw.sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(tuple(classes), w.detach().numpy(), b.detach().numpy())


@dataclass(frozen=True)
class Prior:
    """One ranking term: ``weight * log(P(class | photo) @ group_dist.T)`` for each product group."""

    name: str  # "category" or "kind"
    head: LinearHead
    group_dist: np.ndarray  # (G, C): each group's distribution over the head's classes
    weight: float

    def bonus(self, feats: np.ndarray) -> np.ndarray:
        """``(m, D)`` photo features -> ``(m, G)`` additive scores."""
        return self.weight * np.log(np.maximum(self.head.proba(feats) @ self.group_dist.T, PROB_FLOOR))


@dataclass(frozen=True)
class Priors:
    """Product groups and the priors over them; what an index stores beside its vectors."""

    groups: tuple[str, ...]  # group names: categories, ``kind:<class>`` or NO_GROUP
    product_group: np.ndarray  # (n,) int32 row -> group
    terms: tuple[Prior, ...]
    info: dict[str, Any]  # what the build reports (classes, held-out accuracy)
    colours: np.ndarray | None = None  # (n, B) float16 colour histograms of the products' pictures (ffengine.items)

    def __post_init__(self) -> None:
        if self.colours is not None and (self.colours.ndim != 2 or len(self.colours) != len(self.product_group)):
            raise ValueError(f"colour histograms {self.colours.shape} do not fit {len(self.product_group)} products")

    @property
    def category_head(self) -> LinearHead | None:
        """The store-category classifier (what finds a photo's items), if the catalogue has categories."""
        return next((t.head for t in self.terms if t.name == "category"), None)

    def bonus(self, feats: np.ndarray) -> np.ndarray:
        """``(m, D)`` -> ``(m, G)``: what each group adds to a product's similarity."""
        out = np.zeros((len(feats), len(self.groups)), np.float32)
        for term in self.terms:
            out += term.bonus(feats)
        return out

    def group_rows(self) -> list[np.ndarray]:
        """Rows of each group, in row order."""
        order = np.argsort(self.product_group, kind="stable")
        bounds = np.searchsorted(self.product_group[order], np.arange(len(self.groups) + 1))
        return [order[bounds[g] : bounds[g + 1]] for g in range(len(self.groups))]

    def top_classes(self, feats: np.ndarray, k: int = 3) -> list[dict[str, list[dict[str, object]]]]:
        """For each photo, each head's ``k`` most likely classes with probabilities (what ``--json`` shows)."""
        out: list[dict[str, list[dict[str, object]]]] = [{} for _ in feats]
        for term in self.terms:
            probs = term.head.proba(feats)
            for row, p in zip(out, probs, strict=True):
                best = np.argsort(-p, kind="stable")[:k]
                row[term.name] = [{"name": term.head.classes[i], "p": round(float(p[i]), 4)} for i in best]
        return out

    # ------------------------------------------------------------ files

    def arrays(self) -> dict[str, np.ndarray]:
        files = {"prior_groups.npy": self.product_group.astype(np.int32)}
        if self.colours is not None:
            files["prior_colours.npy"] = self.colours.astype(np.float16)
        for term in self.terms:
            files[f"prior_{term.name}_weight.npy"] = term.head.weight
            files[f"prior_{term.name}_bias.npy"] = term.head.bias
            files[f"prior_{term.name}_groups.npy"] = term.group_dist.astype(np.float32)
        return files

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "terms": [{"name": t.name, "classes": list(t.head.classes), "weight": t.weight} for t in self.terms],
            "info": self.info,
            "colours": self.colours is not None,
        }

    @classmethod
    def from_files(cls, meta: dict[str, Any], read: Any, count: int) -> Priors:
        """Rebuild from :meth:`to_json` and ``read(name) -> array``; ``ValueError`` if anything does not fit."""
        groups = tuple(str(g) for g in meta["groups"])
        product_group = np.asarray(read("prior_groups.npy"))
        if product_group.shape != (count,) or product_group.dtype.kind != "i" or (count and not 0 <= product_group.min() <= product_group.max() < len(groups)):
            raise ValueError("prior_groups.npy does not fit the products")
        terms = []
        for entry in meta["terms"]:
            name = str(entry["name"])
            head = LinearHead(tuple(str(c) for c in entry["classes"]), read(f"prior_{name}_weight.npy"), read(f"prior_{name}_bias.npy"))
            dist = np.asarray(read(f"prior_{name}_groups.npy"), np.float32)
            if dist.shape != (len(groups), len(head.classes)):
                raise ValueError(f"prior_{name}_groups.npy is {dist.shape}, expected {(len(groups), len(head.classes))}")
            terms.append(Prior(name, head, dist, float(entry["weight"])))
        colours = np.asarray(read("prior_colours.npy"), np.float16) if meta.get("colours") else None
        return cls(groups, product_group.astype(np.int32), tuple(terms), dict(meta.get("info") or {}), colours)

    @staticmethod
    def file_names(meta: dict[str, Any]) -> list[str]:
        names = ["prior_groups.npy", *(["prior_colours.npy"] if meta.get("colours") else [])]
        for entry in meta["terms"]:
            names += [f"prior_{entry['name']}_{part}.npy" for part in ("weight", "bias", "groups")]
        return names


# ---------------------------------------------------------------- fitting at index build


def fit_priors(
    features: np.ndarray,
    categories: Sequence[str | None],
    *,
    kind_head: LinearHead | None = None,
    category_weight: float = CATEGORY_WEIGHT,
    kind_weight: float = KIND_WEIGHT,
    min_class_count: int = MIN_CLASS_COUNT,
    seed: int = 0,
    colours: np.ndarray | None = None,
    category_head: LinearHead | None = None,
) -> Priors | None:
    """The priors a catalogue supports: ``None`` when it has no category column and no kind head is given.

    Groups are the categories; a product without one is grouped by the kind its picture shows
    (with a kind head) or left in :data:`NO_GROUP`. ``colours`` (the pictures' histograms) are kept
    with them: with the category head they make a photo's items searchable (:mod:`ffengine.items`).
    ``category_head``, a previous fit (an update), is kept if it has this catalogue's classes.
    """
    cats = [(c or "").strip() for c in categories]
    kinds = kind_head.proba(features) if kind_head is not None else None
    shown = [f"kind:{kind_head.classes[int(i)]}" for i in kinds.argmax(axis=1)] if kind_head is not None and kinds is not None else [NO_GROUP] * len(cats)
    keys = [c or guess for c, guess in zip(cats, shown, strict=True)]
    groups = tuple(sorted(set(keys)))
    position = {g: i for i, g in enumerate(groups)}
    product_group = np.fromiter((position[k] for k in keys), np.int32, len(keys))
    terms: list[Prior] = []
    info: dict[str, Any] = {}
    if sum(1 for n in Counter(c for c in cats if c).values() if n >= min_class_count) >= 2:
        term, info["category"] = fit_category_prior(features, cats, groups, product_group, category_weight, min_class_count, seed, category_head)
        terms.append(term)
    if kind_head is not None and kinds is not None:
        dist = np.stack([kinds[product_group == g].mean(axis=0) for g in range(len(groups))])
        terms.append(Prior("kind", kind_head, dist, kind_weight))
        info["kind"] = {"classes": len(kind_head.classes)}
    if not terms:
        return None
    return Priors(groups, product_group, tuple(terms), info, colours)


def fit_category_prior(
    features: np.ndarray,
    cats: Sequence[str],
    groups: Sequence[str],
    product_group: np.ndarray,
    weight: float,
    min_class_count: int,
    seed: int,
    previous: LinearHead | None = None,
) -> tuple[Prior, dict[str, Any]]:
    """Softmax regression of the catalogue's categories on its features, and its held-out accuracy.

    Categories with fewer than ``min_class_count`` pictures share :data:`RARE_CLASS`; products
    without a category are not fitted on and their group gets the mean prediction of its pictures.
    A ``previous`` head with the same classes is kept (an update changes a few products: fitting again
    would cost more than the rest of the update and move little).
    """
    counts = Counter(c for c in cats if c)
    frequent = sorted(c for c, n in counts.items() if n >= min_class_count)
    classes = frequent + ([RARE_CLASS] if len(frequent) < len(counts) else [])
    index = {c: i for i, c in enumerate(frequent)}
    labelled = np.array([i for i, c in enumerate(cats) if c])
    y = np.array([index.get(cats[i], len(frequent)) for i in labelled])
    x = features[labelled]
    # Held out from the well-stocked classes only, so that every category still teaches the fit.
    well_stocked = np.array([counts[cats[i]] >= 10 for i in labelled])
    held = (np.random.default_rng(seed).random(len(labelled)) < HOLDOUT_SHARE) & well_stocked
    kept = previous is not None and list(previous.classes) == classes
    head = previous if kept else fit_head(x[~held], y[~held], classes, l2=CATEGORY_L2, max_iter=CATEGORY_ITERATIONS)  # type: ignore[assignment]
    accuracy = float((head.log_proba(x[held]).argmax(1) == y[held]).mean()) if held.any() else None
    dist = np.zeros((len(groups), len(classes)), np.float32)
    for g, name in enumerate(groups):
        if name in counts:
            dist[g, index.get(name, len(frequent))] = 1.0
        else:  # products without a category: what their pictures look like
            dist[g] = head.proba(features[product_group == g]).mean(axis=0)
    info = {"classes": len(classes), "rare_pooled": len(counts) - len(frequent), "heldout_accuracy": accuracy, "heldout": int(held.sum()), "kept": kept}
    return Prior("category", head, dist, weight), info


def describe(info: dict[str, Any]) -> str:
    """One line for the build summary."""
    parts = []
    cat = info.get("category")
    if cat:
        acc = "" if cat.get("heldout_accuracy") is None else f", held-out accuracy {cat['heldout_accuracy']:.2f} on {cat['heldout']} products"
        kept = " (the previous index's fit)" if cat.get("kept") else ""
        parts.append(f"category prior: {cat['classes']} classes ({cat['rare_pooled']} rare categories pooled){kept}{acc}")
    if info.get("kind"):
        parts.append(f"garment-kind prior: {info['kind']['classes']} kinds from the model")
    return "; ".join(parts) if parts else "no category prior (the catalogue has no category column)"

