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

from ffengine import runtime_onnx
from ffengine.catalog import Product
from ffengine.embedder import Embedder
from ffengine.errors import ImageRejected
from ffengine.images import load_image
from ffengine.runtime_torch import Normalise
from ffengine.weights import save_weights
from train.augment import shopper_view
from train.errors import TrainingError
from train.labels import DEFAULT_ATTRIBUTES, LabelSet, micro_f1

log = logging.getLogger(__name__)

#: ``progress(fraction 0..1, text)``, called from the training thread.
Progress = Callable[[float, str], None]
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


def decode(products: Sequence[Product], workers: int) -> list[Image.Image | None]:
    """Decode the products' local photos in a thread pool; ``None`` for a remote or unreadable one (logged)."""

    def one(product: Product) -> Image.Image | None:
        if product.is_remote:
            return None
        try:
            return load_image(product.image)
        except ImageRejected as exc:
            log.warning("fine-tune: skipping product %s: %s", product.id, exc)
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, products))


def normalise(pixels: torch.Tensor, embedder: Embedder) -> torch.Tensor:
    """``(n, S, S, 3)`` uint8 from ``embedder.prepare`` -> normalised NCHW float, as the engine feeds it."""
    return Normalise(embedder.preprocess).to(pixels.device)(pixels)


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


class FrozenNet(torch.nn.Module):
    """uint8 NHWC pixels -> the frozen blocks' output (pooled when nothing of ``features`` is trained)."""

    def __init__(self, prefix: torch.nn.Module, embedder: Embedder, pooled: bool) -> None:
        super().__init__()
        self.prefix, self.pooled = prefix, pooled
        self.normalise = Normalise(embedder.preprocess)
        self.eval()  # always: BatchNorm must use its running statistics here

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        y = self.prefix(self.normalise(pixels))
        return y.mean(dim=(2, 3)) if self.pooled else y


def frozen_runner(net: FrozenNet, embedder: Embedder) -> Callable[[np.ndarray], np.ndarray]:
    """The frozen blocks as a function of uint8 batches: ONNX Runtime on a CPU (about 3x faster than eager
    PyTorch there, checked against PyTorch on a probe batch), PyTorch otherwise or if that fails."""

    @torch.inference_mode()
    def eager(batch: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(batch).to(embedder.device)).float().cpu().numpy()

    if embedder.device.type != "cpu" or not runtime_onnx.available():
        return eager
    try:
        session = runtime_onnx.OnnxRunner(runtime_onnx.export(net.cpu(), embedder.preprocess.input_size, (runtime_onnx.OUTPUT_NAME,)))  # pictures side by side, one per core
        probe = np.random.default_rng(0).integers(0, 256, size=(2, embedder.preprocess.input_size, embedder.preprocess.input_size, 3), dtype=np.uint8)
        want, got = eager(probe), session(probe)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max() + 1e-12)):
            raise ValueError("ONNX Runtime disagrees with PyTorch on the probe batch")
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime problem: PyTorch computes the same thing
        log.warning("fine-tune: frozen blocks run in PyTorch (ONNX Runtime not usable: %s)", exc)
        return eager
    return session


