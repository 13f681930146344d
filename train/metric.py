"""Learn a better search metric from 👍/👎, on top of the backbone features (no images needed).

What the log gives: for each search, the query's backbone features and the products shown
with the shopper's rating of each (👍, 👎 or none). What is learnt: a linear map ``A``
applied after the current projection, so the new projection is the old one composed
with ``A`` — still one :class:`~ffengine.index.Projection`, searched as before.

Signals, strongest first:

* **explicit pairs** — in one search, every liked product should be nearer the query
  than every disliked one (a triple ``(query, liked, disliked)``);
* **implicit negatives** — a liked product should also be nearer than random catalogue
  products (what a shopper did not pick from the whole store); weaker, sampled afresh
  at each step, weight ``random_weight``;
* **unrated** products are *not* used: a shopper who rated two of five may simply not
  have looked at the rest, so silence is neither 👍 nor 👎.

The loss is a logistic ranking loss on squared distances (scaled by their median, so it
works for any projection), plus ``l2 * ||A - I||^2``: the map starts at the identity (the
current metric) and a little feedback can only move it a little. ``A = I + U V^T`` has low
rank (32 by default): shoppers' tastes span few directions, and every distance is then
computed from rank-32 codes, so 200 Adam steps take seconds on a CPU even at 1280-d.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ffengine.db import FeedbackSearch
from ffengine.index import Projection

@dataclass(frozen=True)
class FeedbackData:
    """Feedback as row numbers: queries ``(m, D)``, triples ``(query, liked, disliked)``, liked pairs ``(query, liked)``."""

    queries: np.ndarray  # (m, D) float32 raw backbone features
    search_ids: np.ndarray  # (m,) int64
    triples: np.ndarray  # (t, 3) int64: query row, liked catalogue row, disliked catalogue row
    liked: np.ndarray  # (l, 2) int64: query row, liked catalogue row
    likes: int
    dislikes: int

    @property
    def searches(self) -> int:
        return len(self.queries)

    def subset(self, rows: np.ndarray) -> FeedbackData:
        """The searches ``rows`` (positions into ``queries``), renumbered."""
        rows = np.asarray(rows, dtype=np.int64)
        remap = np.full(len(self.queries), -1, dtype=np.int64)
        remap[rows] = np.arange(len(rows))
        triples = self.triples[np.isin(self.triples[:, 0], rows)].copy()
        liked = self.liked[np.isin(self.liked[:, 0], rows)].copy()
        triples[:, 0] = remap[triples[:, 0]]
        liked[:, 0] = remap[liked[:, 0]]
        return FeedbackData(self.queries[rows], self.search_ids[rows], triples, liked, len(liked), -1)

    def split(self, holdout: float) -> tuple[FeedbackData, FeedbackData]:
        """(older searches, newest ``holdout`` share): evaluation on what came last, like production."""
        order = np.argsort(self.search_ids, kind="stable")
        n_hold = int(round(len(order) * holdout))
        return self.subset(np.sort(order[: len(order) - n_hold])), self.subset(np.sort(order[len(order) - n_hold :]))


def feedback_data(searches: Sequence[FeedbackSearch], product_rows: dict[str, int], dim: int) -> FeedbackData:
    """Turn exported searches into row numbers; products no longer in the index and unrated items are left out."""
    queries, ids, triples, liked = [], [], [], []
    likes = dislikes = 0
    for search in searches:
        emb = np.asarray(search.embedding, dtype=np.float32)
        if emb.shape != (dim,) or not np.isfinite(emb).all():
            continue
        pos = [product_rows[i.product_id] for i in search.items if i.rating == 1 and i.product_id in product_rows]
        neg = [product_rows[i.product_id] for i in search.items if i.rating == -1 and i.product_id in product_rows]
        if not pos and not neg:
            continue
        q = len(queries)
        queries.append(emb)
        ids.append(search.search_id)
        triples += [(q, p, n) for p in pos for n in neg]
        liked += [(q, p) for p in pos]
        likes += len(pos)
        dislikes += len(neg)
    return FeedbackData(
        np.asarray(queries, dtype=np.float32).reshape(-1, dim),
        np.asarray(ids, dtype=np.int64),
        np.asarray(triples, dtype=np.int64).reshape(-1, 3),
        np.asarray(liked, dtype=np.int64).reshape(-1, 2),
        likes,
        dislikes,
    )


@dataclass(frozen=True)
class MetricOptions:
    """Knobs of :func:`learn_map`; defaults chosen on the simulation's train/validation photos."""

    l2: float = 1.0  # pull towards the current metric (per dimension)
    rank: int | None = 32  # learn A = I + U V^T of this rank (None: full rank)
    steps: int = 200
    batch: int = 1024  # triples (and liked pairs) per step
    lr: float = 0.02
    random_negatives: int = 5  # per liked pair and step
    random_weight: float = 0.5
    sharpness: float = 4.0  # logistic slope on median-scaled distance differences
    seed: int = 0


