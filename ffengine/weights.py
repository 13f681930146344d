"""Resolve ``FFENGINE_WEIGHTS`` into MobileNetV2 feature weights plus how to feed them.

Two kinds of source, one result:

* a torchvision weights name (``IMAGENET1K_V2``, ``IMAGENET1K_V1``, ``DEFAULT``),
  downloaded by torchvision when online;
* a local ``state_dict`` file (``.pth``) with a JSON sidecar beside it
  (``model.pth`` -> ``model.json``) giving ``input_size``, ``resize``, ``mean``, ``std``,
  as in ``../shared/models/mobilenet_v2_imagenet.json``. Fine-tuned models from
  ``train/`` are written the same way.

Only the ``features.*`` tensors are used (the classifier is dropped), so a
fine-tuned file with any head size loads. Files are read with
``torch.load(weights_only=True)``: no code from the file is ever executed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ffengine.errors import WeightsError
from ffengine.files import write_atomic
from ffengine.prior import LinearHead

SETTING = "FFENGINE_WEIGHTS"


#: How pictures are fitted to the network's square input (:func:`ffengine.images.network_input`).
FITS = ("whole", "crop")
#: What the engine feeds when a sidecar does not say: the whole picture (the study's crop cuts garments).
DEFAULT_FIT = "whole"


@dataclass(frozen=True)
class Preprocess:
    """How a picture becomes the network's input: fitted to ``input_size`` (``fit``), then normalised.

    ``resize`` is the shorter side before the centre crop, used by ``fit="crop"`` only. The whole
    record is part of the model fingerprint, so features made one way are never mixed with another's.
    """

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    fit: str = DEFAULT_FIT

    def to_json(self) -> dict[str, object]:
        return {"input_size": self.input_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std), "fit": self.fit}

    @classmethod
    def from_json(cls, data: dict[str, object], where: str) -> Preprocess:
        try:
            mean = tuple(float(v) for v in data["mean"])  # type: ignore[union-attr]
            std = tuple(float(v) for v in data["std"])  # type: ignore[union-attr]
            size = int(data.get("input_size", 224))  # type: ignore[arg-type]
            resize = int(data.get("resize", round(size * 256 / 224)))  # type: ignore[arg-type]
            fit = str(data.get("fit", DEFAULT_FIT))
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{where}: sidecar needs numeric 'mean', 'std' (3 values each) and 'input_size' ({exc})") from None
        finite = all(math.isfinite(v) for v in (*mean, *std))
        if len(mean) != 3 or len(std) != 3 or not finite or min(std) <= 0 or not 32 <= size <= resize <= 2048 or fit not in FITS:
            raise WeightsError(f"{where}: sidecar preprocessing is out of range (fit is one of {', '.join(FITS)}): {data}")
        return cls(input_size=size, resize=resize, mean=mean, std=std, fit=fit)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResolvedWeights:
    """Feature-extractor tensors, their preprocessing, and a fingerprint naming both."""

    source: str
    state_dict: dict[str, torch.Tensor]
    preprocess: Preprocess
    fingerprint: str
    #: The garment-kind head that ``train finetune`` ships with its weights (see :mod:`train.kinds`).
    kind_head: LinearHead | None = None


def sidecar_path(weights_file: Path) -> Path:
    """``model.pth`` -> ``model.json``."""
    return weights_file.with_suffix(".json")


def fingerprint(weights_digest: str, preprocess: Preprocess) -> str:
    """Model identity = weights hash + preprocessing; an index remembers it."""
    return f"{weights_digest[:16]}-{preprocess_digest(preprocess)}"


def preprocess_digest(preprocess: Preprocess) -> str:
    """8 hex digits naming how pictures are fed (what anything computed from the network input depends on)."""
    return hashlib.sha256(json.dumps(asdict(preprocess), sort_keys=True).encode()).hexdigest()[:8]


def looks_like_path(spec: str) -> bool:
    return any(ch in spec for ch in "/\\") or spec.endswith((".pth", ".pt", ".bin")) or Path(spec).exists()


def feature_tensors(state_dict: object, where: str) -> dict[str, torch.Tensor]:
    """Keep ``features.*`` (the part we embed with) and check them against MobileNetV2.

    Names, shapes and finiteness are checked here, so a wrong file fails at start with a
    message naming the setting instead of deep inside ``load_state_dict`` or as NaN features.
    """
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]  # common checkpoint wrapper
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{where}: expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    feats = {k: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith("features.") and isinstance(v, torch.Tensor)}
    if not feats:
        raise WeightsError(f"{where}: no MobileNetV2 'features.*' tensors in this file; is it a torchvision mobilenet_v2 state_dict?")
    expected = expected_shapes()
    # BatchNorm fills in a missing ``num_batches_tracked`` itself (older checkpoints lack it).
    missing = sorted((k for k in set(expected) - set(feats) if not k.endswith("num_batches_tracked")), key=_natural)
    unexpected = sorted(set(feats) - set(expected), key=_natural)
    wrong = [f"{k} {tuple(feats[k].shape)} (want {expected[k]})" for k in expected if k in feats and tuple(feats[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise WeightsError(f"{where}: these tensors do not fit MobileNetV2 (width 1.0) features; {'; '.join(parts)}")
    bad = [k for k, v in feats.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{where}: tensors contain NaN or infinity ({', '.join(bad[:3])}); the file is damaged or training diverged")
    return feats


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """``features.*`` names and shapes of torchvision's MobileNetV2 (built on the meta device: no memory, no init)."""
    from torchvision.models import mobilenet_v2

    with torch.device("meta"):
        model = mobilenet_v2(weights=None)
    return {f"features.{k}": tuple(v.shape) for k, v in model.features.state_dict().items()}


