"""Fine-tune MobileNetV2 on catalogue attributes (the study's step), on a CPU in minutes or a GPU in full.

The network learns to predict every ``attribute=value`` label of a product at once
(multi-label, BCE loss), from shopper-like views of the catalogue photos
(:mod:`train.augment`); held-out products give the study's metric, micro-F1.

Two ways to run, one training loop:

* ``frozen-prefix`` (the CPU default): blocks ``features[:train_from]`` stay frozen, so
  their output is computed **once** per view (a clean view plus ``views`` augmented ones
  per product, kept as float16) and only the last blocks and the head are trained,
  epoch after epoch, on those cached tensors. With ``train_from=17`` that is the last
  inverted residual block and the 1x1 conv to 1280 channels: about a tenth of the
  network's compute per step, on inputs that cost nothing to re-read.
* ``full`` (the GPU default): every block trains; images are decoded and augmented
  afresh for each epoch by a DataLoader.

BatchNorm layers keep their running statistics (``eval`` mode) in both: fine-tuning
batches are small and the shipped weights have BatchNorm folded into the convolutions.
The result is a ``features.*`` state dict (plus the label head as ``classifier.1.*``)
written with :func:`ffengine.weights.save_weights`, which the engine loads like any
weights file.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ffengine.catalog import Product
from ffengine.embedder import Embedder
from ffengine.errors import ImageRejected
from ffengine.images import load_image
from ffengine.weights import save_weights
from train.augment import shopper_view
from train.errors import TrainingError
from train.labels import DEFAULT_ATTRIBUTES, LabelSet, micro_f1

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
MODES = ("auto", "frozen-prefix", "full")
#: MobileNetV2 ``features`` has 19 blocks; ``train_from=19`` trains the head only (a linear probe).
N_BLOCKS = 19


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune. Defaults finish in a few minutes on a 2-core CPU for a few thousand products."""

    mode: str = "auto"  # auto: full on a GPU, frozen-prefix on a CPU
    train_from: int = 17  # frozen-prefix: first trainable block of ``features``
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3  # head; backbone blocks get lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    views: int = 2  # augmented views per product (frozen-prefix caches them; full makes new ones each epoch)
    holdout: float = 0.15  # share of products kept out of training for micro-F1
    limit: int | None = None  # use at most this many products (a seeded random subset)
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    min_label_count: int = 10
    seed: int = 0
    workers: int = 2  # image decoding threads (and DataLoader workers in full mode)

    def resolved_mode(self, device: torch.device) -> str:
        if self.mode not in MODES:
            raise TrainingError(f"fine-tune mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "auto":
            return "full" if device.type == "cuda" else "frozen-prefix"
        return self.mode


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced and how well it predicts held-out products' labels."""

    weights: Path
    labels: list[str]
    micro_f1: float  # held-out products, clean catalogue photos (the study's metric)
    micro_f1_shopper_view: float  # the same products seen through one augmented view
    mode: str
    train_from: int
    products_train: int
    products_holdout: int
    skipped: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["weights"] = str(self.weights)
        out["labels"] = len(self.labels)
        return out


# ----------------------------------------------------------------- data


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """A generator fixed by (seed, product, view): the same augmented view every time."""
    digest = hashlib.sha256(f"{seed}:{key}:{view}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_views(img: Image.Image, key: str, views: int, seed: int) -> list[Image.Image]:
    """``[clean, aug_1, ..., aug_views]``."""
    return [img] + [shopper_view(img, view_rng(seed, key, v)) for v in range(1, views + 1)]


def load_local(products: Sequence[Product], workers: int) -> tuple[list[Product], list[Image.Image], int]:
    """Decode the products' local photos; unreadable or remote ones are skipped (counted)."""

    def one(product: Product) -> Image.Image | None:
        if product.is_remote:
            return None
        try:
            return load_image(product.image)
        except ImageRejected as exc:
            log.warning("fine-tune: skipping product %s: %s", product.id, exc)
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(pool.map(one, products))
    kept = [(p, img) for p, img in zip(products, images, strict=True) if img is not None]
    return [p for p, _ in kept], [img for _, img in kept], len(products) - len(kept)


def normalise(pixels: torch.Tensor, embedder: Embedder) -> torch.Tensor:
    """``(n, S, S, 3)`` uint8 from ``embedder.prepare`` -> normalised NCHW float, as the engine feeds it."""
    prep = embedder.preprocess
    mean = torch.tensor(prep.mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=pixels.device).view(1, 3, 1, 1) * 255.0
    return (pixels.permute(0, 3, 1, 2).float() - mean) / std


def freeze_batchnorm(module: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed while the rest trains."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainable(torch.nn.Module):
    """The trained part: ``features[train_from:]`` (may be empty), global average pool, label head."""

    def __init__(self, tail: torch.nn.Module, n_labels: int, pooled_input: bool) -> None:
        super().__init__()
        self.tail = tail
        self.pooled_input = pooled_input
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(1280, n_labels))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pooled_input else self.tail(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# ----------------------------------------------------------------- the two data paths


class CachedViews:
    """frozen-prefix: the frozen blocks' outputs for every (product, view), computed once, float16."""

    def __init__(self, prefix: torch.nn.Module, embedder: Embedder, pooled: bool) -> None:
        self.prefix = prefix
        self.embedder = embedder
        self.pooled = pooled

    @torch.inference_mode()
    def compute(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        outs = []
        for start in range(0, len(images), batch_size):
            pixels = torch.from_numpy(self.embedder.prepare(images[start : start + batch_size])).to(self.embedder.device)
            y = self.prefix(normalise(pixels, self.embedder))
            if self.pooled:
                y = y.mean(dim=(2, 3))
            outs.append(y.to(torch.float16).cpu())
        return torch.cat(outs)


def iterate_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


class ShopperDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """full mode: each item is a fresh view (clean with probability 1/(views+1)) as uint8 pixels."""

    def __init__(self, images: list[Image.Image], keys: list[str], targets: np.ndarray, embedder: Embedder, views: int, seed: int):
        self.images, self.keys, self.targets = images, keys, targets
        self.embedder, self.views, self.seed = embedder, views, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = view_rng(self.seed + 7919 * self.epoch, self.keys[i], 0)
        img = self.images[i]
        if rng.random() >= 1 / (self.views + 1):
            img = shopper_view(img, rng)
        return self.embedder.prepare([img])[0], self.targets[i]


# ----------------------------------------------------------------- training


def finetune(
    products: Sequence[Product],
    embedder: Embedder,
    out_weights: Path,
    options: FinetuneOptions | None = None,
    *,
    progress: Progress | None = None,
    meta: dict[str, object] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``embedder.model`` on ``products``' attributes; write weights + sidecar to ``out_weights``.

    ``embedder`` is not modified. Raises :class:`TrainingError` when the catalogue has
    too few labelled products to learn from.
    """
    opts = options or FinetuneOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    device = embedder.device
    mode = opts.resolved_mode(device)
    train_from = 0 if mode == "full" else opts.train_from
    if not 0 <= train_from <= N_BLOCKS:
        raise TrainingError(f"train_from must be between 0 and {N_BLOCKS}, got {train_from}")
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)

    chosen = list(products)
    if opts.limit is not None and opts.limit < len(chosen):
        chosen = [chosen[i] for i in np.sort(rng.choice(len(chosen), opts.limit, replace=False))]
    say(f"reading {len(chosen)} product photos")
    chosen, images, skipped = load_local(chosen, opts.workers)
    n_hold = int(round(len(chosen) * opts.holdout))
    if len(chosen) - n_hold < 2 or n_hold < 1:
        raise TrainingError(f"fine-tuning needs at least a few readable local product photos; got {len(chosen)} ({skipped} skipped)")
    order = rng.permutation(len(chosen))
    hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    train_products = [chosen[i] for i in train_idx]
    labels = LabelSet.fit(train_products, opts.attributes, opts.min_label_count)
    if len(labels) < 2:
        raise TrainingError(
            f"the catalogue gives fewer than 2 labels seen {opts.min_label_count}+ times among {opts.attributes}; "
            "fine-tuning needs products with categories, colours, ..."
        )
    y_train = torch.from_numpy(labels.encode(train_products))
    y_hold = labels.encode([chosen[i] for i in hold_idx])
    say(f"{len(labels)} labels, {len(train_idx)} training and {n_hold} held-out products, mode {mode} (train_from={train_from})")

    features = copy.deepcopy(embedder.model).to(device).float()
    prefix, tail = features[:train_from], features[train_from:]
    for p in prefix.parameters():
        p.requires_grad_(False)
    pooled = train_from == N_BLOCKS
    model = Trainable(tail, len(labels), pooled_input=pooled).to(device)

    keys = [p.id for p in chosen]
    hold_images = [images[i] for i in hold_idx]
    hold_shopper = [shopper_view(images[i], view_rng(opts.seed, keys[i], 10_000)) for i in hold_idx]
    if mode == "frozen-prefix":
        cache = CachedViews(prefix.eval(), embedder, pooled)
        say(f"computing frozen features for {len(train_idx)} x {opts.views + 1} views")
        train_views = []
        for start in range(0, len(train_idx), 256):
            chunk = train_idx[start : start + 256]
            views = [make_views(images[i], keys[i], opts.views, opts.seed) for i in chunk]
            flat = cache.compute([v for vs in views for v in vs], opts.batch_size)
            train_views.append(flat.view(len(chunk), opts.views + 1, *flat.shape[1:]))
            say(f"frozen features: {min(start + 256, len(train_idx))}/{len(train_idx)} products")
        cached_train = torch.cat(train_views)
        cached_hold = cache.compute(hold_images, opts.batch_size)
        cached_shop = cache.compute(hold_shopper, opts.batch_size)
        del images  # the decoded photos are no longer needed

        def train_batches(epoch_rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in iterate_batches(len(cached_train), opts.batch_size, epoch_rng):
                view = torch.from_numpy(epoch_rng.integers(0, opts.views + 1, size=len(idx)))
                x = cached_train[torch.from_numpy(idx), view].to(device).float()
                yield x, y_train[idx].to(device)

        def predict(cached: torch.Tensor) -> np.ndarray:
            return predict_scores(model, (cached[i : i + 256].to(device).float() for i in range(0, len(cached), 256)))

    else:
        dataset = ShopperDataset([images[i] for i in train_idx], [keys[i] for i in train_idx], y_train.numpy(), embedder, opts.views, opts.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=opts.batch_size, shuffle=True, num_workers=opts.workers if device.type == "cuda" else 0,
            pin_memory=device.type == "cuda", drop_last=False, persistent_workers=False,
        )

        def train_batches(epoch_rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            dataset.epoch += 1
            for pixels, target in loader:
                yield normalise(pixels.to(device, non_blocking=True), embedder), target.to(device)

        def predict(imgs: list[Image.Image]) -> np.ndarray:  # type: ignore[misc]
            return predict_scores(
                model,
                (normalise(torch.from_numpy(embedder.prepare(imgs[i : i + 64])).to(device), embedder) for i in range(0, len(imgs), 64)),
            )

        cached_hold, cached_shop = hold_images, hold_shopper  # type: ignore[assignment]

    head_params = list(model.head.parameters())
    backbone_params = [p for p in model.tail.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": opts.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": opts.lr * opts.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    steps = max(1, opts.epochs * -(-len(train_idx) // opts.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.15, anneal_strategy="cos"
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    use_amp = device.type == "cuda"
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, opts.epochs + 1):
        model.train()
        freeze_batchnorm(model)
        total, count = 0.0, 0
        epoch_rng = np.random.default_rng([opts.seed, epoch])
        for x, y in train_batches(epoch_rng):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step < steps:
                scheduler.step()
                step += 1
            total += loss.item() * len(y)
            count += len(y)
        f1 = micro_f1(y_hold, predict(cached_hold))
        history.append({"epoch": epoch, "loss": total / max(count, 1), "holdout_micro_f1": f1})
        say(f"epoch {epoch}/{opts.epochs}: loss {total / max(count, 1):.4f}, held-out micro-F1 {f1:.3f}")

    f1_clean = history[-1]["holdout_micro_f1"] if history else micro_f1(y_hold, predict(cached_hold))
    f1_shop = micro_f1(y_hold, predict(cached_shop))
    state = {f"features.{k}": v.detach().cpu().clone() for k, v in (prefix + tail).state_dict().items()}
    state["classifier.1.weight"] = model.head[1].weight.detach().cpu().clone()
    state["classifier.1.bias"] = model.head[1].bias.detach().cpu().clone()
    seconds = time.perf_counter() - started
    save_weights(
        state,
        out_weights,
        embedder.preprocess,
        base=embedder.source,
        base_fingerprint=embedder.fingerprint,
        labels=list(labels.names),
        micro_f1=round(f1_clean, 4),
        micro_f1_shopper_view=round(f1_shop, 4),
        mode=mode,
        train_from=train_from,
        epochs=opts.epochs,
        products=len(chosen),
        **(meta or {}),
    )
    say(f"wrote {out_weights} (held-out micro-F1 {f1_clean:.3f}, shopper views {f1_shop:.3f}, {seconds:.0f} s)")
    return FinetuneResult(
        weights=out_weights,
        labels=list(labels.names),
        micro_f1=f1_clean,
        micro_f1_shopper_view=f1_shop,
        mode=mode,
        train_from=train_from,
        products_train=len(train_idx),
        products_holdout=n_hold,
        skipped=skipped,
        seconds=seconds,
        history=history,
    )


@torch.inference_mode()
def predict_scores(model: Trainable, batches: Iterator[torch.Tensor]) -> np.ndarray:
    """Sigmoid label probabilities for each input batch, concatenated."""
    model.eval()
    outs = [torch.sigmoid(model(x).float()).cpu().numpy() for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0, model.head[1].out_features), np.float32)