def compose(base: Projection, a: np.ndarray) -> Projection:
    """``base`` followed by the linear map ``a`` as one projection (exact)."""
    return Projection(base.mean, base.matrix @ a.astype(np.float32), base.normalize_input)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: these matmuls are small (~10 MFLOP), and on a busy CPU the
    threads of a parallel region wait for each other far longer than the work takes.
    (torch's thread count is process-wide; it is restored afterwards.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def learn_map(
    base: Projection,
    catalogue: np.ndarray,
    data: FeedbackData,
    options: MetricOptions | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> np.ndarray:
    """The ``(d, d)`` map that, composed after ``base``, ranks liked products nearer; identity at the start."""
    with single_thread():
        return _learn_map(base, catalogue, data, options or MetricOptions(), progress)


def _learn_map(
    base: Projection, catalogue: np.ndarray, data: FeedbackData, opts: MetricOptions, progress: Callable[[float, str], None] | None
) -> np.ndarray:
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    z_cat = torch.from_numpy(base.apply(catalogue))
    z_q = torch.from_numpy(base.apply(data.queries)) if data.searches else torch.zeros((0, base.out_dim))
    d = z_cat.shape[1]
    r = min(opts.rank or d, d)
    # A = I + U V^T. U starts at zero (A = I, the current metric); V random so that U gets gradients.
    u = torch.zeros((d, r), requires_grad=True)
    v = (0.01 * torch.randn((d, r))).requires_grad_(True)
    optimizer = torch.optim.Adam([u, v], lr=opts.lr)
    triples = torch.from_numpy(data.triples)
    liked = torch.from_numpy(data.liked)
    scale = median_sq_distance(z_q, z_cat, triples, liked)

    def sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Squared distance of ``x A`` and ``y A`` (rows, broadcasting over leading dims), computed in
        rank-r codes: zA = z + (zU) V^T, so every term is a d-dim product of fixed vectors (no gradient)
        or an r-dim product of codes."""
        ux, vx, uy, vy = x @ u, x @ v, y @ u, y @ v
        g = v.T @ v
        with torch.no_grad():
            xy, xx, yy = (x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1)
        dot = xy + (ux * vy).sum(-1) + (vx * uy).sum(-1) + ((ux @ g) * uy).sum(-1)
        nx = xx + 2 * (ux * vx).sum(-1) + ((ux @ g) * ux).sum(-1)
        ny = yy + 2 * (uy * vy).sum(-1) + ((uy @ g) * uy).sum(-1)
        return nx + ny - 2 * dot

    for step in range(opts.steps):
        loss = torch.zeros(())
        if len(triples):
            t = triples[torch.from_numpy(rng.integers(0, len(triples), size=min(opts.batch, len(triples))))]
            q = z_q[t[:, 0]]
            diff = sq_dist(q, z_cat[t[:, 1]]) - sq_dist(q, z_cat[t[:, 2]])
            loss = loss + torch.nn.functional.softplus(opts.sharpness * diff / scale).mean()
        if opts.random_negatives and len(liked):
            pairs = liked[torch.from_numpy(rng.integers(0, len(liked), size=min(opts.batch, len(liked))))]
            q = z_q[pairs[:, 0]]
            rand = z_cat[torch.from_numpy(rng.integers(0, len(z_cat), size=(len(pairs), opts.random_negatives)))]
            diff = sq_dist(q, z_cat[pairs[:, 1]])[:, None] - sq_dist(q[:, None, :], rand)
            loss = loss + opts.random_weight * torch.nn.functional.softplus(opts.sharpness * diff / scale).mean()
        loss = loss + opts.l2 * ((u.T @ u) * (v.T @ v)).sum() / d  # ||A - I||_F^2 per dimension
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress and (step + 1) % max(1, opts.steps // 10) == 0:
            progress((step + 1) / opts.steps, f"metric step {step + 1}/{opts.steps}, loss {loss.item():.4f}")
    with torch.no_grad():
        return (torch.eye(d) + u @ v.T).numpy().astype(np.float32)


def median_sq_distance(z_q: torch.Tensor, z_cat: torch.Tensor, triples: torch.Tensor, liked: torch.Tensor) -> float:
    """Typical squared query-product distance under the current metric (the loss's unit)."""
    if len(triples):
        pairs = torch.cat([triples[:, [0, 1]], triples[:, [0, 2]]])
    else:
        pairs = liked
    if len(pairs) == 0:
        return 1.0
    sq = ((z_q[pairs[:, 0]] - z_cat[pairs[:, 1]]) ** 2).sum(1)
    return max(float(sq.median()), 1e-6)


def pairwise_accuracy(projection: Projection, catalogue: np.ndarray, data: FeedbackData) -> float | None:
    """How often a liked product is nearer the query than a disliked one from the same search (ties count half)."""
    if len(data.triples) == 0:
        return None
    q = projection.apply(data.queries)
    rows = np.unique(data.triples[:, 1:])
    c = np.zeros((len(catalogue), projection.out_dim), np.float32)
    c[rows] = projection.apply(catalogue[rows])
    qi, pi, ni = data.triples.T
    dp = ((q[qi] - c[pi]) ** 2).sum(1)
    dn = ((q[qi] - c[ni]) ** 2).sum(1)
    return float(np.mean((dp < dn) + 0.5 * (dp == dn)))


__all__ = ["FeedbackData", "MetricOptions", "compose", "feedback_data", "learn_map", "pairwise_accuracy"]