def _natural(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def load_file(path: Path) -> ResolvedWeights:
    where = f"{SETTING}={path}"
    if not path.is_file():
        raise WeightsError(f"{where}: no such file. Point {SETTING} at a MobileNetV2 .pth file or a torchvision weights name such as IMAGENET1K_V2.")
    side = sidecar_path(path)
    if not side.is_file():
        raise WeightsError(f"{where}: the sidecar {side.name} (preprocessing: input_size, resize, mean, std) is missing beside it.")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{where}: sidecar {side.name} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{where}: sidecar {side.name} must hold a JSON object")
    arch = meta.get("arch", "mobilenet_v2")
    if arch != "mobilenet_v2":
        raise WeightsError(f"{where}: sidecar says arch={arch!r}; only mobilenet_v2 is supported")
    preprocess = Preprocess.from_json(meta, where)
    try:
        data = path.read_bytes()  # read once: the hash and the tensors come from the same bytes
    except OSError as exc:
        raise WeightsError(f"{where}: cannot read the file ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    recorded = meta.get("sha256")
    if isinstance(recorded, str) and recorded.lower() != digest:
        raise WeightsError(f"{where}: the file does not match the sha256 in {side.name}; it was changed or copied incompletely")
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for bad files
        raise WeightsError(f"{where}: cannot load weights ({type(exc).__name__}: {str(exc)[:200]})") from None
    feats = feature_tensors(raw, where)
    head = read_kind_head(raw, meta.get("kind_head"), where)
    return ResolvedWeights(str(path), feats, preprocess, fingerprint(features_digest(feats), preprocess), head)


def features_digest(feats: dict[str, torch.Tensor]) -> str:
    """sha256 of the ``features.*`` tensors (names and values): what the embeddings depend on.

    Not the file's hash: a file that adds only a head (``train finetune``'s kind head) makes the same
    features, so it shares the embedding cache and the indexes of the backbone it came from.
    """
    digest = hashlib.sha256()
    for name in sorted(feats):
        tensor = feats[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def read_kind_head(state_dict: object, meta: object, where: str) -> LinearHead | None:
    """The ``kind_head.*`` tensors that the sidecar's ``kind_head`` entry declares, if any."""
    if meta is None:
        return None
    try:
        classes = tuple(str(c) for c in meta["classes"])  # type: ignore[index]
        weight, bias = state_dict["kind_head.weight"], state_dict["kind_head.bias"]  # type: ignore[index]
        return LinearHead(classes, weight.float().numpy().T, bias.float().numpy())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{where}: the sidecar declares a kind_head but the file's kind_head tensors do not fit it ({exc})") from None


def load_torchvision(name: str) -> ResolvedWeights:
    from torchvision.models import MobileNet_V2_Weights

    key = name.removeprefix("MobileNet_V2_Weights.")
    try:
        weights = MobileNet_V2_Weights[key] if key != "DEFAULT" else MobileNet_V2_Weights.DEFAULT
    except KeyError:
        names = ", ".join(w.name for w in MobileNet_V2_Weights)
        raise WeightsError(f"{SETTING}={name!r} is neither a file nor a torchvision weights name ({names}, DEFAULT)") from None
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise WeightsError(
            f"{SETTING}={name}: torchvision could not download the weights ({type(exc).__name__}). "
            f"Offline? Set {SETTING} to a local .pth file with its JSON sidecar."
        ) from None
    tf = weights.transforms()
    preprocess = Preprocess(
        input_size=int(tf.crop_size[0]), resize=int(tf.resize_size[0]), mean=tuple(tf.mean), std=tuple(tf.std)  # type: ignore[arg-type]
    )
    digest = hashlib.sha256(weights.url.encode()).hexdigest()
    return ResolvedWeights(weights.url, feature_tensors(state, f"{SETTING}={name}"), preprocess, fingerprint(digest, preprocess))


def resolve_weights(spec: str) -> ResolvedWeights:
    """Turn a ``FFENGINE_WEIGHTS`` value into tensors; raise :class:`WeightsError` with a fix otherwise."""
    spec = spec.strip()
    if not spec:
        raise WeightsError(f"{SETTING} is empty; use a torchvision weights name such as IMAGENET1K_V2 or a .pth file")
    if looks_like_path(spec):
        return load_file(Path(spec).expanduser())
    return load_torchvision(spec)


def save_weights(
    state_dict: dict[str, torch.Tensor], path: Path, preprocess: Preprocess, *, kind_head: LinearHead | None = None, **meta: object
) -> Path:
    """Write a weights file and its sidecar (the format :func:`load_file` reads), each atomically.

    The sidecar records the file's sha256; :func:`load_file` refuses a file that does not match.
    ``meta`` (e.g. ``base=``, ``epochs=``) is stored too but cannot override the preprocessing.
    ``kind_head`` goes into the file as ``kind_head.weight`` / ``kind_head.bias``, its classes into the sidecar.
    """
    if kind_head is not None:
        state_dict = {
            **state_dict,
            "kind_head.weight": torch.from_numpy(kind_head.weight.T.copy()),
            "kind_head.bias": torch.from_numpy(kind_head.bias.copy()),
        }
        meta = {**meta, "kind_head": {"classes": list(kind_head.classes)}}
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    sidecar = {**meta, "arch": "mobilenet_v2", **preprocess.to_json(), "sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(path, data, durable=True)
    write_atomic(sidecar_path(path), json.dumps(sidecar, indent=2).encode(), durable=True)
    return path