class CachedViews:
    """frozen-prefix: the frozen blocks' outputs for every (product, view), computed once and kept as float16.

    Photos are decoded chunk by chunk and dropped once their views went through the
    frozen blocks, so memory holds tensors, not pictures. ``split`` "holdout" is the
    clean photo, "shopper" one augmented view of each held-out product.
    """

    def __init__(self, prefix: torch.nn.Module, embedder: Embedder, pooled: bool, opts: FinetuneOptions, say: Progress) -> None:
        self.embedder, self.opts, self.say = embedder, opts, say
        self.run = frozen_runner(FrozenNet(prefix, embedder, pooled).to(embedder.device), embedder)
        self.skipped = 0

    def frozen(self, images: list[Image.Image]) -> torch.Tensor:
        step = self.opts.batch_size
        outs = [torch.from_numpy(self.run(self.embedder.prepare(images[i : i + step]))).to(torch.float16) for i in range(0, len(images), step)]
        return torch.cat(outs)

    def build(self, train: Sequence[Product], holdout: Sequence[Product]) -> tuple[list[int], list[int]]:
        """Compute every view; returns the positions of the train / held-out products that could be read."""
        views, chunk = self.opts.views, 128
        train_parts, hold_parts, shop_parts, kept_train, kept_hold = [], [], [], [], []
        jobs = [("train", i, p) for i, p in enumerate(train)] + [("holdout", i, p) for i, p in enumerate(holdout)]
        for start in range(0, len(jobs), chunk):
            part = jobs[start : start + chunk]
            images = decode([p for _, _, p in part], self.opts.workers)
            self.skipped += sum(img is None for img in images)
            good = [(split, i, p, img) for (split, i, p), img in zip(part, images, strict=True) if img is not None]
            tr = [(i, p, img) for split, i, p, img in good if split == "train"]
            ho = [(i, p, img) for split, i, p, img in good if split == "holdout"]
            if tr:
                flat = self.frozen([v for _, p, img in tr for v in make_views(img, p.id, views, self.opts.seed)])
                train_parts.append(flat.view(len(tr), views + 1, *flat.shape[1:]))
                kept_train += [i for i, _, _ in tr]
            if ho:
                hold_parts.append(self.frozen([img for _, _, img in ho]))
                shop_parts.append(self.frozen([shopper_view(img, view_rng(self.opts.seed, p.id, 10_000)) for _, p, img in ho]))
                kept_hold += [i for i, _, _ in ho]
            done = min(start + chunk, len(jobs))
            self.say(0.03 + 0.37 * done / len(jobs), f"frozen features: {done}/{len(jobs)} products x {views + 1} views")
        self.train = torch.cat(train_parts) if train_parts else torch.zeros(0)
        self.splits = {"holdout": torch.cat(hold_parts) if hold_parts else torch.zeros(0)}
        self.splits["shopper"] = torch.cat(shop_parts) if shop_parts else torch.zeros(0)
        self.n_train = len(kept_train)
        return kept_train, kept_hold

    def use_targets(self, y_train: torch.Tensor) -> None:
        self.y_train = y_train

    def epoch(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.embedder.device
        order = rng.permutation(self.n_train)
        for start in range(0, self.n_train, self.opts.batch_size):
            idx = order[start : start + self.opts.batch_size]
            view = torch.from_numpy(rng.integers(0, self.opts.views + 1, size=len(idx)))
            yield self.train[torch.from_numpy(idx), view].to(device).float(), self.y_train[idx].to(device)

    def scores(self, model: Trainable, split: str) -> np.ndarray:
        cached = self.splits[split]
        return predict_scores(model, (cached[i : i + 256].to(self.embedder.device).float() for i in range(0, len(cached), 256)))


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


class OnlineViews:
    """full mode: photos stay decoded; every epoch draws new views through a DataLoader (workers on a GPU box)."""

    def __init__(self, embedder: Embedder, opts: FinetuneOptions) -> None:
        self.embedder, self.opts = embedder, opts
        self.skipped = 0

    def build(self, train: Sequence[Product], holdout: Sequence[Product]) -> tuple[list[int], list[int]]:
        images = decode([*train, *holdout], self.opts.workers)
        self.skipped = sum(img is None for img in images)
        kept_train = [i for i in range(len(train)) if images[i] is not None]
        kept_hold = [i for i in range(len(holdout)) if images[len(train) + i] is not None]
        self.train_images = [images[i] for i in kept_train]
        self.train_keys = [train[i].id for i in kept_train]
        hold = [(holdout[i], images[len(train) + i]) for i in kept_hold]
        self.splits = {
            "holdout": [img for _, img in hold],
            "shopper": [shopper_view(img, view_rng(self.opts.seed, p.id, 10_000)) for p, img in hold],  # type: ignore[arg-type]
        }
        self.n_train = len(kept_train)
        return kept_train, kept_hold

    def use_targets(self, y_train: torch.Tensor) -> None:
        self.dataset = ShopperDataset(self.train_images, self.train_keys, y_train.numpy(), self.embedder, self.opts.views, self.opts.seed)
        cuda = self.embedder.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.opts.batch_size, shuffle=True, num_workers=self.opts.workers if cuda else 0, pin_memory=cuda
        )

    def epoch(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.epoch += 1
        device = self.embedder.device
        for pixels, target in self.loader:
            yield normalise(pixels.to(device, non_blocking=True), self.embedder), target.to(device)

    def scores(self, model: Trainable, split: str) -> np.ndarray:
        imgs, device = self.splits[split], self.embedder.device
        batches = (normalise(torch.from_numpy(self.embedder.prepare(imgs[i : i + 64])).to(device), self.embedder) for i in range(0, len(imgs), 64))
        return predict_scores(model, batches)


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
    too few readable, labelled products to learn from.
    """
    opts = options or FinetuneOptions()
    say = progress or (lambda _f, _t: None)
    started = time.perf_counter()
    mode = opts.resolved_mode(embedder.device)
    train_from = 0 if mode == "full" else opts.train_from
    if not 0 <= train_from <= N_BLOCKS:
        raise TrainingError(f"train_from must be between 0 and {N_BLOCKS}, got {train_from}")
    torch.manual_seed(opts.seed)
    chosen, train, holdout = split_products(products, opts)
    labels = LabelSet.fit(train, opts.attributes, opts.min_label_count)
    if len(labels) < 2:
        raise TrainingError(
            f"the catalogue gives fewer than 2 labels seen {opts.min_label_count}+ times among {', '.join(opts.attributes)}; "
            "fine-tuning needs products with categories, colours, ..."
        )
    prefix, model = trainable_copy(embedder, train_from, len(labels))
    pooled = train_from == N_BLOCKS
    data: CachedViews | OnlineViews = CachedViews(prefix, embedder, pooled, opts, say) if mode == "frozen-prefix" else OnlineViews(embedder, opts)
    say(0.02, f"{len(labels)} labels; reading {len(chosen)} product photos; mode {mode} (train_from={train_from})")
    kept_train, kept_hold = data.build(train, holdout)
    skipped = (len(products) - len(chosen) if opts.limit is None else sum(p.is_remote for p in products)) + data.skipped
    if len(kept_train) < 2 or not kept_hold:
        raise TrainingError(f"fine-tuning needs at least a few readable local product photos; got {len(kept_train) + len(kept_hold)} ({skipped} skipped)")
    data.use_targets(torch.from_numpy(labels.encode([train[i] for i in kept_train])))
    y_hold = labels.encode([holdout[i] for i in kept_hold])
    first = 0.4 if mode == "frozen-prefix" else 0.05
    say(first, f"training on {len(kept_train)} products, {len(kept_hold)} held out, {skipped} skipped")
    history = train_epochs(model, data, y_hold, len(kept_train), embedder.device, opts, lambda f, text: say(first + (0.98 - first) * f, text))
    f1_clean = history[-1]["holdout_micro_f1"] if history else micro_f1(y_hold, data.scores(model, "holdout"))
    f1_shop = micro_f1(y_hold, data.scores(model, "shopper"))
    result = FinetuneResult(
        weights=out_weights,
        labels=list(labels.names),
        micro_f1=f1_clean,
        micro_f1_shopper_view=f1_shop,
        mode=mode,
        train_from=train_from,
        products_train=len(kept_train),
        products_holdout=len(kept_hold),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        history=history,
    )
    save_finetuned(prefix + model.tail, model, embedder, result, opts, meta)
    say(1.0, f"wrote {out_weights} (held-out micro-F1 {f1_clean:.3f}, shopper views {f1_shop:.3f}, {result.seconds:.0f} s)")
    return result


def split_products(products: Sequence[Product], opts: FinetuneOptions) -> tuple[list[Product], list[Product], list[Product]]:
    """The local products used (a seeded sample with ``opts.limit``), then their train and held-out parts."""
    rng = np.random.default_rng(opts.seed)
    chosen = [p for p in products if not p.is_remote]  # fine-tuning reads local photos only
    if opts.limit is not None and opts.limit < len(chosen):
        chosen = [chosen[i] for i in np.sort(rng.choice(len(chosen), opts.limit, replace=False))]
    order = rng.permutation(len(chosen))
    n_hold = int(round(len(chosen) * opts.holdout))
    return chosen, [chosen[i] for i in np.sort(order[n_hold:])], [chosen[i] for i in np.sort(order[:n_hold])]


def trainable_copy(embedder: Embedder, train_from: int, n_labels: int) -> tuple[torch.nn.Sequential, Trainable]:
    """A copy of the backbone: the frozen blocks before ``train_from``, and the rest with a label head to train."""
    features = copy.deepcopy(embedder.model).to(embedder.device).float()
    prefix, tail = features[:train_from], features[train_from:]
    for p in prefix.parameters():
        p.requires_grad_(False)
    return prefix, Trainable(tail, n_labels, pooled_input=train_from == N_BLOCKS).to(embedder.device)


def train_epochs(
    model: Trainable, data: CachedViews | OnlineViews, y_hold: np.ndarray, n_train: int, device: torch.device, opts: FinetuneOptions, say: Progress
) -> list[dict[str, float]]:
    """AdamW with a one-cycle schedule (the backbone at a smaller rate than the head); held-out micro-F1 per epoch."""
    head_params = list(model.head.parameters())
    backbone_params = [p for p in model.tail.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": opts.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": opts.lr * opts.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    steps = max(1, opts.epochs * -(-n_train // opts.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.15, anneal_strategy="cos")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, opts.epochs + 1):
        model.train()
        freeze_batchnorm(model)
        total, count = 0.0, 0
        for x, y in data.epoch(np.random.default_rng([opts.seed, epoch])):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step < steps:
                scheduler.step()
                step += 1
            total, count = total + loss.item() * len(y), count + len(y)
        f1 = micro_f1(y_hold, data.scores(model, "holdout"))
        history.append({"epoch": epoch, "loss": total / max(count, 1), "holdout_micro_f1": f1})
        say(epoch / opts.epochs, f"epoch {epoch}/{opts.epochs}: loss {total / max(count, 1):.4f}, held-out micro-F1 {f1:.3f}")
    return history


def save_finetuned(
    features: torch.nn.Sequential, model: Trainable, embedder: Embedder, result: FinetuneResult, opts: FinetuneOptions, meta: dict[str, object] | None
) -> None:
    """The trained backbone and label head as a weights file with its sidecar (what was trained, how well)."""
    state = {f"features.{k}": v.detach().cpu().clone() for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = model.head[1].weight.detach().cpu().clone()
    state["classifier.1.bias"] = model.head[1].bias.detach().cpu().clone()
    save_weights(
        state,
        result.weights,
        embedder.preprocess,
        **(meta or {}),
        base=embedder.source,
        base_fingerprint=embedder.fingerprint,
        labels=result.labels,
        micro_f1=round(result.micro_f1, 4),
        micro_f1_shopper_view=round(result.micro_f1_shopper_view, 4),
        mode=result.mode,
        train_from=result.train_from,
        epochs=opts.epochs,
        products=result.products_train + result.products_holdout,
    )


@torch.inference_mode()
def predict_scores(model: Trainable, batches: Iterator[torch.Tensor]) -> np.ndarray:
    """Sigmoid label probabilities for each input batch, concatenated."""
    model.eval()
    outs = [torch.sigmoid(model(x).float()).cpu().numpy() for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0, model.head[1].out_features), np.float32)
